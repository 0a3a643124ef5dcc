"""Crash-safe writes: the old file survives a failure, and even a killed writer."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hasten.utils.atomic import atomic_path, atomic_write


def test_writes_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.txt"
    with atomic_write(target, "w") as handle:
        handle.write("one")
    with atomic_write(target, "w") as handle:
        handle.write("two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_an_error_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_write(target) as handle:
        handle.write(b"partial")
        raise RuntimeError("mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_atomic_path_for_writers_that_open_files_themselves(tmp_path: Path) -> None:
    target = tmp_path / "w.bin"
    with atomic_path(target) as temporary:
        assert temporary.parent == tmp_path and temporary != target
        temporary.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"
    with pytest.raises(KeyError), atomic_path(target) as temporary:
        temporary.write_bytes(b"bad")
        raise KeyError("x")
    assert target.read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == ["w.bin"]


def test_read_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"mode='rb' has no 'w'"), atomic_write(tmp_path / "x", "rb"):
        pass


WRITER = """
import sys, time
from hasten.utils.atomic import atomic_write
with atomic_write(sys.argv[1]) as handle:
    handle.write(b"new" * 1000)
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_killed_writer_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    target.write_bytes(b"previous")
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True
    ) as writer:
        try:
            assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait(timeout=30)
    assert target.read_bytes() == b"previous"
    # The temporary file may remain after SIGKILL (nothing could clean it up); it never replaced the target.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "weights.bin"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".weights.bin.") and leftovers[0].endswith(".tmp")


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test (restored afterwards)."""
    original = os.umask(0o022)
    os.umask(original)
    yield os.umask
    os.umask(original)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_mode_open_gives_under_the_umask(
    tmp_path: Path, umask: Callable[[int], None], mask: int, mode: int
) -> None:
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as handle:  # what an ordinary write gives
        handle.write("x")
    with atomic_write(tmp_path / "atomic.txt", "w") as handle:
        handle.write("x")
    with atomic_path(tmp_path / "by_path.bin") as temporary:
        temporary.write_bytes(b"x")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"plain.txt": mode, "atomic.txt": mode, "by_path.bin": mode}


def test_a_replaced_file_keeps_its_mode(tmp_path: Path, umask: Callable[[int], None]) -> None:
    umask(0o022)
    target = tmp_path / "secret.json"
    target.write_text("{}")
    target.chmod(0o640)
    with atomic_write(target, "w") as handle:
        handle.write("{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
