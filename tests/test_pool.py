"""common.pool: the one ordered, bounded worker pool (builder and predict's readers)."""
from __future__ import annotations

import operator
import threading
import time

import pytest

from common.pool import Pool, ordered_map


class _Work:
    """Squares its item after a delay that makes items finish out of order; counts starts."""

    def __init__(self):
        self.started, self.lock = [], threading.Lock()

    def __call__(self, i):
        with self.lock:
            self.started.append(i)
        time.sleep(0.01 * ((7 * i) % 3))
        return i * i


def test_results_come_in_submission_order_with_at_most_depth_in_flight():
    work = _Work()
    out = []
    for i, value in enumerate(ordered_map(work, range(20), workers=3, depth=4)):
        with work.lock:
            assert len(work.started) <= i + 1 + 4  # never more than `depth` ahead of the consumer
        out.append(value)
    assert out == [i * i for i in range(20)]
    assert sorted(work.started) == list(range(20))


def test_inline_and_processes_give_the_same_results():
    assert list(ordered_map(operator.neg, range(5), workers=0)) == [0, -1, -2, -3, -4]
    assert list(ordered_map(operator.neg, range(6), workers=2, processes=True)) == [0, -1, -2, -3, -4, -5]


def test_a_pool_serves_several_maps_and_refuses_use_after_close():
    pool = Pool(2, depth=3)
    with pool:
        assert list(pool.imap(operator.neg, range(4))) == [0, -1, -2, -3]
        assert list(pool.imap(str, [7, 8])) == ["7", "8"]
    with pytest.raises(RuntimeError, match="outside"):
        list(pool.imap(str, [1]))


def test_an_error_reaches_the_consumer_in_order_and_nothing_queued_runs_after_it():
    started, lock = [], threading.Lock()

    def bad(i):
        with lock:
            started.append(i)
        if i == 3:
            raise RuntimeError("boom at 3")
        return i

    got = []
    with pytest.raises(RuntimeError, match="boom at 3"):
        for value in ordered_map(bad, range(100), workers=2, depth=4):
            got.append(value)
    assert got == [0, 1, 2]  # every earlier result first, in order
    time.sleep(0.05)
    assert max(started) < 3 + 4 + 1  # the rest was cancelled, not run


def test_an_interrupted_consumer_stops_the_pool():
    work = _Work()
    it = ordered_map(work, range(1000), workers=2, depth=3)
    with pytest.raises(KeyboardInterrupt):
        for value in it:
            if value == 4:
                raise KeyboardInterrupt
    it.close()  # what leaving the loop does to a generator
    n = len(work.started)
    time.sleep(0.05)
    assert len(work.started) == n and n <= 2 + 1 + 3  # no worker keeps going
    assert not [t for t in threading.enumerate() if t.name.startswith("pool")]
