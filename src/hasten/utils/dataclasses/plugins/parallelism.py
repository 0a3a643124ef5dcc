"""Settings of the tensor and context parallel dimensions (sequence parallelism's are in
:mod:`.sequence_parallel`).

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
