"""What leaves a training run: predictions gathered for metrics, and model weights written to disk."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hasten.state import GradientState
from hasten.utils.constants import SAFE_WEIGHTS_NAME, WEIGHTS_NAME
from hasten.utils.operations import gather, gather_object
from hasten.utils.sharding import remove_stale_shards, save_sharded_safetensors, save_sharded_torch
from hasten.utils.tree import tree_leaves, tree_map
from hasten.utils.typing import PathLike

logger = logging.getLogger(__name__)


def _all_tensors(data: Any) -> bool:
    kind = type(data)
    if kind is torch.Tensor or (kind in (tuple, list) and all(type(item) is torch.Tensor for item in data)):
        return True
    try:
        tree_leaves(data, strict=True, caller="gather_for_metrics")
    except TypeError:
        return False
    return True


def gather_for_metrics(
    input_data: Any, use_gather_object: bool, gradient_state: GradientState, distributed: bool
) -> Any:
    """Gather ``input_data`` from every process, without the samples the last batch repeated.

    Tensors are gathered with ``gather``; anything else (or everything, with
    ``use_gather_object``) with ``gather_object``. On the last batch of a data loader that
    repeated samples to give every process a full batch, only the first ``remainder`` gathered
    samples are kept. On one process nothing travels and nothing is inspected before that.
    """
    objects = None
    data = input_data
    if distributed:
        objects = use_gather_object or not _all_tensors(input_data)
        data = gather_object(input_data) if objects else gather(input_data)
    if not gradient_state.end_of_dataloader:
        return data
    remainder = gradient_state.remainder
    if remainder < 0:
        logger.debug("gather_for_metrics: the data loader has no length; nothing was trimmed.")
        return data
    if remainder == 0:
        return data
    if objects is None:
        objects = use_gather_object or not _all_tensors(input_data)
    if objects:
        return data[:remainder]
    return tree_map(lambda tensor: tensor[:remainder], data, caller="gather_for_metrics")


def check_saveable(model: nn.Module, save_directory: PathLike) -> None:
    """Raise, on every process, when ``save_model`` cannot write ``model`` to ``save_directory``.

    Raises:
        NotADirectoryError: ``save_directory`` is an existing file.
        ValueError: some parameters are on the meta device (a few are named).
    """
    if os.path.isfile(save_directory):
        raise NotADirectoryError(
            f"save_model: save_directory={str(save_directory)!r} is a file; pass a folder (it is created "
            "when missing)."
        )
    empty = [name for name, parameter in model.named_parameters() if parameter.device.type == "meta"]
    if empty:
        raise ValueError(
            f"save_model: {len(empty)} parameters of {type(model).__qualname__} are on the meta device (e.g. "
            f"{empty[:3]}), so there are no weights to save. Load or materialise them first (e.g. "
            "load_checkpoint_in_model, or model.to_empty(device=...) and initialise)."
        )


def write_model(
    state_dict: Mapping[str, torch.Tensor],
    save_directory: PathLike,
    max_shard_size: int | str,
    safe_serialization: bool,
) -> list[str]:
    """Write ``state_dict`` as (sharded) safetensors or ``.bin`` files with an index, and delete the
    files of an earlier save there that the new one does not replace. Returns the names written.
    """
    if safe_serialization:
        written = save_sharded_safetensors(state_dict, save_directory, max_shard_size, SAFE_WEIGHTS_NAME)
        remove_stale_shards(save_directory, SAFE_WEIGHTS_NAME, written)
    else:
        written = save_sharded_torch(state_dict, save_directory, max_shard_size, WEIGHTS_NAME)
        remove_stale_shards(save_directory, WEIGHTS_NAME, written)
    return written
