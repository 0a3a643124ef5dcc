"""Configurations: bitsandbytes quantization, data loading, and the project's folders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hasten.utils.dataclasses._env import non_negative_int, positive_int, to_bool
from hasten.utils.dataclasses.enums import CustomDtype
from hasten.utils.errors import ConfigurationError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_QUANT_TYPES = ("fp4", "nf4")


def _dtype(value: Any, name: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ConfigurationError(
                f"{name}={value!r} is not supported; expected one of {list(_DTYPES.values())}."
            )
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ConfigurationError(
        f"{name}={value!r} is not valid; expected one of {list(_DTYPES)} or a torch.dtype."
    )


def _names(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ConfigurationError(f"{name}={value!r} must be a list of module names (strings), or None.")


@dataclass
class BnbQuantizationConfig:
    """How ``load_and_quantize_model`` quantizes a model with bitsandbytes: 8-bit or 4-bit.

    Args:
        load_in_8bit: quantize linear layers to int8 (LLM.int8()).
        llm_int8_threshold: outlier threshold of LLM.int8() (8-bit only).
        load_in_4bit: quantize linear layers to 4 bits.
        bnb_4bit_quant_type: ``"fp4"`` or ``"nf4"``.
        bnb_4bit_use_double_quant: quantize the quantization constants too.
        bnb_4bit_compute_dtype: the dtype 4-bit layers compute in (``"fp32"``, ``"fp16"``, ``"bf16"`` or a
            dtype).
        torch_dtype: the dtype of the layers left unquantized (default: fp16 for 8-bit, the compute
            dtype for 4-bit).
        skip_modules: names of modules not to quantize (kept in ``torch_dtype``).
        keep_in_fp32_modules: names of modules not to quantize and kept in float32.

    ``target_dtype`` is set to what quantized weights are stored as (``torch.int8`` or
    ``CustomDtype.INT4``), for sizing the model.
    """

    load_in_8bit: bool = False
    llm_int8_threshold: float = 6.0
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: Any = "fp16"
    torch_dtype: Any = None
    skip_modules: list[str] | None = None
    keep_in_fp32_modules: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("load_in_8bit", "load_in_4bit", "bnb_4bit_use_double_quant"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"{name}={getattr(self, name)!r} must be True or False.")
        if self.load_in_8bit == self.load_in_4bit:
            raise ConfigurationError(
                f"load_in_8bit={self.load_in_8bit} and load_in_4bit={self.load_in_4bit}: set exactly one of "
                "them to True."
            )
        if isinstance(self.llm_int8_threshold, bool) or not isinstance(self.llm_int8_threshold, (int, float)):
            raise ConfigurationError(f"llm_int8_threshold={self.llm_int8_threshold!r} must be a number.")
        if self.load_in_4bit and self.llm_int8_threshold != 6.0:
            raise ConfigurationError(
                f"llm_int8_threshold={self.llm_int8_threshold!r} only applies to 8-bit quantization; "
                "leave it at 6.0 with load_in_4bit=True."
            )
        if self.bnb_4bit_quant_type not in _QUANT_TYPES:
            raise ConfigurationError(
                f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is not valid; expected one of "
                f"{list(_QUANT_TYPES)}."
            )
        self.bnb_4bit_compute_dtype = _dtype(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype")
        self.skip_modules = _names(self.skip_modules, "skip_modules")
        self.keep_in_fp32_modules = _names(self.keep_in_fp32_modules, "keep_in_fp32_modules")
        self.target_dtype: torch.dtype | CustomDtype = torch.int8 if self.load_in_8bit else CustomDtype.INT4
        if self.torch_dtype is None:
            self.torch_dtype = torch.float16 if self.load_in_8bit else self.bnb_4bit_compute_dtype
        self.torch_dtype = _dtype(self.torch_dtype, "torch_dtype")


@dataclass
class DataLoaderConfiguration:
    """How the ``Accelerator`` prepares data loaders.

    Args:
        split_batches: split each batch across processes (the batch size must divide by their
            number) instead of giving every process a batch of its own.
        dispatch_batches: iterate on the main process only and send each process its slice
            (``None``: yes for iterable datasets, no otherwise).
        even_batches: repeat samples from the start so every process gets the same number of batches.
        use_seedable_sampler: shuffle with a sampler seeded per epoch, for reproducible runs.
        data_seed: the seed of that sampler (``None``: torch's current seed).
        non_blocking: copy batches to the device asynchronously (use with ``pin_memory=True``).
        use_stateful_dataloader: back the loader by torchdata's ``StatefulDataLoader`` (resumable).
    """

    split_batches: bool = False
    dispatch_batches: bool | None = None
    even_batches: bool = True
    use_seedable_sampler: bool = False
    data_seed: int | None = None
    non_blocking: bool = False
    use_stateful_dataloader: bool = False

    def __post_init__(self) -> None:
        for name in (
            "split_batches",
            "even_batches",
            "use_seedable_sampler",
            "non_blocking",
            "use_stateful_dataloader",
        ):
            setattr(self, name, to_bool(getattr(self, name), name))
        if self.dispatch_batches is not None:
            self.dispatch_batches = to_bool(self.dispatch_batches, "dispatch_batches")
        if self.data_seed is not None:
            self.data_seed = non_negative_int(self.data_seed, "data_seed")


@dataclass
class ProjectConfiguration:
    """Where a project keeps its files, and how saved states are named and pruned.

    Args:
        project_dir: the folder for checkpoints and other outputs.
        logging_dir: the folder for trackers' logs (defaults to ``project_dir``).
        automatic_checkpoint_naming: save states as ``project_dir/checkpoints/checkpoint_{iteration}``.
        total_limit: keep at most this many saved states (the oldest are removed).
        iteration: the number of the next automatically named state.
        save_on_each_node: on several machines, save on each one instead of only the main one.
    """

    project_dir: str | None = None
    logging_dir: str | None = None
    automatic_checkpoint_naming: bool = False
    total_limit: int | None = None
    iteration: int = 0
    save_on_each_node: bool = False

    def set_directories(self, project_dir: str | None = None) -> None:
        """Set ``project_dir``, and ``logging_dir`` to it when no logging folder was chosen."""
        self.project_dir = None if project_dir is None else str(project_dir)
        if self.logging_dir is None:
            self.logging_dir = self.project_dir

    def __post_init__(self) -> None:
        self.automatic_checkpoint_naming = to_bool(
            self.automatic_checkpoint_naming, "automatic_checkpoint_naming"
        )
        self.save_on_each_node = to_bool(self.save_on_each_node, "save_on_each_node")
        self.iteration = non_negative_int(self.iteration, "iteration")
        if self.total_limit is not None:
            self.total_limit = positive_int(self.total_limit, "total_limit")  # 0 would delete every save
        if self.logging_dir is not None:
            self.logging_dir = str(self.logging_dir)
        self.set_directories(self.project_dir)
