"""Run a function on several local gloo processes (tests, examples, quick experiments).

``run_local(fn, world_size, *args)`` spawns ``world_size`` processes, gives each a gloo process
group over a temporary ``FileStore`` and returns the list of ``fn(rank, world_size, *args)``
results. Every wait is bounded: collectives by ``timeout_s`` (the process group's timeout) and
the whole run by ``deadline_s``, so a hung rank raises instead of hanging its caller. Ranks that
are still alive after a failure are killed.

Processes are forked where the platform allows (no second import of torch: a spawn costs seconds
per rank), each limited to ``threads`` intra-op threads; ``start_method="spawn"`` is the
alternative, and then ``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta


class RanksFailed(RuntimeError):
    """A rank raised, died or did not finish in time; the message holds each rank's story."""


def _worker(fn, rank, world_size, store_path, timeout_s, threads, args, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)  # several ranks share the machine's cores
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        try:
            results.put((rank, "ok", fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, "error", traceback.format_exc()))


def run_local(fn, world_size: int, *args, timeout_s: float = 30.0, deadline_s: float = 120.0,
              threads: int = 1, start_method: str | None = None) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each run in its own
    process with ``torch.distributed`` initialised (gloo). Raises ``RanksFailed`` if any rank raises,
    dies or is still running after ``deadline_s``."""
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"run_local: world_size must be >= 1, got {world_size}")
    if start_method is None:
        start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="effllm-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, store_path, timeout_s, threads, args, results),
                             daemon=True) for rank in range(world_size)]
        for p in procs:
            p.start()
        outcome, errors = {}, {}
        stop_at = time.monotonic() + deadline_s
        try:
            while len(outcome) + len(errors) < world_size:
                left = stop_at - time.monotonic()
                if left <= 0:
                    break
                try:
                    rank, status, value = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                            and r not in outcome and r not in errors]
                    for r in dead:
                        errors[r] = f"process exited with code {procs[r].exitcode} without reporting"
                    continue
                (outcome if status == "ok" else errors)[rank] = value
                if errors:  # the others would wait on the failed rank until their timeout
                    stop_at = min(stop_at, time.monotonic() + 2.0)
        finally:
            for p in procs:  # every rank has reported (or failed): only its exit is left to wait for
                p.join(timeout=1.0)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5.0)
    if errors or len(outcome) < world_size:
        missing = [r for r in range(world_size) if r not in outcome and r not in errors]
        story = [f"rank {r}: {errors[r]}" for r in sorted(errors)]
        story += [f"rank {r}: no result within {deadline_s:.0f} s (killed)" for r in missing]
        raise RanksFailed(f"run_local: {len(story)} of {world_size} ranks failed\n" + "\n".join(story))
    return [outcome[r] for r in range(world_size)]


def _run_checks(rank, world_size, checks):
    import torch.distributed as dist

    failures = {}
    for check in checks:
        try:
            check(dist.group.WORLD)
            failures[check.__name__] = None
        except AssertionError:
            failures[check.__name__] = traceback.format_exc()
        # Any other exception propagates: this rank stops, and run_local reports it with the others.
    return failures


def run_checks(checks, world_size: int, **kwargs) -> dict[str, list[str]]:
    """Run each ``check(group)`` in order on every rank of one ``run_local`` group (one spawn for many
    checks); returns ``{check name: [failure messages, one per failing rank]}``. A check compares only
    after its collectives are done, so a failed comparison on one rank does not desynchronise the
    others; any exception other than ``AssertionError`` ends the run (``RanksFailed``)."""
    per_rank = run_local(_run_checks, world_size, list(checks), **kwargs)
    return {check.__name__: [f"rank {r}: {per_rank[r][check.__name__]}" for r in range(world_size)
                             if per_rank[r][check.__name__]] for check in checks}
