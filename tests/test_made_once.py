"""tests/conftest.py `made_once`: what several pytest-xdist workers need (the learning tests'
data and demo run) is made by one of them while the others wait, and a failure is not retried."""
from __future__ import annotations

import multiprocessing
import time

import pytest

from tests.conftest import made_once


def _make_slowly(log):
    def make(out):
        with open(log, "a") as f:
            f.write("made\n")
        time.sleep(0.5)  # the others arrive while it is being made
        out.mkdir()
        (out / "x").write_text("1")
    return make


def test_processes_asking_at_once_make_it_once_and_all_see_it(tmp_path_factory, tmp_path):
    log = tmp_path / "log"
    name = f"made_once_{tmp_path.name}"
    ctx = multiprocessing.get_context("fork")  # the children keep tmp_path_factory
    procs = [ctx.Process(target=made_once, args=(tmp_path_factory, name, _make_slowly(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    out = made_once(tmp_path_factory, name, _make_slowly(log))  # made already: not again
    assert (out / "x").read_text() == "1"
    assert log.read_text() == "made\n"


def test_a_failure_is_recorded_and_not_made_again(tmp_path_factory, tmp_path):
    name = f"made_once_bad_{tmp_path.name}"

    def boom(out):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        made_once(tmp_path_factory, name, boom)
    log = tmp_path / "log"
    with pytest.raises(pytest.fail.Exception, match="failed on another worker: RuntimeError: disk full"):
        made_once(tmp_path_factory, name, _make_slowly(log))
    assert not log.exists()
