"""Disk offload: tensors as raw ``.dat`` files plus an ``index.json``, read back as memory maps.

The format is Accelerate's, so folders move between the two libraries: one file per
tensor named ``<name>.dat`` holding its bytes in C order, and ``index.json`` mapping each name
to ``{"dtype": ..., "shape": [...]}``. Entries may instead point into a safetensors file
(``"safetensors_file"``, ``"weight_name"``), so weights already on disk are never copied.
hasten writes the raw bytes of any dtype (bfloat16 and float8 included: numpy does not need
to know the type) and every file through a temporary name, so a crash leaves no half-written
tensor. Reads copy the bytes into memory of their own (one read from the page cache), so no
tensor handed out views a file that may be rewritten; a file that does not hold what its index
says raises :class:`~hasten.utils.errors.CheckpointError` instead of killing the process.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from hasten.utils.atomic import atomic_write
from hasten.utils.checkpoint_reader import SafetensorsFile, read_exactly, writable_bytes
from hasten.utils.errors import CheckpointError
from hasten.utils.modeling import as_torch_dtype
from hasten.utils.placement import set_module_tensor_to_device
from hasten.utils.typing import Device, PathLike

INDEX_FILE = "index.json"


def _dat_path(folder: PathLike, name: str) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith(".."):
        raise CheckpointError(f"weight name {name!r} cannot be used as a file name in the offload folder")
    return Path(folder) / f"{name}.dat"


def offload_weight(
    weight: torch.Tensor, weight_name: str, offload_folder: PathLike, index: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``weight`` to ``offload_folder/<weight_name>.dat`` and record it in ``index`` (returned).

    The file is complete or absent: it is written under a temporary name and renamed.
    """
    data = weight.detach().to("cpu").contiguous()
    dtype = str(data.dtype).removeprefix("torch.")
    raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else np.empty(0, np.uint8)
    with atomic_write(_dat_path(offload_folder, weight_name)) as handle:
        handle.write(memoryview(cast(Any, raw)))
    index = {} if index is None else index
    index[weight_name] = {"dtype": dtype, "shape": list(data.shape)}
    return index


def load_offloaded_weight(weight_file: PathLike, weight_info: Mapping[str, Any]) -> torch.Tensor:
    """The tensor stored in ``weight_file``, described by its index entry, read into memory of its own."""
    try:
        shape = tuple(int(size) for size in weight_info["shape"])
        dtype = as_torch_dtype(str(weight_info["dtype"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"the offload index entry for {str(weight_file)!r} is malformed: {error}"
        ) from None
    expected = math.prod(shape) * dtype.itemsize
    try:
        fd = os.open(weight_file, os.O_RDONLY)
    except OSError as error:
        raise CheckpointError(f"offloaded weight {str(weight_file)!r} cannot be read: {error}") from None
    try:
        actual = os.fstat(fd).st_size
        if actual != expected:
            raise CheckpointError(
                f"offloaded weight {str(weight_file)!r} holds {actual} bytes but its index entry ({dtype}, "
                f"shape {list(shape)}) needs {expected}: the file is truncated or does not belong to this "
                "index"
            )
        tensor = torch.empty(shape, dtype=dtype)
        if expected:
            read_exactly(fd, writable_bytes(tensor), 0, f"offloaded weight {str(weight_file)!r}")
        return tensor
    finally:
        os.close(fd)


def save_offload_index(index: Mapping[str, Any], offload_folder: PathLike) -> None:
    """Merge ``index`` into ``offload_folder/index.json`` (created if absent), crash-safely."""
    if not index:
        return
    path = Path(offload_folder) / INDEX_FILE
    merged: dict[str, Any] = {}
    if path.is_file():
        merged = _read_index(path)
    merged.update(index)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(merged, handle, indent=2)


def _read_index(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"offload index {str(path)!r} cannot be read: {error}") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"offload index {str(path)!r} must hold a JSON object, not {type(loaded).__name__}"
        )
    return loaded


def offload_state_dict(save_dir: PathLike, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Write every tensor of ``state_dict`` to ``save_dir`` with an ``index.json``."""
    os.makedirs(save_dir, exist_ok=True)
    index: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        offload_weight(tensor, name, save_dir, index=index)
    save_offload_index(index, save_dir)


def load_offloaded_weights(
    model: torch.nn.Module, index: Mapping[str, Any] | None, offload_folder: PathLike
) -> None:
    """Put every weight listed in ``index`` (read from ``offload_folder``) into ``model`` on the CPU.

    8-bit statistics stored next to a weight as ``<name with SCB for weight>`` are attached to it.
    """
    if not index:
        return
    for name, info in index.items():
        if "SCB" in name:
            continue
        statistics_name = name.replace("weight", "SCB")
        statistics = None
        if "weight" in name and statistics_name in index:
            statistics = load_offloaded_weight(
                _dat_path(offload_folder, statistics_name), index[statistics_name]
            )
        value = load_offloaded_weight(_dat_path(offload_folder, name), info)
        set_module_tensor_to_device(model, name, "cpu", value=value, fp16_statistics=statistics)


def extract_submodules_state_dict(
    state_dict: Mapping[str, torch.Tensor], submodule_names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` that belong to any of ``submodule_names`` (one pass)."""
    roots = set(submodule_names)
    if "" in roots:
        return dict(state_dict)
    result = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if any(".".join(parts[:end]) in roots for end in range(1, len(parts) + 1)):
            result[key] = value
    return result


class PrefixedDataset(Mapping[str, Any]):
    """A view of ``dataset`` where ``view[key]`` is ``dataset[prefix + key]``.

    As in Accelerate, iteration yields the full keys that start with ``prefix``.
    """

    def __init__(self, dataset: Mapping[str, Any], prefix: str) -> None:
        self.dataset = dataset
        self.prefix = prefix

    def __getitem__(self, key: str) -> Any:
        return self.dataset[f"{self.prefix}{key}"]

    def __iter__(self) -> Iterator[str]:
        return iter([key for key in self.dataset if key.startswith(self.prefix)])

    def __len__(self) -> int:
        return len(self.dataset)


class OffloadedWeightsLoader(Mapping[str, torch.Tensor]):
    """One mapping over weights in memory (``state_dict``) and on disk (``index`` / ``save_folder``).

    Disk weights are read when asked for, into memory of their own: ``.dat`` files whole,
    safetensors entries from their file (moved to ``device`` when given, cast to the index's dtype).
    """

    def __init__(
        self,
        state_dict: dict[str, torch.Tensor] | None = None,
        save_folder: PathLike | None = None,
        index: Mapping[str, Any] | None = None,
        device: Device | None = None,
    ) -> None:
        if state_dict is None and save_folder is None and index is None:
            raise ValueError(
                "OffloadedWeightsLoader needs a state_dict, a save_folder or an index (all were None)"
            )
        self.state_dict = {} if state_dict is None else state_dict
        self.save_folder = save_folder
        if index is None and save_folder is not None:
            index = _read_index(Path(save_folder) / INDEX_FILE)
        self.index: Mapping[str, Any] = {} if index is None else index
        self.all_keys = list(self.state_dict) + [key for key in self.index if key not in self.state_dict]
        self.device = device
        self._files: dict[str, tuple[tuple[int, int, int], SafetensorsFile]] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.state_dict:
            return self.state_dict[key]
        info = self.index[key]
        if "safetensors_file" in info:
            return self._from_safetensors(key, info)
        if self.save_folder is None:
            raise CheckpointError(
                f"offloaded weight {key!r} is a .dat entry but no save_folder was given to read it"
            )
        return load_offloaded_weight(_dat_path(self.save_folder, key), info)

    def _from_safetensors(self, key: str, info: Mapping[str, Any]) -> torch.Tensor:
        name = info.get("weight_name", key)
        reader = self._safetensors(str(info["safetensors_file"]))
        if name not in reader.infos:
            raise CheckpointError(
                f"offloaded weight {key!r} points at {name!r} in {reader.path}, which holds no such tensor"
            )
        tensor = reader.read(name)
        if "dtype" in info:
            tensor = tensor.to(as_torch_dtype(str(info["dtype"])))
        return tensor if self.device is None else tensor.to(self.device)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the open files behind (they reopen on first read)."""
        return {key: value for key, value in self.__dict__.items() if key != "_files"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _files={})

    def _safetensors(self, path: str) -> SafetensorsFile:
        """The open file at ``path``, its header parsed once and again only when the file changes."""
        try:
            status = os.stat(path)
        except OSError as error:
            raise CheckpointError(f"offloaded weights file {path!r} cannot be read: {error}") from None
        signature = (status.st_ino, status.st_size, status.st_mtime_ns)
        cached = self._files.get(path)
        if cached is None or cached[0] != signature:
            cached = (signature, SafetensorsFile(path))
            self._files[path] = cached
        return cached[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.all_keys)

    def __len__(self) -> int:
        return len(self.all_keys)
