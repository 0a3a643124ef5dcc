"""Read checkpoint files lazily and safely: safetensors through a validated header and a private mmap.

A safetensors file is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, byte offsets) and the raw data. :class:`SafetensorsFile`
checks the whole header against the file's size before anything is read, then
maps the file copy-on-write: :meth:`SafetensorsFile.tensor` returns a CPU tensor
*viewing* the mapping, so nothing is read until it is touched, nothing is held
twice, and writing to the tensor never changes the file. Views stay valid after
the file is replaced (the mapping keeps the old inode alive).

``.bin`` files are read with ``torch.load(weights_only=True, mmap=True)``:
nothing is unpickled beyond tensors and plain containers unless the caller
opts in through :func:`load_bin`'s ``weights_only=False``.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
            f"tensor {name!r} ({entry['dtype']} {shape}, {expected} bytes) claims bytes {begin}..{end} but "
            "the "
            f"data section holds {data_size} bytes",
        )
    return TensorInfo(dtype, tuple(shape), data_start + begin, expected)


class SafetensorsFile:
    """An open safetensors file: validated header, lazy zero-copy tensors.

    Raises:
        CheckpointError: the file is missing, truncated, or its header is inconsistent (naming the file).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 - closed by the `with` below
        except FileNotFoundError:
            raise CheckpointError(f"Checkpoint file {self.path} does not exist.") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise _corrupt(self.path, f"it holds {size} bytes, fewer than the 8-byte header length")
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > min(size - 8, _MAX_HEADER):
                raise _corrupt(self.path, f"the header claims {header_size} bytes but the file holds {size}")
            try:
                header = json.loads(handle.read(header_size))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise _corrupt(self.path, f"the header is not valid JSON ({error})") from None
            if not isinstance(header, dict):
                raise _corrupt(self.path, "the header is not a JSON object")
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            data_start = 8 + header_size
            self.infos = {
                name: _parse_entry(self.path, name, entry, data_start, size - data_start)
                for name, entry in header.items()
            }
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size > data_start else None

    def keys(self) -> list[str]:
        """The tensor names, in file order."""
        return list(self.infos)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a CPU view of the file (read on first touch, never written back)."""
        info = self.infos[name]
        if info.nbytes == 0 or self._map is None:
            return torch.empty(info.shape, dtype=info.dtype)
        if info.start % info.dtype.itemsize:  # misaligned data cannot be viewed safely: copy it
            data = bytearray(self._map[info.start : info.start + info.nbytes])
            return torch.frombuffer(data, dtype=info.dtype).reshape(info.shape)
        flat = torch.frombuffer(
            self._map, dtype=info.dtype, count=info.nbytes // info.dtype.itemsize, offset=info.start
        )
        return flat.reshape(info.shape)

    def release(self, name: str) -> None:
        """Tell the kernel the pages of ``name`` are no longer needed (after copying it elsewhere)."""
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


def load_bin(path: PathLike, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """Read a ``torch.save`` checkpoint memory-mapped, unpickling only tensors unless told otherwise.

    Raises:
        CheckpointError: the file needs full unpickling (and ``weights_only`` is true) or is corrupt.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint file {path} does not exist.") from None
    except pickle.UnpicklingError as error:
        if weights_only:
            raise CheckpointError(
                f"{path} holds objects beyond tensors and plain containers, and hasten does not unpickle "
                "them by "
                "default: unpickling runs code from the file. If you trust the file, convert it once to "
                "safetensors, or load it yourself with torch.load(..., weights_only=False). First line of "
                "the "
                f"refusal: {str(error).splitlines()[0]}"
            ) from error
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {error}") from error
    except RuntimeError as error:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (truncated or corrupt): {error}"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    return state
