"""The converted-model cache heals: damaged entries are rebuilt, concurrent builders do the work
once, and files follow the user's umask (a fake build stands in for the 30-second conversion)."""

import multiprocessing
import os
import stat

import pytest

from effllm.testing.models import COMPLETE_MARKER, ensure_cache_entry


def _build(folder):
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 1000)


def _waiters(lock_file):
    """Processes queued on ``lock_file``'s flock: /proc/locks lists a blocked waiter as "->"."""
    st = os.stat(lock_file)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as locks:
        return sum(1 for line in locks if "->" in line and line.split()[-3] == inode)


def _counting_build(log, lock_file):
    def build(folder):
        with open(log, "a") as f:
            f.write("built\n")
        # hold the lock until the other builder is queued on it (or, with a broken lock, builds
        # too, which the test then counts), or has ended (failed: its exit code fails the test),
        # so the two surely overlap. A wait on those events, not on a clock: nothing here is timed
        # or asserted on time; the loop only gives the CPU away between looks
        while _waiters(lock_file) == 0 and log.read_text().count("built") < 2 and "ended" not in log.read_text():
            os.sched_yield()
        _build(folder)
    return build


@pytest.mark.parametrize("damage", ["truncated", "missing file", "no marker"])
def test_a_damaged_entry_is_reported_and_rebuilt(tmp_path, damage):
    target = tmp_path / "entry"
    ensure_cache_entry(target, _build, what="test")
    if damage == "truncated":
        (target / "model.safetensors").write_bytes(b"x" * 10)
    elif damage == "missing file":
        (target / "config.json").unlink()
    else:
        (target / COMPLETE_MARKER).unlink()
    with pytest.warns(UserWarning, match="damaged"):
        ensure_cache_entry(target, _build, what="test")
    assert (target / "model.safetensors").stat().st_size == 1000 and (target / "config.json").is_file()
    ensure_cache_entry(target, lambda folder: pytest.fail("a complete entry must not be rebuilt"), what="test")


def test_a_failed_build_leaves_nothing_half_written(tmp_path):
    def broken(folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_cache_entry(tmp_path / "entry", broken, what="test")
    assert not (tmp_path / "entry").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["entry.lock"]


def _worker(target, log):
    try:
        ensure_cache_entry(target, _counting_build(log, target.parent / (target.name + ".lock")), what="test")
    finally:
        with open(log, "a") as f:
            f.write("ended\n")  # lets a builder waiting for this one stop waiting


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs /proc/locks to see a queued builder")
def test_concurrent_builders_build_once(tmp_path):
    target, log = tmp_path / "entry", tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(target, log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()  # no time limit: a hang is the CI job's to catch, not a timing here
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text().count("built") == 1
    assert (target / "model.safetensors").stat().st_size == 1000


def test_entries_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        target = ensure_cache_entry(tmp_path / "entry", _build, what="test")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o644
