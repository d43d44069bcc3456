"""The converted-model cache heals: damaged entries are rebuilt, concurrent builders do the work
once, and files follow the user's umask (a fake build stands in for the 30-second conversion)."""

import multiprocessing
import os
import stat
import warnings

import pytest

from effllm.testing.models import COMPLETE_MARKER, ensure_cache_entry


def _build(folder):
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 1000)


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


def _second_builder(target, log, go, said):
    """The second caller, in a process of its own: waits for ``go``, then asks for the entry,
    telling ``said`` whether it found the lock held ("waiting", from the warning), built, or ended."""
    def tell(message):
        os.write(said, message.encode() + b"\n")

    def build(folder):
        with open(log, "a") as f:
            f.write("built\n")
        tell("built")
        _build(folder)

    os.read(go, 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *_args, **_kwargs: tell(
                "waiting" if "waiting" in str(message) else "warned")
            ensure_cache_entry(target, build, what="test")
    finally:
        tell("ended")  # the first builder never waits on a process that failed


def test_concurrent_builders_build_once(tmp_path):
    # The first builder, holding the lock, lets the second one start and waits for what it says:
    # with a working lock the second finds it held and waits (then reuses the entry); without
    # one it builds too. The builders take turns through pipes; no assertion depends on how long
    # anything takes.
    target, log = tmp_path / "entry", tmp_path / "log"
    go_read, go_write = os.pipe()
    said_read, said_write = os.pipe()
    second = multiprocessing.get_context("fork").Process(target=_second_builder,
                                                         args=(target, log, go_read, said_write))
    second.start()  # before the lock file is opened here: the child holds no copy of the lock
    heard = []

    def first_build(folder):
        with open(log, "a") as f:
            f.write("built\n")
        os.write(go_write, b"x")
        heard.append(os.read(said_read, 64).decode().split()[0])
        _build(folder)

    ensure_cache_entry(target, first_build, what="test")
    second.join()
    assert second.exitcode == 0
    assert heard == ["waiting"]
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
