"""Independent runs side by side on one machine: at most ``jobs`` worker processes (spawned, so
no thread pool is inherited half-initialised), the CPU cores split between them, and one failed
run that does not stop the others."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

import torch

from kdad.config import LaunchConfig
from kdad.errors import KdadError


def cores_per(n: int) -> int:
    """Each of ``n`` processes' share of this machine's cores (at least one)."""
    return max(1, (os.cpu_count() or 1) // n)


def _limit_threads(threads: int) -> None:
    """Worker start-up: this worker's share of the cores."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _call(fn: Callable[[Any], Any], item: Any) -> tuple[Any, str | None, float]:
    """``fn(item)``, with a KdadError (bad input, a run that exists) returned as its message,
    and the seconds it took."""
    tic = time.perf_counter()
    try:
        return fn(item), None, time.perf_counter() - tic
    except KdadError as e:
        return None, str(e), time.perf_counter() - tic


def run_parallel(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    jobs: int = LaunchConfig.jobs,
    describe: Callable[[Any], str] = str,
    log: Callable[[str], None] | None = print,
) -> tuple[dict[int, Any], dict[int, str]]:
    """``fn(item)`` for every item, ``jobs`` at a time: in this process when ``jobs`` is 1,
    else in worker processes each given ``cores // jobs`` threads (``fn`` must be a module-level
    function). Returns (results, errors), each keyed by the item's index; a KdadError fails only
    its item. ``log`` gets a line as each item ends."""
    if jobs < 1:
        raise KdadError(f"jobs must be at least 1, got {jobs}")
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}

    def record(i: int, value: Any, error: str | None, seconds: float) -> None:
        if error is None:
            results[i] = value
        else:
            errors[i] = error
        if log is not None:
            done = len(results) + len(errors)
            what = f"failed: {error}" if error else f"done in {seconds:.0f} s"
            log(f"[{done}/{len(items)}] {describe(items[i])}: {what}")

    if jobs == 1:
        for i, item in enumerate(items):
            record(i, *_call(fn, item))
        return results, errors
    threads = cores_per(jobs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, ctx, _limit_threads, (threads,)) as pool:
        index = {pool.submit(_call, fn, item): i for i, item in enumerate(items)}
        pending = set(index)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                record(index[future], *future.result())
    return results, errors
