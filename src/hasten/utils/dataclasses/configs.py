"""Configurations: how to quantize with bitsandbytes, how data loaders behave, where a project lives."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from hasten.utils.dataclasses.enums import CustomDtype

_DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_QUANT_TYPES = ("fp4", "nf4")


def _dtype(value: Any, name: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _DTYPE_NAMES:
        return _DTYPE_NAMES[value]
    raise ValueError(f"{name}={value!r} must be a torch.dtype or one of {list(_DTYPE_NAMES)}")


def _names(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name}={value!r} must be a list of module names (strings)")
    return value


@dataclass
class BnbQuantizationConfig:
    """How :func:`~hasten.utils.load_and_quantize_model` quantizes ``nn.Linear`` layers with bitsandbytes.

    Exactly one of ``load_in_8bit`` (LLM.int8(), outliers above ``llm_int8_threshold`` kept in
    higher precision) and ``load_in_4bit`` (``bnb_4bit_quant_type`` ``"fp4"`` or ``"nf4"``, computing
    in ``bnb_4bit_compute_dtype``, optionally quantizing the quantization constants too). Modules
    named in ``skip_modules`` stay unquantized in ``torch_dtype``; those in ``keep_in_fp32_modules``
    stay in float32. Dtypes may be given as ``"fp32"``, ``"fp16"`` or ``"bf16"``.
    """

    load_in_8bit: bool = False
    llm_int8_threshold: float = 6.0
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: Union[str, torch.dtype] = "fp16"
    torch_dtype: Union[str, torch.dtype, None] = None
    skip_modules: Union[list[str], None] = None
    keep_in_fp32_modules: Union[list[str], None] = None
    target_dtype: Union[torch.dtype, CustomDtype] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("load_in_8bit", "load_in_4bit", "bnb_4bit_use_double_quant"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.load_in_8bit == self.load_in_4bit:
            raise ValueError(
                f"load_in_8bit={self.load_in_8bit} and load_in_4bit={self.load_in_4bit}: set exactly one of them to True"
            )
        if isinstance(self.llm_int8_threshold, bool) or not isinstance(self.llm_int8_threshold, (int, float)):
            raise ValueError(f"llm_int8_threshold={self.llm_int8_threshold!r} must be a number")
        if self.bnb_4bit_quant_type not in _QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} must be one of {list(_QUANT_TYPES)}")
        self.bnb_4bit_compute_dtype = _dtype(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype")
        if self.torch_dtype is not None:
            self.torch_dtype = _dtype(self.torch_dtype, "torch_dtype")
        self.skip_modules = _names(self.skip_modules, "skip_modules")
        self.keep_in_fp32_modules = _names(self.keep_in_fp32_modules, "keep_in_fp32_modules")
        if self.load_in_4bit and self.llm_int8_threshold != 6.0:
            warnings.warn("llm_int8_threshold only applies to 8-bit loading; it is ignored with load_in_4bit", stacklevel=3)
        self.target_dtype = CustomDtype.INT4 if self.load_in_4bit else torch.int8


@dataclass
class DataLoaderConfiguration:
    """How prepared data loaders split, dispatch and order batches (read by the Accelerator).

    ``split_batches``: each batch is split across processes instead of each process taking
    whole batches. ``dispatch_batches``: the main process iterates and sends slices (``None``:
    only for iterable datasets). ``even_batches``: pad the last batches so every process gets
    as many. ``use_seedable_sampler`` / ``data_seed``: a sampler reseeded per epoch for
    reproducible shuffles. ``non_blocking``: asynchronous host-to-device copies (with pinned
    memory). ``use_stateful_dataloader``: torchdata's resumable loaders.
    """

    split_batches: bool = False
    dispatch_batches: Union[bool, None] = None
    even_batches: bool = True
    use_seedable_sampler: bool = False
    data_seed: Union[int, None] = None
    non_blocking: bool = False
    use_stateful_dataloader: bool = False

    def __post_init__(self) -> None:
        for name in ("split_batches", "even_batches", "use_seedable_sampler", "non_blocking", "use_stateful_dataloader"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.dispatch_batches is not None and not isinstance(self.dispatch_batches, bool):
            raise ValueError(f"dispatch_batches={self.dispatch_batches!r} must be True, False or None")
        if self.data_seed is not None and (isinstance(self.data_seed, bool) or not isinstance(self.data_seed, int)):
            raise ValueError(f"data_seed={self.data_seed!r} must be an int or None")


@dataclass
class ProjectConfiguration:
    """Where a project writes checkpoints and logs, and how checkpoints are named and pruned.

    With ``automatic_checkpoint_naming``, checkpoints go to ``project_dir/checkpoints/checkpoint_<iteration>``
    and only the newest ``total_limit`` are kept. ``logging_dir`` defaults to ``project_dir``.
    """

    project_dir: Union[str, None] = None
    logging_dir: Union[str, None] = None
    automatic_checkpoint_naming: bool = False
    total_limit: Union[int, None] = None
    iteration: int = 0
    save_on_each_node: bool = False

    def __post_init__(self) -> None:
        if self.logging_dir is None:
            self.logging_dir = self.project_dir
        if self.total_limit is not None and (not isinstance(self.total_limit, int) or self.total_limit < 1):
            raise ValueError(f"total_limit={self.total_limit!r} must be a positive int (checkpoints to keep) or None")
        if isinstance(self.iteration, bool) or not isinstance(self.iteration, int) or self.iteration < 0:
            raise ValueError(f"iteration={self.iteration!r} must be a non-negative int")

    def set_directories(self, project_dir: Union[str, None] = None) -> None:
        """Set ``project_dir`` and, unless it was given, ``logging_dir`` to it."""
        self.project_dir = project_dir
        if self.logging_dir is None:
            self.logging_dir = project_dir
