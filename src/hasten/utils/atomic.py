"""Crash-safe file writes: a temporary name in the same folder, flushed, synced, then renamed.

A process killed in the middle of a write leaves the previous file (or no
file) in place, never a truncated one, because ``os.replace`` within one
file system is atomic.

The file gets the permissions an ordinary ``open(path, "w")`` would give it: a
new file ``0o666`` less the process umask, an existing file keeps its mode.
(``tempfile.mkstemp`` would make every saved file ``0o600``.)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from hasten.utils.typing import PathLike


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems (and Windows) do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_beside(target: Path) -> tuple[int, Path]:
    """Create an empty temporary file next to ``target``, with the mode ``open(target, "w")`` gives."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)  # an existing file keeps its permissions
    except FileNotFoundError:
        mode = None
    while True:
        temporary = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            # 0o666 is what open() asks for; the kernel applies the umask, as it does for open().
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        if mode is not None:
            os.fchmod(fd, mode)
        return fd, temporary


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[tuple[int, Path]]:
    """Yield a temporary file (descriptor and path) beside ``target``; on a clean exit sync it and rename
    it over ``target``, on an exception remove it. The one write protocol both writers share."""
    fd, temporary = _create_beside(target)
    try:
        yield fd, temporary
        os.close(fd)
        fd = -1
        _fsync_file(temporary)  # by name: a writer given the path may have recreated the file
        os.replace(temporary, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(target.parent)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_write opens files for writing; mode={mode!r} has no 'w'.")
    with _replacing(Path(path)) as (fd, _), os.fdopen(os.dup(fd), mode, **open_kwargs) as handle:
        yield handle


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` for writers that take a file name; renamed over ``path`` on success.

    For libraries such as safetensors that open the file themselves. The
    temporary file is synced before the rename and removed on an exception.
    """
    with _replacing(Path(path)) as (_, temporary):
        yield temporary
