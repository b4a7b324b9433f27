"""Transient I/O errors: which ones they are, and one helper that retries them with backoff.

Used by `predict` (infer_gpu) and the builder (tfrecords_builder) around reading an image, so
a flaky disk, NFS mount or `gs://` connection does not turn an image into a failure at once,
and by the downloader (`tfrecords_builder download`) around each HTTP request, where a server
may also say when to come back (`TransientError.retry_after`, an HTTP 429's Retry-After).
An image whose data is bad (`common.images.ImageLoadError`) is never retried: it is the file.

Settings (environment, read at each call): `HPA_IO_TRIES` (attempts in all, default 4) and
`HPA_IO_BACKOFF` (seconds before the second attempt, doubled each time, default 1).
"""
from __future__ import annotations

import errno
import logging
import os
import random
import time
from typing import Callable, TypeVar

log = logging.getLogger("hpa.retry")

TRIES_ENV = "HPA_IO_TRIES"
BACKOFF_ENV = "HPA_IO_BACKOFF"
DEFAULT_TRIES = 4
DEFAULT_BACKOFF = 1.0  # seconds; then 2, 4, ... (capped at MAX_DELAY)
MAX_DELAY = 30.0
MAX_RETRY_AFTER = 300.0  # seconds: the longest wait a server's Retry-After may ask of us

# errno values of a read that may work when tried again (a busy or flaky device, a network
# file system, a connection); ENOENT, EACCES, EISDIR, ... are not among them.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EIO", "EAGAIN", "EINTR", "EBUSY", "ETIMEDOUT", "ECONNRESET", "ECONNABORTED",
        "ECONNREFUSED", "ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTUNREACH", "EHOSTDOWN",
        "EPIPE", "ESTALE", "ENOLINK", "ECOMM", "EPROTO", "EREMOTEIO",
    ) if hasattr(errno, name))

T = TypeVar("T")


class TransientError(Exception):
    """An error its raiser knows to be transient (an HTTP 408, 429 or 5xx answer).

    retry_after: seconds the other side asked us to wait before the next attempt (None: our
    own backoff); `call` waits at least that long, at most MAX_RETRY_AFTER.
    """

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def is_transient(err: BaseException) -> bool:
    """True for an error that another attempt may not meet: a timeout, a dropped connection,
    EIO and the like, an HTTP 408/429/5xx from Cloud Storage, or a `google.api_core` retry
    that ran out of time. Missing files, bad data and bugs are not transient."""
    if isinstance(err, (TimeoutError, ConnectionError, TransientError)):
        return True
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        if err.errno in TRANSIENT_ERRNOS:
            return True
    module = type(err).__module__ or ""
    if module.startswith("google.api_core"):
        from google.api_core import exceptions

        if isinstance(err, (exceptions.TooManyRequests, exceptions.ServerError, exceptions.RetryError)):
            return True
        code = getattr(err, "code", None)
        return code in (408, 429) or (isinstance(code, int) and code >= 500)
    if module.startswith(("requests", "urllib3", "google.auth")):
        name = type(err).__name__
        return name in ("ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout",
                        "ChunkedEncodingError", "ProtocolError", "ReadTimeoutError",
                        "TransportError", "NewConnectionError", "MaxRetryError")
    cause = err.__cause__ or err.__context__
    return cause is not None and cause is not err and is_transient(cause)


def settings() -> tuple[int, float]:
    """`(tries, first backoff in seconds)` from the environment (see the module docstring)."""
    tries = int(os.environ.get(TRIES_ENV, "") or DEFAULT_TRIES)
    backoff = float(os.environ.get(BACKOFF_ENV, "") or DEFAULT_BACKOFF)
    return max(1, tries), max(0.0, backoff)


def call(fn: Callable[..., T], *args, what: str = "", tries: int | None = None,
         backoff: float | None = None, on_retry: Callable[[BaseException, float], None] | None = None,
         **kwargs) -> T:
    """`fn(*args, **kwargs)`, tried again after a transient error (`is_transient`), waiting
    `backoff`, `2 * backoff`, ... seconds (with jitter, at most MAX_DELAY), or the error's own
    `retry_after` when it asks for longer (at most MAX_RETRY_AFTER). `on_retry(err, wait)` is
    called before each wait (counting, logging). Any other error, and the last transient one,
    is raised unchanged."""
    default_tries, default_backoff = settings()
    tries = default_tries if tries is None else max(1, tries)
    delay = default_backoff if backoff is None else backoff
    for attempt in range(1, tries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - filtered just below
            if attempt == tries or not is_transient(err):
                raise
            wait = min(MAX_DELAY, delay * (2 ** (attempt - 1))) * (0.5 + random.random() / 2)
            asked = getattr(err, "retry_after", None)
            if asked is not None:
                wait = max(wait, min(MAX_RETRY_AFTER, float(asked)))
            if on_retry is not None:
                on_retry(err, wait)
            log.warning("%s: %s: %s; try %d of %d in %.1f s", what or getattr(fn, "__name__", "call"),
                        type(err).__name__, err, attempt + 1, tries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
