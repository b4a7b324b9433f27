"""The one ordered, bounded worker pool: `map(fn, items)` computed ahead by threads or processes.

Used by the TFRecord builder (processes over images) and by `predict`'s readers (threads, or
processes). Results come back in submission order, whatever order the workers finish in, and
at most `depth` items are submitted and not yet handed to the consumer, so memory is bounded by
the pool, not by the number of items. An error in `fn` is raised to the consumer at that item's
turn, with its traceback; the pool then cancels what has not started and waits for what has, so
no worker outlives the call (also on KeyboardInterrupt, and when the consumer stops early).

Processes are spawned, never forked: the parent may already hold TensorFlow's threads or a GPU
context, which fork does not copy safely.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
from typing import Callable, Iterable, Iterator


class Pool:
    """`workers` threads (or spawned processes) that run `imap` calls in order, bounded.

    depth: items in flight per `imap` (submitted, result not yet yielded); default
    `2 * workers`. workers=0 runs every item inline in the caller, one at a time.
    initializer/initargs: run once in each worker (e.g. a parent-death watchdog).
    Use as a context manager; `imap` may be called several times on one pool.
    """

    def __init__(self, workers: int, *, processes: bool = False, depth: int | None = None,
                 initializer: Callable | None = None, initargs: tuple = (), name: str = "pool"):
        self.workers = max(0, int(workers))
        self.processes = bool(processes)
        self.depth = max(1, int(depth or 2 * self.workers))
        self._initializer, self._initargs, self._name = initializer, tuple(initargs), name
        self._executor: cf.Executor | None = None

    def __enter__(self) -> "Pool":
        if self.workers > 0 and self._executor is None:
            if self.processes:
                import multiprocessing

                self._executor = cf.ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=self._initializer, initargs=self._initargs)
            else:
                self._executor = cf.ThreadPoolExecutor(
                    self.workers, thread_name_prefix=self._name,
                    initializer=self._initializer, initargs=self._initargs)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Cancel what has not started, wait for what has; idempotent."""
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=True, cancel_futures=True)

    def imap(self, fn: Callable, items: Iterable) -> Iterator:
        """`fn(item)` for each item, yielded in the items' order; at most `depth` in flight."""
        if self.workers == 0:
            for item in items:
                yield fn(item)
            return
        if self._executor is None:
            raise RuntimeError("Pool.imap outside `with Pool(...)`")
        pending: collections.deque = collections.deque()
        it = iter(items)
        try:
            for item in it:
                pending.append(self._executor.submit(fn, item))
                if len(pending) >= self.depth:
                    break
            while pending:
                result = pending.popleft().result()
                for item in it:  # refill one: the bound holds while the consumer works
                    pending.append(self._executor.submit(fn, item))
                    break
                yield result
        finally:  # error, KeyboardInterrupt or an early stop: nothing queued runs after us
            for fut in pending:
                fut.cancel()


def ordered_map(fn: Callable, items: Iterable, workers: int = 2, *, depth: int | None = None,
                processes: bool = False, name: str = "pool") -> Iterator:
    """One-shot `Pool(workers, ...).imap(fn, items)`; the pool shuts down when the iterator
    ends, raises, or is closed (`.close()`, or a `for` loop left by `break` and collected)."""
    with Pool(workers, processes=processes, depth=depth, name=name) as pool:
        yield from pool.imap(fn, items)
