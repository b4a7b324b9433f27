"""common.retry: which errors count as transient, and retrying them with backoff."""
from __future__ import annotations

import errno

import pytest

from common import retry
from common.images import ImageLoadError


def test_transient_errors_are_told_apart_from_data_and_code_errors():
    from google.api_core import exceptions

    transient = [OSError(errno.EIO, "Input/output error"), OSError(errno.ETIMEDOUT, "timed out"),
                 TimeoutError("read timed out"), ConnectionResetError(errno.ECONNRESET, "reset"),
                 exceptions.ServiceUnavailable("503"), exceptions.TooManyRequests("429"),
                 exceptions.InternalServerError("500"), exceptions.GatewayTimeout("504")]
    lasting = [FileNotFoundError(errno.ENOENT, "no such file"), PermissionError(errno.EACCES, "denied"),
               ImageLoadError("x.png: corrupt or truncated PNG file"), ValueError("bad"),
               TypeError("a bug"), exceptions.NotFound("404"), exceptions.Forbidden("403"), KeyError("k")]
    assert [retry.is_transient(e) for e in transient] == [True] * len(transient)
    assert [retry.is_transient(e) for e in lasting] == [False] * len(lasting)
    wrapped = RuntimeError("while reading")
    wrapped.__cause__ = OSError(errno.EIO, "Input/output error")
    assert retry.is_transient(wrapped)


def test_call_retries_transient_errors_only_and_reads_its_settings(monkeypatch):
    monkeypatch.setenv(retry.BACKOFF_ENV, "0")
    monkeypatch.setenv(retry.TRIES_ENV, "3")
    calls = []

    def flaky(fails, err):
        calls.append(1)
        if len(calls) <= fails:
            raise err
        return "ok"

    assert retry.call(flaky, 2, OSError(errno.EIO, "eio")) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(OSError, match="eio"):
        retry.call(flaky, 5, OSError(errno.EIO, "eio"))  # out of tries: the last error, unchanged
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ValueError):
        retry.call(flaky, 5, ValueError("bad data"))  # never retried
    assert len(calls) == 1
    calls.clear()
    assert retry.call(flaky, 1, TimeoutError("t"), tries=2, backoff=0.0) == "ok" and len(calls) == 2


def test_a_transient_error_may_ask_for_a_longer_wait_and_on_retry_sees_each_one(monkeypatch):
    waits, slept = [], []
    monkeypatch.setattr(retry.time, "sleep", slept.append)
    calls = []

    def busy():
        calls.append(1)
        if len(calls) == 1:
            raise retry.TransientError("HTTP 429", retry_after=7.0)
        if len(calls) == 2:
            raise retry.TransientError("HTTP 503")  # no Retry-After: our own backoff
        return "ok"

    assert retry.is_transient(retry.TransientError("x"))
    assert retry.call(busy, tries=3, backoff=0.01, on_retry=lambda e, w: waits.append(w)) == "ok"
    assert waits == slept and waits[0] == 7.0 and waits[1] < 0.05
    # A server asking for an hour is capped.
    calls.clear()
    waits.clear()
    retry.call(busy, tries=3, backoff=0.0, on_retry=lambda e, w: waits.append(w))
    assert waits[0] == 7.0
    err = retry.TransientError("HTTP 429", retry_after=3600)
    with pytest.raises(retry.TransientError):
        retry.call(lambda: (_ for _ in ()).throw(err), tries=2, backoff=0.0,
                   on_retry=lambda e, w: waits.append(w))
    assert waits[-1] == retry.MAX_RETRY_AFTER
