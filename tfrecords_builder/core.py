"""The build core shared by both engines (local processes, Apache Beam): plan, resume, finish.

Output folder (local or gs://):
    preprocess.json          the Preprocess of every tile (written first)
    fold{K}-{i:05d}-of-{n:05d}.tfrec   complete shards only
    manifest.json            written last: its presence means the build is complete
    _build/plan.json         state while building: config, folds, each shard's image list
    _build/done/{shard}.json one per published shard: its counts and skipped images
A resume (the same command again, with either engine) reads the plan, keeps every shard whose
`done` record has no skipped image and rebuilds the others, so an image that failed (a read
error, a corrupt file since replaced) is tried again; records are deterministic, so the result
equals an uninterrupted run's. `_build/` is removed once the manifest is written with no image
skipped at decode time; otherwise it stays, and the same command again retries those shards
(the manifest is removed while it does, so its presence still means "complete").

An engine runs: `read_cell_labels` -> `load_finished` (done already?) -> `check_segmenter` ->
`load_or_make_plan` (the pilot decodes a few images through a `Runner`) -> `shards_to_build` ->
decode and write those shards, each published with `write_done` -> `finish` (the manifest).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from common import shard_folder, storage
from common.pool import Pool
from common.resume import check_same_settings
from common.segmentation import WORK_SIZE
from tfrecords_builder import cell_targets
from tfrecords_builder import manifest as manifestlib
from tfrecords_builder import plan as planlib
from tfrecords_builder.config import RUNTIME_FIELDS, BuildConfig
from tfrecords_builder.worker import Job, Result, Task, init_worker, process, segmentation_spec

STATE_DIR = "_build"
PLAN_FILE = "plan.json"
DONE_DIR = "done"
PILOT_IMAGES = 8  # images decoded up front to estimate bytes per image (shard planning)


class BuildError(Exception):
    """A build that cannot start or go on (bad config, an output folder holding something else)."""


@dataclass
class BuildResult:
    out: str
    manifest: dict
    shards_built: int  # in this run
    shards_reused: int  # finished by an earlier, interrupted run (or all, if already complete)
    write_s: float = 0.0  # seconds spent decoding and writing shards in this run
    images_written: int = 0  # images decoded in the write phase of this run (skipped ones included)

    @property
    def images_per_s(self) -> float:
        """Throughput of the decode-and-write phase of this run."""
        return self.images_written / self.write_s if self.write_s > 0 else 0.0

    @property
    def skipped(self) -> list[dict]:
        return self.manifest["skipped"]

    @property
    def exit_code(self) -> int:
        """0 when every image went in, 2 when some were skipped."""
        return 2 if self.skipped else 0

    def summary(self) -> str:
        t = self.manifest["totals"]
        lines = [
            f"{self.out}: {t['examples']} examples from {t['images']} images in {t['shards']} shards "
            f"({self.manifest['config']['folds']} folds, {t['bytes'] / 1e6:.1f} MB); "
            f"{self.shards_built} shards built now, {self.shards_reused} reused"
        ]
        if self.images_written:
            lines[0] += f" ({self.images_per_s:.1f} images/s)"
        if self.skipped:
            lines.append(f"{len(self.skipped)} skipped (all reasons in {shard_folder.MANIFEST_FILE}):")
            for s in self.skipped[:5]:
                lines.append(f"  {s['id'] or '<no ID>'} ({s['origin']}): {s['reason']}")
            if len(self.skipped) > 5:
                lines.append(f"  ... and {len(self.skipped) - 5} more")
        else:
            lines.append("0 skipped")
        return "\n".join(lines)


class Runner:
    """Runs `process` over tasks in order, in W spawned processes (W = 0: in this process).

    At most 2W tasks are in flight, so memory is bounded by the workers, not the dataset
    (`common.pool.Pool`, which spawns: TensorFlow, maybe loaded by the caller, and fork do not mix).
    """

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = Pool(workers, processes=True, depth=2 * max(1, workers), name="builder",
                          initializer=init_worker, initargs=(os.getpid(),))

    def __enter__(self) -> "Runner":
        self._pool.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._pool.close()

    def imap(self, tasks: Iterable[Task]) -> Iterator[Result]:
        return self._pool.imap(process, tasks)


def job(cfg: BuildConfig) -> Job:
    """What every task of the build shares (`worker.Job`), from its config."""
    return Job(mode=cfg.mode, spec=cfg.preprocess().to_dict(), masks=cfg.masks, segmenter=cfg.segmenter,
               nuclei_model=cfg.nuclei_model, cell_model=cfg.cell_model,
               trust_model_files=cfg.trust_model_files, seed=cfg.seed, work_size=cfg.work_size)


def check_segmenter(cfg: BuildConfig) -> None:
    """Refuse at once (before any image is read) a segmenter that cannot run: the hpa backend
    without its model files, the permission to load them, PyTorch or hpacellseg."""
    if cfg.mode == "image" or cfg.masks or cfg.segmenter != "hpa":
        return
    from common.segmentation import hpa

    try:
        hpa.check_model_files(cfg.nuclei_model, cfg.cell_model, cfg.trust_model_files)
    except ValueError as err:
        raise BuildError(f"--segmenter hpa: {err}") from None


def read_cell_labels(cfg: BuildConfig):
    """The `--cell-labels` table (`common.cell_labels.CellLabels`), read and checked against the
    build's segmentation before any image is read; None without one. Raises
    `cell_labels.CellLabelsError` for an unreadable table (naming the file and line) and
    BuildError for one made with another segmentation (naming each difference)."""
    if not cfg.cell_labels:
        return None
    from common import cell_labels

    check_segmenter(cfg)  # the hpa spec fingerprints the model files
    table = cell_labels.read(cfg.cell_labels)
    spec = segmentation_spec(job(cfg))
    try:
        cell_labels.check_segmentation(table, spec, where=f"this build ({_segmentation_flags(cfg)})")
    except cell_labels.CellLabelsError as err:
        raise BuildError(f"--cell-labels {err}") from None
    return table


def _segmentation_flags(cfg: BuildConfig) -> str:
    if cfg.masks:
        return f"--masks {cfg.masks}"
    return f"--segmenter {cfg.segmenter}"


def image_targets(table, entries) -> dict | None:
    """Each planned image's rows of the table, for its Task (`cell_targets.per_image`); None
    without a table. A target for a class the image lacks is a BuildError naming the row."""
    if table is None:
        return None
    try:
        return cell_targets.per_image(table, entries)
    except ValueError as err:
        raise BuildError(f"--cell-labels {err}") from None


def make_task(e: planlib.Entry, job: Job, targets: dict | None) -> Task:
    """The Task of one planned image (with its cell labels when the build has them)."""
    return Task(e.image_id, e.source, tuple(e.labels), e.fold, job,
                None if targets is None else targets.get(e.image_id, ()))


def _content(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUNTIME_FIELDS}


def check_resume(saved: dict, cfg: BuildConfig, image_ids: Iterable[str], *, what: str, advice: str,
                 table=None) -> None:
    """`check_same_settings` of a saved build (a plan or a manifest) against `cfg`, for a build
    saved before --group-by too: it lacks `group_by` and its folds were per image. It then goes
    on with `--group-by image`, or with `auto` when auto finds no group of two or more images
    among its `image_ids` (e.g. all competition UUIDs); any other grouping is refused. One
    saved before --work-size segmented at the default `WORK_SIZE`."""
    saved = dict(saved)
    saved.setdefault("work_size", WORK_SIZE)  # a build saved before --work-size segmented at this one
    if "group_by" not in saved:
        per_image = cfg.group_by == planlib.PER_IMAGE or (
            cfg.group_by == planlib.AUTO
            and all(planlib.group_key(i, planlib.AUTO) == planlib.image_group(i) for i in image_ids))
        saved["group_by"] = cfg.group_by if per_image else planlib.PER_IMAGE
        if not per_image:
            advice = ("this build was made before --group-by, with per-image folds: pass --group-by "
                      "image to finish it")
    check_same_settings(saved, cell_targets.settings(cfg.content_dict(), table), where=cfg.out,
                        what=what, advice=advice)


def estimate_bytes_per_image(entries: list[planlib.Entry], job: Job, runner: Runner,
                             keep: dict | None = None, targets: dict | None = None) -> tuple[float, str]:
    """Mean record bytes per image over the first PILOT_IMAGES usable images (deterministic).

    The pilot's results go into `keep` ({id: Result}) so the build does not decode them again.
    """
    pilot = [make_task(e, job, targets) for e in entries[:PILOT_IMAGES]]
    results = list(runner.imap(pilot))
    if keep is not None:
        keep.update((r.image_id, r) for r in results)
    sizes = [r.nbytes for r in results if not r.error]
    if sizes:
        return sum(sizes) / len(sizes), f"mean of {len(sizes)} pilot images"
    # Nothing decodable in the pilot: assume uncompressed tiles (and ~20 cells per image).
    side = job.spec["size"]
    per_tile = side * side * 4
    return float(per_tile * (1 if job.mode == "image" else 20)), "fallback: uncompressed tiles"


def make_plan(cfg: BuildConfig, runner: Runner, keep: dict | None = None, table=None) -> planlib.Plan:
    """Read labels, reject bad rows, check the cell labels, assign folds, estimate sizes,
    assign shards."""
    entries, skipped = planlib.read_entries(cfg)
    if not entries:
        first = f"; first: {skipped[0]['origin']}: {skipped[0]['reason']}" if skipped else ""
        raise BuildError(f"no usable images in {', '.join(cfg.labels)} ({len(skipped)} rows rejected{first})")
    targets = image_targets(table, entries)  # refused before the pilot reads an image
    planlib.assign_folds(entries, cfg.folds, cfg.seed)
    bpi, how = estimate_bytes_per_image(entries, job(cfg), runner, keep, targets)
    plan = planlib.Plan(cell_targets.settings(cfg.content_dict(), table), entries, skipped,
                        bytes_per_image=bpi, estimate=how)
    plan.shards = planlib.assign_shards(entries, cfg.folds, bpi, cfg.shard_mb * 1e6, cfg.seed)
    return plan


def load_finished(cfg: BuildConfig, table=None) -> BuildResult | None:
    """The result of a build already complete in `cfg.out` (its manifest, checked against
    `cfg`), else None: no manifest, or one with skipped images whose state was kept to retry."""
    manifest = shard_folder.read_manifest(cfg.out)
    if manifest is None:
        return None
    ids = list(manifest.get("images", {})) + [s["id"] for s in manifest.get("skipped", []) if "fold" in s]
    check_resume(_content(manifest.get("config", {})), cfg, ids,
                 what="already holds a finished build with another config",
                 advice="choose another --out or delete it", table=table)
    if storage.exists(storage.join(cfg.out, STATE_DIR, PLAN_FILE)):
        return None  # finished with skipped images, whose state was kept to try them again
    return BuildResult(cfg.out, manifest, 0, len(manifest["shards"]))



def start(cfg: BuildConfig, log: Callable[[str], None]):
    """What both engines do first: `(table, finished)`, the --cell-labels table (None without
    it) and the result of a build already complete in `cfg.out` (then logged; else None, after
    the segmenter is checked, so a build that cannot segment stops before any work)."""
    table = read_cell_labels(cfg)
    finished = load_finished(cfg, table)
    if finished is not None:
        log(f"{cfg.out}: already complete")
        return table, finished
    check_segmenter(cfg)
    return table, None

def load_or_make_plan(cfg: BuildConfig, runner: Runner, log: Callable[[str], None],
                      keep: dict, table=None) -> planlib.Plan:
    """The saved plan of an unfinished build (checked against `cfg`), or a new one: made
    (`make_plan`, the pilot's results into `keep`), then preprocess.json and the plan written."""
    plan_path = storage.join(cfg.out, STATE_DIR, PLAN_FILE)
    if storage.exists(plan_path):
        plan = planlib.Plan.from_json(storage.read_text(plan_path))
        check_resume(plan.config, cfg, (e.image_id for e in plan.entries),
                     what="holds an unfinished build with another config",
                     advice="rerun that command to finish it, or choose another --out", table=table)
        return plan
    stray = [n for n in storage.listdir(cfg.out) if n.endswith(".tfrec")]
    if stray:
        raise BuildError(
            f"{cfg.out} already holds {len(stray)} shard(s) (e.g. {stray[0]}) but no build state; "
            "choose an empty --out"
        )
    plan = make_plan(cfg, runner, keep, table)
    storage.makedirs(cfg.out)
    shard_folder.write_spec(cfg.out, cfg.preprocess().replace(segmentation=segmentation_spec(job(cfg))))
    storage.write_text(plan_path, plan.to_json())
    groups = manifestlib.group_summary(plan, cfg)
    log(f"planned {len(plan.entries)} images into {len(plan.shards)} shards, {cfg.folds} folds "
        f"(~{plan.bytes_per_image / 1e3:.1f} kB per image, {plan.estimate}); {len(plan.skipped)} rows rejected; "
        f"{groups['count']} fold groups (--group-by {cfg.group_by}, largest {groups['largest']} images)")
    if groups["thin_classes"]:
        log("warning: " + manifestlib.thin_classes_text(groups["thin_classes"], cfg.folds))
    return plan


def shards_to_build(cfg: BuildConfig, plan: planlib.Plan, log: Callable[[str], None] = print) -> list[dict]:
    """The planned shards that this run must (re)build, for either engine, after clearing what a
    killed or partly skipped run left: its manifest (a retry is not complete until it ends) and
    local copies killed halfway (never under a final name)."""
    manifest_path = shard_folder.manifest_path(cfg.out)
    if storage.exists(manifest_path):  # retrying the skipped images of a finished build
        storage.delete(manifest_path)
    done_dir = storage.join(cfg.out, STATE_DIR, DONE_DIR)
    records = {n[: -len(".json")]: json.loads(storage.read_text(storage.join(done_dir, n)))
               for n in storage.listdir(done_dir) if n.endswith(".json") and not n.startswith(".tmp-")}
    # A shard with a skipped image is built again: the image may read now (a transient error,
    # a file since replaced), and the shard's bytes depend on which images went in.
    done = {name for name, rec in records.items() if not rec.get("skipped")}
    retried = sum(len(rec["skipped"]) for name, rec in records.items() if name not in done)
    todo = [s for s in plan.shards if s["name"] not in done]
    if records:
        log(f"resuming: {len(plan.shards) - len(todo)} of {len(plan.shards)} shards already done")
    if retried:
        log(f"trying again {retried} image(s) skipped by an earlier run "
            f"({len(records) - len(done)} shard(s) rebuilt)")
    if not storage.is_gcs(cfg.out):
        for name in storage.listdir(cfg.out):
            if name.endswith(storage.PARTIAL_SUFFIX):
                os.unlink(os.path.join(cfg.out, name))
    return todo


def finish(cfg: BuildConfig, plan: planlib.Plan, log: Callable[[str], None] = print, table=None) -> dict:
    """Every shard has its `done` record: write manifest.json from them, then remove `_build/`.

    Shared by both engines (local and Beam); returns the manifest. table: the --cell-labels
    table, summarised in the manifest's `cell_labels`.
    """
    state = storage.join(cfg.out, STATE_DIR)
    shard_records = {s["name"]: json.loads(storage.read_text(done_path(cfg.out, s["name"]))) for s in plan.shards}
    manifest = manifestlib.build_manifest(cfg, plan, shard_records, table)
    shard_folder.write_manifest(cfg.out, manifest)
    decode_skips = sum(len(rec["skipped"]) for rec in shard_records.values())
    if decode_skips:
        log(f"kept {state} so that the same command tries the {decode_skips} skipped image(s) again")
    else:
        for path in list(storage.iter_files(state)):
            storage.delete(path)
        if not storage.is_gcs(cfg.out):
            shutil.rmtree(state, ignore_errors=True)
    return manifest


def done_path(out: str, shard_name: str) -> str:
    """Where a published shard's `done` record lies: `OUT/_build/done/{shard}.json`."""
    return storage.join(out, STATE_DIR, DONE_DIR, shard_name + ".json")


def write_done(out: str, record: dict) -> None:
    """Save a published shard's record (`manifest.shard_record`); `finish` folds them in."""
    storage.write_text(done_path(out, record["name"]), json.dumps(record, sort_keys=True))
