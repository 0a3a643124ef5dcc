"""Crash-safe writes: the old file survives a failure, and even a killed writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
