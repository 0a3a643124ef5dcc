"""Local SGD: each process trains on its own for a few steps, then the processes average their weights.

Inside ``with LocalSGD(accelerator, model, local_sgd_steps=K):`` the model's gradients are not
synchronised (the engine's ``no_sync``), so each process's optimizer steps on its own gradients;
every ``K``-th :meth:`LocalSGD.step`, and on leaving the block, the parameters are replaced by
their mean over the processes. All parameters of one dtype travel in one all-reduce.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import torch

from hasten.utils.dataclasses.enums import DistributedType
from hasten.utils.errors import ConfigurationError
from hasten.utils.operations import reduce

# The engines whose processes each hold whole parameters (not shards), which averaging needs.
_DATA_PARALLEL = {
    DistributedType.NO,
    DistributedType.MULTI_CPU,
    DistributedType.MULTI_GPU,
    DistributedType.MULTI_XPU,
    DistributedType.MULTI_MLU,
    DistributedType.MULTI_HPU,
    DistributedType.MULTI_SDAA,
    DistributedType.MULTI_MUSA,
    DistributedType.MULTI_NPU,
    DistributedType.MULTI_NEURON,
}


class LocalSGD:
    """Averages ``model``'s parameters across processes every ``local_sgd_steps`` optimizer steps.

    Args:
        accelerator: the ``Accelerator`` that prepared ``model``.
        model: the prepared model.
        local_sgd_steps: how many local steps between two averages.
        enabled: ``False`` turns it off (so does running on one process).

    Raises:
        ConfigurationError: the engine shards parameters (FSDP2, DeepSpeed), or ``local_sgd_steps`` is
            not a positive int.
    """

    def __init__(
        self, accelerator: Any, model: torch.nn.Module, local_sgd_steps: int, enabled: bool = True
    ) -> None:
        if accelerator.distributed_type not in _DATA_PARALLEL:
            raise ConfigurationError(
                f"LocalSGD averages whole parameters, but this Accelerator runs "
                f"{accelerator.distributed_type.value}, whose processes hold shards. Use it with DDP (or one "
                "process), not FSDP or DeepSpeed."
            )
        if isinstance(local_sgd_steps, bool) or not isinstance(local_sgd_steps, int) or local_sgd_steps < 1:
            raise ConfigurationError(f"local_sgd_steps={local_sgd_steps!r} must be an int of at least 1.")
        self.enabled = bool(enabled) and accelerator.distributed_type != DistributedType.NO
        self.num_steps = 0
        self.accelerator = accelerator
        self.model = model
        self.local_sgd_steps = local_sgd_steps
        self._no_sync: AbstractContextManager[Any] | None = None

    def __enter__(self) -> LocalSGD:
        if self.enabled:
            self._no_sync = self.accelerator.no_sync(self.model)
            self._no_sync.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._no_sync is None:
            return
        try:
            if exc_type is None:
                self._sync_and_avg_model_params()
        finally:
            context, self._no_sync = self._no_sync, None
            context.__exit__(exc_type, exc, traceback)

    def step(self) -> None:
        """Count one optimizer step; on every ``local_sgd_steps``-th, average the parameters."""
        self.num_steps += 1
        if self.enabled and self.num_steps % self.local_sgd_steps == 0:
            self._sync_and_avg_model_params()

    def _sync_and_avg_model_params(self) -> None:
        """Replace every parameter by its mean over the processes."""
        parameters = [parameter.data for parameter in self.model.parameters()]
        with torch.no_grad():
            for parameter, mean in zip(parameters, reduce(parameters, reduction="mean")):
                parameter.copy_(mean)
