"""Read checkpoint files safely: safetensors through a validated header, ``.bin`` with ``weights_only``.

A safetensors file is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, byte offsets) and the raw data. :class:`SafetensorsFile`
checks the whole header against the file's size before anything is read and
keeps the file open. :meth:`SafetensorsFile.read_into` then reads a tensor's
bytes straight into memory the caller owns (a model's parameter, or a fresh
tensor from :meth:`SafetensorsFile.read`): one copy from the page cache, and
nothing left pointing at the file, so the file may be overwritten, truncated or
deleted afterwards. A file that shrinks during the read raises
:class:`~hasten.utils.errors.CheckpointError` instead of killing the process.

:meth:`SafetensorsFile.tensor` is the opt-in zero-copy path: a CPU tensor
*viewing* a copy-on-write map of the file. Nothing is read until touched and
writing to the tensor never changes the file, but the tensor aliases the file:
writing into the file in place changes it, and truncating the file (for
instance ``torch.save`` to the same path) kills the process with ``SIGBUS``
when the tensor is next read. Replacing the file (``os.replace``, as every
hasten save does) is safe: the map keeps the old file alive.

``.bin`` files are read with ``torch.load(weights_only=True)`` (memory-mapped
when saved in the zip format, read whole when saved with
``_use_new_zipfile_serialization=False``): nothing is unpickled beyond tensors
and plain containers unless the caller opts in through :func:`load_bin`.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import struct
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hasten.utils.constants import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from hasten.utils.errors import CheckpointError
from hasten.utils.typing import PathLike

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    **{
        name: getattr(torch, attr)
        for name, attr in (
            ("U16", "uint16"),
            ("U32", "uint32"),
            ("U64", "uint64"),
            ("F8_E4M3", "float8_e4m3fn"),
            ("F8_E5M2", "float8_e5m2"),
        )
        if hasattr(torch, attr)
    },
}

_MAX_HEADER = 100 * 1024 * 1024  # safetensors refuses larger headers too


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Byte offset of the tensor's data from the start of the file."""
    nbytes: int


def _corrupt(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file: {detail}. The file is probably truncated or was not fully "
        "written; re-download or re-save it."
    )


def _parse_entry(path: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _corrupt(path, f"the header entry for {name!r} lacks dtype, shape or data_offsets")
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, which this torch cannot represent "
            f"(known: {sorted(SAFETENSORS_DTYPES)})."
        )
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _corrupt(path, f"tensor {name!r} has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise _corrupt(path, f"tensor {name!r} has data_offsets {offsets!r}")
    begin, end = offsets
    numel = 1
    for dim in shape:
        numel *= dim
    expected = numel * dtype.itemsize
    if not 0 <= begin <= end <= data_size or end - begin != expected:
        raise _corrupt(
            path,
            f"tensor {name!r} ({entry['dtype']} {shape}, {expected} bytes) claims bytes {begin}..{end} "
            f"but the data section holds {data_size} bytes",
        )
    return TensorInfo(dtype, tuple(shape), data_start + begin, expected)


def writable_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU ``tensor`` as a writable buffer, for reading a file into it."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(
            f"can only read into a contiguous CPU tensor, not one on {tensor.device} with strides "
            f"{tensor.stride()}"
        )
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


def read_exactly(fd: int, buffer: memoryview, offset: int, what: str) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``; a file that ends first raises ``CheckpointError``."""
    done, total = 0, len(buffer)
    while done < total:
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            raise CheckpointError(
                f"{what} ended after {offset + done} bytes, before the {total} bytes at offset {offset} "
                "could be read: the file was truncated or replaced while loading. Load it again."
            )
        done += count


def _read_header(path: Path, fd: int) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """The metadata and tensor entries of the safetensors file open as ``fd``, checked against its size."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise _corrupt(path, f"it holds {size} bytes, fewer than the 8-byte header length")
    (header_size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if header_size > min(size - 8, _MAX_HEADER):
        raise _corrupt(path, f"the header claims {header_size} bytes but the file holds {size}")
    try:
        header = json.loads(os.pread(fd, header_size, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(path, f"the header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_size
    infos = {
        name: _parse_entry(path, name, entry, data_start, size - data_start) for name, entry in header.items()
    }
    return metadata, infos


class SafetensorsFile:
    """An open safetensors file: validated header; tensors read into owned memory or, on request, viewed.

    The file stays open (so the bytes read are those of the file that was validated) until
    :meth:`close` or until the object is garbage-collected.

    Raises:
        CheckpointError: the file is missing, truncated, or its header is inconsistent (naming the file).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"Checkpoint file {self.path} does not exist.") from None
        self._closer = weakref.finalize(self, os.close, fd)
        self._fd = fd
        self._map: mmap.mmap | None = None
        try:
            self.metadata, self.infos = _read_header(self.path, fd)
        except BaseException:
            self._closer()
            raise

    def __reduce__(self) -> tuple[type[SafetensorsFile], tuple[Path]]:
        """Copies and pickles reopen the file by its path (a descriptor cannot be shared)."""
        return (SafetensorsFile, (self.path,))

    def keys(self) -> list[str]:
        """The tensor names, in file order."""
        return list(self.infos)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read tensor ``name`` into ``out``, a contiguous CPU tensor of its dtype and size."""
        info = self.infos[name]
        if out.dtype != info.dtype or out.numel() * out.element_size() != info.nbytes:
            raise ValueError(
                f"cannot read {name!r} ({info.dtype}, shape {list(info.shape)}) into a {out.dtype} tensor of "
                f"shape {list(out.shape)}"
            )
        if info.nbytes:
            read_exactly(self._fd, writable_bytes(out), info.start, f"{self.path}")

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in fresh memory of its own (the file can change afterwards without effect)."""
        info = self.infos[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        self.read_into(name, out)
        return out

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a zero-copy CPU view of the file (read on first touch, never written back).

        The view aliases the file: see the module docstring before keeping it.
        """
        info = self.infos[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._map is None:
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        if info.start % info.dtype.itemsize:  # misaligned data cannot be viewed safely: read it
            return self.read(name)
        flat = torch.frombuffer(
            self._map, dtype=info.dtype, count=info.nbytes // info.dtype.itemsize, offset=info.start
        )
        return flat.reshape(info.shape)

    def release(self, name: str) -> None:
        """Tell the kernel the mapped pages of ``name`` are no longer needed (after copying a view)."""
        info = self.infos[name]
        if self._map is None or info.nbytes == 0:
            return
        page = mmap.PAGESIZE
        first = -(-info.start // page) * page  # only whole pages inside this tensor's bytes
        last = (info.start + info.nbytes) // page * page
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every (name, tensor view), in file order."""
        for name in self.infos:
            yield name, self.tensor(name)

    def close(self) -> None:
        """Close the file (views taken with :meth:`tensor` keep their own map of it)."""
        self._map = None
        self._closer()


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def load_bin(path: PathLike, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """Read a ``torch.save`` checkpoint, unpickling only tensors and plain containers unless told otherwise.

    Files in torch's zip format are memory-mapped (their tensors view the file: copy what you
    keep); files saved with ``_use_new_zipfile_serialization=False`` cannot be mapped and are
    read whole.

    Raises:
        CheckpointError: the file needs full unpickling (and ``weights_only`` is true) or is corrupt.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=_is_zip(path))
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint file {path} does not exist.") from None
    except pickle.UnpicklingError as error:
        if weights_only:
            raise CheckpointError(
                f"{path} holds objects beyond tensors and plain containers, and hasten does not unpickle "
                "them by default: unpickling runs code from the file. If you trust the file, convert it once "
                "to safetensors, or load it yourself with torch.load(..., weights_only=False). First line of "
                f"the refusal: {str(error).splitlines()[0]}"
            ) from error
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {error}") from error
    except (RuntimeError, EOFError) as error:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (truncated or corrupt): {error}"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    return state


class CheckpointFile:
    """The tensors of one checkpoint file (safetensors or ``.bin``), read on demand.

    :meth:`read` and :meth:`read_into` give the caller memory of its own; :meth:`view` is the
    zero-copy path whose tensors alias the file (see the module docstring).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.safetensors = SafetensorsFile(path) if path.suffix == ".safetensors" else None
        self._bin = None if self.safetensors is not None else load_bin(path)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, in file order."""
        if self.safetensors is not None:
            return {name: info.shape for name, info in self.safetensors.infos.items()}
        assert self._bin is not None
        return {name: tuple(tensor.shape) for name, tensor in self._bin.items()}

    def dtype(self, name: str) -> torch.dtype:
        """The dtype ``name`` is stored in."""
        if self.safetensors is not None:
            return self.safetensors.infos[name].dtype
        assert self._bin is not None
        return self._bin[name].dtype

    def view(self, name: str) -> torch.Tensor:
        """``name`` without copying: a view of the file (copy it, or accept the aliasing)."""
        if self.safetensors is not None:
            return self.safetensors.tensor(name)
        assert self._bin is not None
        return self._bin[name]

    def read(self, name: str) -> torch.Tensor:
        """``name`` in fresh memory of its own."""
        if self.safetensors is not None:
            return self.safetensors.read(name)
        return self.view(name).clone()

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy ``name`` into ``out`` (same dtype and shape; any strides, CPU)."""
        if self.safetensors is not None and out.is_contiguous():
            self.safetensors.read_into(name, out)
        else:
            with torch.no_grad():
                out.copy_(self.view(name))

    def release(self, name: str) -> None:
        """Drop the mapped pages of ``name`` once a view of it has been copied elsewhere."""
        if self.safetensors is not None:
            self.safetensors.release(name)

    def close(self) -> None:
        """Close the file; tensors already read stay valid."""
        if self.safetensors is not None:
            self.safetensors.close()
        self._bin = None


def checkpoint_files(checkpoint: PathLike) -> list[Path]:
    """The weight files a checkpoint path stands for: a file, an index, or a folder holding either.

    Shard names read from an index must stay inside its folder.

    Raises:
        CheckpointError: nothing loadable is there, the folder is ambiguous, an index is malformed,
            names a missing shard, or points outside its folder.
    """
    path = Path(checkpoint)
    if path.is_dir():
        for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
            if (path / name).is_file():
                return [path / name]
        indexes = sorted(p for p in path.iterdir() if p.name.endswith(".index.json"))
        if not indexes:
            raise CheckpointError(
                f"{path} holds no {SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} or *.index.json; pass a checkpoint "
                "file, an index, or a folder with one of them."
            )
        preferred = [p for p in indexes if p.name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)]
        if len(indexes) > 1 and len(preferred) != 1:
            raise CheckpointError(
                f"{path} holds several indexes {[p.name for p in indexes]}; pass the one to load."
            )
        path = (preferred or indexes)[0]
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist (expected a file, an index or a folder).")
    if not path.name.endswith(".json"):
        return [path]
    return _shards_of_index(path)


def _shards_of_index(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"Index {index_path} is not readable JSON: {error}") from None
    weight_map = index.get("weight_map", index) if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"Index {index_path} has no weight_map of tensor name -> shard file name.")
    folder = index_path.parent.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = (folder / name).resolve()
        if not shard.is_relative_to(folder):
            raise CheckpointError(
                f"Index {index_path} names shard {name!r}, which resolves to {shard}, outside the checkpoint "
                f"folder {folder}; refusing to read it."
            )
        if not shard.is_file():
            raise CheckpointError(f"Index {index_path} names shard {name!r}, but {shard} does not exist.")
        shards.append(shard)
    return shards
