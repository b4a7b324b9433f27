"""`python -m tfrecords_builder download`: the public HPA images, fetched, verified, resumable.

For each selected image of the list (`tfrecords_builder.public_list`) four files are fetched,
`{ID}_{red,green,blue,yellow}.jpg` (the website's JPEGs, default) or `.tif.gz` (the 16-bit
originals, `--format tif`), into one flat folder or `gs://` prefix:

    DEST/{ID}_{color}.jpg|.tif.gz   verified files only (decoded before they count)
    DEST/labels.csv                 ID,Label,Cellline of the images whose 4 files all arrived
    DEST/download_report.json       the selection, the counts, every failed image and why

ready for `python -m tfrecords_builder --images DEST --labels DEST/labels.csv ...`.

How it is robust:
- `--workers` threads share one connection pool per thread; at most `--per-host` requests run
  against one host at a time, and `--rate` caps the requests per second to one host.
- A timeout, a dropped connection, a cut body, an HTTP 408/429/5xx is retried with backoff by
  `common.retry.call` (a 429's Retry-After is obeyed); a 404 (and other 4xx) is recorded at once.
- Every body is decoded (`common.images.decode_channel`; a JPEG must also end with its end
  marker) before it is written; a file that fails in one format is fetched in the other
  (`--no-fallback` to stop that), so an image can mix formats, which the builder reads.
- Files are written under a temporary name and renamed (local), or uploaded in one request
  (gs://), so a final name always holds a whole, verified file; temporary files left by a
  killed run are removed by the next one.
- A second run lists DEST once and sends no request for a file already there: it fetches only
  what is missing (failed files of an earlier run included), then rewrites labels.csv and the
  report for the whole list.
Exit status: 0 every selected image arrived whole, 3 done with failures, 1 error.
"""
from __future__ import annotations

import concurrent.futures as cf
import email.utils
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

from common import config as cfglib
from common import labels as labellib
from common import retry, storage
from common.images import CHANNELS, ImageLoadError, decode_channel
from tfrecords_builder import public_list

EXTENSIONS = {"jpg": ".jpg", "tif": ".tif.gz"}
LABELS_FILE = "labels.csv"
REPORT_FILE = "download_report.json"
TMP_PREFIX = ".tmp-"  # common.storage's temporary names in DEST
EXIT_OK, EXIT_ERROR, EXIT_FAILURES = 0, 1, 3
USER_AGENT = "hpa-scc-downloader/0.1 (+https://www.proteinatlas.org/about/licence)"


@dataclass(frozen=True)
class DownloadConfig:
    """One download. The comments are the command line's --help (common.config.add_arguments)."""

    # the image list: the hosts' kaggle_2021.tsv (comma-separated: Image, Label, Label_idx,
    # Cellline, in_trainset) or a plain ID,Label,Image CSV; local or gs://
    image_list: str = ""
    out: str = ""  # destination folder or gs://bucket/prefix (flat: DEST/{ID}_{color}.jpg)
    # jpg: the website's 8-bit JPEGs (~4x smaller); tif: the 16-bit originals (.tif.gz)
    format: str = "jpg"
    # fetch a file in the other format when it fails in the chosen one
    fallback: bool = True
    # replaces the scheme and host of every Image URL (a mirror, a test server), e.g.
    # http://127.0.0.1:8000; a path in it is put before the URL's path
    base_url: str = ""
    workers: int = 16  # download threads
    per_host: int = 8  # requests in flight to one host at most
    rate: float = 0.0  # requests per second to one host at most; 0 = no limit
    timeout: float = 30.0  # seconds to connect, and between two reads of a response
    tries: int = 5  # attempts per file on transient errors (timeouts, resets, 429, 5xx)
    backoff: float = 1.0  # seconds before the second attempt, doubled each time (at most 30)
    limit: int = 0  # only the first N selected images (a first look); 0 = all
    include_trainset: bool = False  # keep images that are in the competition's train set
    keep_unlabelled: bool = False  # keep images with no competition class (Label left empty)
    # cell lines kept (repeatable, e.g. --cellline 'U-2 OS'); 'competition' = the
    # competition's 17 lines, 'all' = every line
    cellline: tuple[str, ...] = (public_list.COMPETITION,)

    def __post_init__(self):
        object.__setattr__(self, "cellline", tuple(self.cellline))
        if self.format not in EXTENSIONS:
            raise ValueError(f"format must be 'jpg' or 'tif', got {self.format!r}")
        for name in ("workers", "per_host", "tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rate", "backoff", "limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if self.base_url and urlsplit(self.base_url).scheme not in ("http", "https"):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")

    def formats(self) -> tuple[str, ...]:
        """Formats tried per file, in order."""
        other = [f for f in EXTENSIONS if f != self.format]
        return (self.format, *other) if self.fallback else (self.format,)


PRESETS: dict[str, DownloadConfig] = {
    "default": DownloadConfig(),
    # A first look: 4 images, 2 threads.
    "smoke": DownloadConfig(limit=4, workers=2, per_host=2),
}


class PermanentHTTPError(Exception):
    """An answer that another attempt will not change (404, 403, 410, other 4xx)."""


def retry_after_seconds(value: str | None) -> float | None:
    """An HTTP Retry-After header (seconds or an HTTP date) -> seconds from now, or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Host:
    """The limits of one host: a semaphore of `per_host` slots and an optional request rate."""

    def __init__(self, per_host: int, rate: float):
        self.slots = threading.BoundedSemaphore(per_host)
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait_turn(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class Http:
    """Thread-safe GETs: one `requests.Session` per thread, the per-host limits, a status rule."""

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self._local = threading.local()
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0

    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            import requests
            from requests.adapters import HTTPAdapter

            s = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self.cfg.per_host, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.headers["User-Agent"] = USER_AGENT
            self._local.session = s
        return s

    def _host(self, url: str) -> _Host:
        netloc = urlsplit(url).netloc
        with self._lock:
            if netloc not in self._hosts:
                self._hosts[netloc] = _Host(self.cfg.per_host, self.cfg.rate)
            return self._hosts[netloc]

    def get(self, url: str) -> bytes:
        """The body of a 200 answer; TransientError (408, 429, 5xx, a short body) or
        PermanentHTTPError (other codes); requests' own errors for timeouts and resets."""
        host = self._host(url)
        with host.slots:
            host.wait_turn()
            with self._lock:
                self.requests += 1
            timeout = (self.cfg.timeout, self.cfg.timeout)
            with self._session().get(url, timeout=timeout, stream=True) as resp:
                code = resp.status_code
                if code == 200:
                    data = resp.content  # a body cut short raises (urllib3 enforces Content-Length)
                    expected = resp.headers.get("Content-Length")
                    if (expected and expected.isdigit() and "Content-Encoding" not in resp.headers
                            and len(data) != int(expected)):
                        raise retry.TransientError(f"truncated body: {len(data)} of {expected} bytes")
                    return data
                reason = f"HTTP {code} {resp.reason or ''}".strip()
                if code in (408, 425, 429) or code >= 500:
                    raise retry.TransientError(reason, retry_after_seconds(resp.headers.get("Retry-After")))
                raise PermanentHTTPError(reason)

    def count_retry(self, err: BaseException, wait: float) -> None:
        with self._lock:
            self.retries += 1


def verify(data: bytes, url: str, color: str) -> None:
    """Raise ImageLoadError unless `data` decodes as an image (a JPEG must also be whole)."""
    decode_channel(data, path=url, channel=color)
    if data[:3] == b"\xff\xd8\xff" and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        raise ImageLoadError(f"{url}: truncated JPEG (no end-of-image marker)", path=url)


@dataclass
class FileOutcome:
    image_id: str
    color: str
    name: str = ""  # final file name when it arrived
    nbytes: int = 0
    fallback: bool = False
    error: str = ""  # why it did not arrive (one reason per format tried)


def fetch_file(http: Http, cfg: DownloadConfig, item: public_list.Item, color: str) -> FileOutcome:
    """Fetch, verify and store one channel file, trying each format in turn."""
    reasons = []
    for fmt in cfg.formats():
        ext = EXTENSIONS[fmt]
        url = f"{item.url}_{color}{ext}"

        def get_verified() -> bytes:
            data = http.get(url)
            verify(data, url, color)
            return data

        try:
            data = retry.call(get_verified, what=url, tries=cfg.tries, backoff=cfg.backoff,
                              on_retry=http.count_retry)
        except PermanentHTTPError as err:
            reasons.append(f"{fmt}: {err}")
            continue
        except ImageLoadError as err:
            reasons.append(f"{fmt}: not an image ({err})")
            continue
        except Exception as err:  # noqa: BLE001 - transient ones are a failure, the rest a bug
            if not (retry.is_transient(err) or _is_request_error(err)):
                raise
            what = str(err) if isinstance(err, retry.TransientError) else f"{type(err).__name__}: {err}"
            reasons.append(f"{fmt}: {what} (after {cfg.tries} tries)")
            continue
        name = f"{item.image_id}_{color}{ext}"
        storage.write_bytes(storage.join(cfg.out, name), data)
        return FileOutcome(item.image_id, color, name, len(data), fallback=fmt != cfg.format)
    return FileOutcome(item.image_id, color, error="; ".join(reasons))


def _is_request_error(err: BaseException) -> bool:
    """requests' errors about one URL (a bad URL, too many redirects): that file fails."""
    import requests

    return isinstance(err, requests.exceptions.RequestException)


@dataclass
class DownloadResult:
    out: str
    report: dict
    failed: list[dict] = field(default_factory=list)  # {"id", "files": {color: reason}}

    @property
    def exit_code(self) -> int:
        return EXIT_FAILURES if self.failed else EXIT_OK

    def summary(self) -> str:
        r = self.report
        im, fl = r["images"], r["files"]
        lines = [
            f"{self.out}: {im['whole']} of {im['selected']} images whole "
            f"({im['whole_before']} already there); {fl['fetched']} files fetched "
            f"({r['bytes'] / 1e6:.1f} MB in {r['seconds']:.1f} s, {r['mb_per_s']:.2f} MB/s), "
            f"{fl['fallback']} in the other format, {r['requests']} requests, {r['retries']} retries",
            f"selection: {r['selection']['summary']}",
        ]
        if self.failed:
            lines.append(f"{len(self.failed)} images failed (also in {REPORT_FILE}; the same command "
                         "again fetches only what is missing):")
            for f in self.failed:
                why = "; ".join(f"{c}: {reason}" for c, reason in f["files"].items())
                lines.append(f"  {f['id']}: {why}")
        else:
            lines.append("0 failed")
        return "\n".join(lines)


def _clean_partials(out: str, names: list[str], log: Callable[[str], None]) -> None:
    """Remove temporary files a killed run left (local DEST; gs:// uploads are atomic)."""
    if storage.is_gcs(out):
        return
    stale = [n for n in names if n.startswith(TMP_PREFIX)]
    for n in stale:
        os.unlink(os.path.join(out, n))
    if stale:
        log(f"removed {len(stale)} temporary file(s) left by an interrupted run")


def _present(names: set[str], image_id: str, color: str) -> str:
    for ext in EXTENSIONS.values():
        if f"{image_id}_{color}{ext}" in names:
            return f"{image_id}_{color}{ext}"
    return ""


def download(cfg: DownloadConfig, progress: bool = True,
             log: Callable[[str], None] = print) -> DownloadResult:
    """Fetch what `cfg` selects into `cfg.out` (only what is missing); write labels.csv and the
    report. Raises ListError / ValueError on a list it cannot read; an error that is not a
    file's (a bug, a full disk) stops the run, and what arrived so far stays."""
    from tqdm import tqdm

    if not cfg.image_list or not cfg.out:
        raise ValueError("both --list and --out are needed")
    sel = public_list.select(cfg.image_list, base_url=cfg.base_url, include_trainset=cfg.include_trainset,
                             keep_unlabelled=cfg.keep_unlabelled, celllines=cfg.cellline, limit=cfg.limit)
    log(sel.summary())
    storage.makedirs(cfg.out)
    listing = storage.listdir(cfg.out)
    _clean_partials(cfg.out, listing, log)
    names = set(listing)
    todo = [(item, c) for item in sel.items for c in CHANNELS if not _present(names, item.image_id, c)]
    whole_before = sum(all(_present(names, it.image_id, c) for c in CHANNELS) for it in sel.items)
    if len(todo) < len(sel.items) * len(CHANNELS):
        log(f"resuming: {len(sel.items) * len(CHANNELS) - len(todo)} files already in {cfg.out}, "
            f"{len(todo)} to fetch")

    http = Http(cfg)
    outcomes: dict[tuple[str, str], FileOutcome] = {}
    nbytes = 0
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(cfg.workers, thread_name_prefix="download") as pool, \
            tqdm(total=len(todo), unit="file", desc="download", disable=not progress, smoothing=0.1) as bar:
        pending: set[cf.Future] = set()
        failed_files = 0

        def collect(done) -> None:
            nonlocal nbytes, failed_files
            for fut in done:
                o = fut.result()  # a bug in a worker stops the run here
                outcomes[(o.image_id, o.color)] = o
                nbytes += o.nbytes
                failed_files += bool(o.error)
                bar.update(1)
                rate = nbytes / max(1e-9, time.perf_counter() - start)
                bar.set_postfix_str(f"{rate / 1e6:.2f} MB/s, {failed_files} failed", refresh=False)

        try:
            for item, color in todo:
                if len(pending) >= 2 * cfg.workers:
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    collect(done)
                pending.add(pool.submit(fetch_file, http, cfg, item, color))
            while pending:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                collect(done)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    seconds = time.perf_counter() - start

    rows, failed, fallback = [], [], []
    for item in sel.items:
        files = {}
        for c in CHANNELS:
            o = outcomes.get((item.image_id, c))
            if o is not None and o.error:
                files[c] = o.error
            elif o is not None and o.fallback:
                fallback.append(o.name)
        if files:
            failed.append({"id": item.image_id, "origin": item.origin, "url": item.url, "files": files})
        else:
            rows.append(item)
    labels_text = labellib.format_label_rows(
        ["ID", "Label", "Cellline"],
        ((it.image_id, labellib.format_labels(it.labels), it.cellline) for it in rows))
    storage.write_text(storage.join(cfg.out, LABELS_FILE), labels_text)

    fetched = sum(1 for o in outcomes.values() if not o.error)
    report = {
        "list": cfg.image_list,
        "out": cfg.out,
        "config": cfglib.to_dict(cfg),
        "selection": {"rows": sel.rows, "layout": sel.layout, "selected": len(sel.items),
                      "dropped": sel.dropped, "filters": sel.filters, "bad_rows": sel.bad_rows,
                      "summary": sel.summary()},
        "images": {"selected": len(sel.items), "whole": len(rows), "whole_before": whole_before,
                   "failed": len(failed)},
        "files": {"to_fetch": len(todo), "fetched": fetched, "failed": len(todo) - fetched,
                  "already_present": len(sel.items) * len(CHANNELS) - len(todo),
                  "fallback": len(fallback)},
        "fallback_files": fallback,
        "bytes": nbytes,
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / 1e6 / seconds, 3) if seconds > 0 else 0.0,
        "requests": http.requests,
        "retries": http.retries,
        "failed": failed,
        "licence": "HPA images (c) the Human Protein Atlas, www.proteinatlas.org, CC BY-SA 3.0: "
                   "credit the Human Protein Atlas and share alike",
    }
    storage.write_text(storage.join(cfg.out, REPORT_FILE), json.dumps(report, indent=1) + "\n")
    return DownloadResult(cfg.out, report, failed)


def read_report(out: str) -> dict | None:
    """The report a download left in `out`, or None."""
    path = storage.join(out, REPORT_FILE)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))
