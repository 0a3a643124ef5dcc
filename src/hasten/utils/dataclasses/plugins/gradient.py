"""How gradients are accumulated over several batches before the optimizer steps."""

from __future__ import annotations

from dataclasses import dataclass

from hasten.utils.constants import launch_variables
from hasten.utils.dataclasses._env import env_field, positive_int, resolve_fields, to_bool
from hasten.utils.dataclasses.kwargs import KwargsHandler


@dataclass
class GradientAccumulationPlugin(KwargsHandler):
    """Gradient accumulation settings for the ``Accelerator``.

    Args:
        num_steps: batches per optimizer step; read from ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``
            when not passed (``None`` when neither is set: the ``Accelerator`` decides).
        adjust_scheduler: step the scheduler once per optimizer step rather than once per batch.
        sync_with_dataloader: synchronise gradients at the end of the data loader even mid-accumulation.
        sync_each_batch: synchronise gradients after every batch (less memory, more communication).
    """

    num_steps: int | None = env_field(
        launch_variables("GradientAccumulationPlugin")["num_steps"], None, positive_int
    )
    adjust_scheduler: bool = True
    sync_with_dataloader: bool = True
    sync_each_batch: bool = False

    def __post_init__(self) -> None:
        resolve_fields(self)
        for name in ("adjust_scheduler", "sync_with_dataloader", "sync_each_batch"):
            setattr(self, name, to_bool(getattr(self, name), name))
