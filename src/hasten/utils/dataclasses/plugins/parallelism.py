"""Settings of the n-D parallelism dimensions: tensor parallel, context parallel, sequence parallel.

These are configuration only: ``ParallelismConfig`` (in :mod:`hasten.parallelism_config`) holds
one of each when its dimension is larger than 1, and the engines read them. Unset fields come
from the ``PARALLELISM_CONFIG_*`` variables ``accelerate launch`` writes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from hasten.utils.dataclasses._env import env_field, one_of, positive_int, resolve_fields, to_bool
from hasten.utils.errors import ConfigurationError
from hasten.utils.versions import is_torch_version

CP_COMM_STRATEGIES = ["allgather", "alltoall"]
SP_ATTENTION_BUILTINS = ["flash_attention_2", "flash_attention_3", "sdpa"]
# torch releases from which the parallelism APIs these configure exist.
TP_MIN_TORCH = "2.3.0"
CP_MIN_TORCH = "2.6.0"


def _require_torch(minimum: str, what: str) -> None:
    if not is_torch_version(">=", minimum):
        import torch

        raise ConfigurationError(
            f"{what} needs torch >= {minimum}; this is torch {torch.__version__}. Upgrade torch or leave "
            "that dimension at size 1."
        )


@dataclass
class TorchTensorParallelPlugin:
    """Tensor parallelism through ``torch.distributed.tensor.parallel``.

    Args:
        tp_size: ranks one layer's weights are split over (at least 1).
        torch_device_mesh: the ``DeviceMesh`` to split over, when already built.
    """

    tp_size: int = 1
    torch_device_mesh: Any = None

    def __post_init__(self) -> None:
        self.tp_size = positive_int(self.tp_size, "tp_size")
        if self.torch_device_mesh is not None:
            from torch.distributed.device_mesh import DeviceMesh

            if not isinstance(self.torch_device_mesh, DeviceMesh):
                raise ConfigurationError(
                    f"torch_device_mesh={self.torch_device_mesh!r} is not a torch.distributed.DeviceMesh; "
                    "build one "
                    "with init_device_mesh or ParallelismConfig.get_device_mesh."
                )


@dataclass
class TorchTensorParallelConfig:
    """How tensor parallelism runs (``ParallelismConfig.tp_handler``).

    Args:
        enable_async_tp: overlap TP communication with compute; not supported, so ``True`` warns
            and is ignored, as in Accelerate.
    """

    enable_async_tp: bool = False

    def __post_init__(self) -> None:
        _require_torch(TP_MIN_TORCH, "Tensor parallelism")
        self.enable_async_tp = to_bool(self.enable_async_tp, "enable_async_tp")
        if self.enable_async_tp:
            warnings.warn(
                "enable_async_tp=True: asynchronous tensor parallelism is not supported; it is ignored.",
                UserWarning,
                stacklevel=3,
            )


@dataclass
class TorchContextParallelConfig:
    """How context parallelism exchanges keys and values (``ParallelismConfig.cp_handler``).

    Args:
        cp_comm_strategy: ``"allgather"`` (default) or ``"alltoall"``
            (``PARALLELISM_CONFIG_CP_COMM_STRATEGY``).
    """

    cp_comm_strategy: str | None = env_field(
        "PARALLELISM_CONFIG_CP_COMM_STRATEGY", "allgather", one_of(CP_COMM_STRATEGIES)
    )

    def __post_init__(self) -> None:
        _require_torch(CP_MIN_TORCH, "Context parallelism")
        resolve_fields(self)


def _sequence_length(value: Any, name: str) -> int | None:
    if isinstance(value, str) and value.strip() == "None":
        return None
    return positive_int(value, name)


def _attention(value: Any, name: str) -> str:
    if value in SP_ATTENTION_BUILTINS:
        return str(value)
    if isinstance(value, str) and "/" in value and "flash-attn" in value:
        return value  # a hub-hosted flash-attention kernel, e.g. kernels-community/flash-attn2
    raise ConfigurationError(
        f"{name}={value!r} is not valid for sequence parallelism; expected one of {SP_ATTENTION_BUILTINS} "
        "or a "
        "hub flash-attention kernel such as 'kernels-community/flash-attn2' ('eager' and 'flex_attention' "
        "cannot be split across ranks)."
    )


@dataclass
class DeepSpeedSequenceParallelConfig:
    """DeepSpeed's sequence parallelism (Ulysses / ALST) (``ParallelismConfig.sp_handler``).

    Args:
        sp_seq_length: the sequence length when every batch has the same one
            (``PARALLELISM_CONFIG_SP_SEQ_LENGTH``).
        sp_seq_length_is_variable: batches may differ in length (default ``True``;
            ``PARALLELISM_CONFIG_SP_SEQ_LENGTH_IS_VARIABLE``). When ``False``, ``sp_seq_length`` is required.
        sp_attn_implementation: ``flash_attention_2``, ``flash_attention_3``, ``sdpa`` or a hub
            flash-attention kernel (``PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION``).
    """

    sp_seq_length: int | None = env_field("PARALLELISM_CONFIG_SP_SEQ_LENGTH", None, _sequence_length)
    sp_seq_length_is_variable: bool | None = env_field(
        "PARALLELISM_CONFIG_SP_SEQ_LENGTH_IS_VARIABLE", True, to_bool
    )
    sp_attn_implementation: str | None = env_field(
        "PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION", None, _attention
    )

    def __post_init__(self) -> None:
        resolve_fields(self)
        if not self.sp_seq_length_is_variable and self.sp_seq_length is None:
            raise ConfigurationError(
                "sp_seq_length_is_variable=False needs sp_seq_length (or PARALLELISM_CONFIG_SP_SEQ_LENGTH): "
                "the "
                "fixed sequence length every batch has."
            )
