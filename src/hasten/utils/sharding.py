"""Splitting a state dict into shards under a size limit, and writing them as safetensors with an index.

The file names and index layout are the ones transformers and Accelerate read:
``model-00001-of-00004.safetensors`` and ``model.safetensors.index.json`` holding
``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from hasten.utils.atomic import atomic_path, atomic_write
from hasten.utils.constants import SAFE_WEIGHTS_NAME, WEIGHTS_NAME
from hasten.utils.modeling import convert_file_size_to_int
from hasten.utils.parallel import without_aliases
from hasten.utils.typing import PathLike

Shards = dict[str, dict[str, torch.Tensor]]


def _storage_key(tensor: torch.Tensor) -> tuple[torch.device, int] | None:
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return None
    return tensor.device, tensor.untyped_storage().data_ptr()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def shard_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    max_shard_size: int | str = "10GB",
    weights_name: str = WEIGHTS_NAME,
) -> tuple[Shards, dict[str, Any] | None]:
    """Split ``state_dict`` into shards of at most ``max_shard_size`` (bytes, or ``"10GB"``-style strings).

    Tensors are taken in order and a new shard starts when the next one would overflow the
    current shard; a tensor bigger than the limit gets a shard of its own. Tensors sharing
    storage go in the same shard and are counted once. Returns ``({file name: shard}, index)``,
    where the index is ``None`` when everything fits in one file named ``weights_name``.
    """
    limit = convert_file_size_to_int(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    home: dict[tuple[torch.device, int], int] = {}
    total = 0
    for name, tensor in state_dict.items():
        key = _storage_key(tensor)
        if key is not None and key in home:
            shards[home[key]][name] = tensor
            continue
        size = _nbytes(tensor)
        if shards[-1] and sizes[-1] + size > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += size
        total += size
        if key is not None:
            home[key] = len(shards) - 1
    if len(shards) == 1:
        return {weights_name: shards[0]}, None
    stem, dot, extension = weights_name.rpartition(".")
    names = [
        f"{stem}-{number:05d}-of-{len(shards):05d}{dot}{extension}" for number in range(1, len(shards) + 1)
    ]
    weight_map = {tensor_name: file for file, shard in zip(names, shards) for tensor_name in shard}
    return dict(zip(names, shards)), {"metadata": {"total_size": total}, "weight_map": weight_map}


def _save_sharded(
    state_dict: Mapping[str, torch.Tensor],
    save_directory: PathLike,
    max_shard_size: int | str,
    weights_name: str,
    write: Callable[[dict[str, torch.Tensor], str], None],
) -> list[str]:
    os.makedirs(save_directory, exist_ok=True)
    tensors = without_aliases(state_dict)
    shards, index = shard_checkpoint(tensors, max_shard_size=max_shard_size, weights_name=weights_name)
    for file, shard in shards.items():
        with atomic_path(os.path.join(save_directory, file)) as temporary:
            write(shard, str(temporary))
    written = list(shards)
    if index is not None:
        index_name = f"{weights_name}.index.json"
        with atomic_write(os.path.join(save_directory, index_name), "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
        written.append(index_name)
    return written


def save_sharded_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    save_directory: PathLike,
    max_shard_size: int | str = "10GB",
    weights_name: str = SAFE_WEIGHTS_NAME,
) -> list[str]:
    """Write ``state_dict`` to ``save_directory`` as safetensors shards plus an index (when sharded).

    Aliased tensors (tied weights) are stored once. Every file is written crash-safely, the
    index last, so a reader never sees an index naming a shard that is not complete. Returns
    the names of the files written.
    """
    from safetensors.torch import save_file

    def write(shard: dict[str, torch.Tensor], path: str) -> None:
        save_file(shard, path, metadata={"format": "pt"})

    return _save_sharded(state_dict, save_directory, max_shard_size, weights_name, write)


def save_sharded_torch(
    state_dict: Mapping[str, torch.Tensor],
    save_directory: PathLike,
    max_shard_size: int | str = "10GB",
    weights_name: str = WEIGHTS_NAME,
) -> list[str]:
    """:func:`save_sharded_safetensors`, but each shard written by ``torch.save`` (``.bin`` files)."""
    return _save_sharded(state_dict, save_directory, max_shard_size, weights_name, torch.save)


def remove_stale_shards(save_directory: PathLike, weights_name: str, keep: Iterable[str]) -> list[str]:
    """Delete the files of an earlier save of ``weights_name`` in ``save_directory`` not in ``keep``.

    These are the single file, its shards (``stem-00001-of-00004.ext``) and its index; left behind
    they would mix an old checkpoint into the new one. Returns the names removed.
    """
    stem, _, extension = weights_name.rpartition(".")
    family = re.compile(rf"{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.{re.escape(extension)}(\.index\.json)?")
    kept = set(keep)
    removed = []
    for name in sorted(os.listdir(save_directory)):
        path = os.path.join(save_directory, name)
        if name not in kept and family.fullmatch(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed
