"""``AcceleratedScheduler``: a learning-rate scheduler that steps when its optimizers step.

It does not step while gradients are accumulated, nor when the fp16 gradient scaler skipped the
optimizer's step. Without ``split_batches`` every process sees its own batch, so one optimizer
step covers ``num_processes`` batches and the scheduler steps that many times, which keeps a
schedule written for one process right on many.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hasten.state import AcceleratorState, GradientState


class AcceleratedScheduler:
    """Wraps ``scheduler`` so that it follows the optimizer steps that really happened.

    Args:
        scheduler: the learning-rate scheduler to wrap.
        optimizers: the optimizer (or optimizers) it follows.
        step_with_optimizer: step at each optimizer step; ``False`` leaves every ``step()`` to the
            caller (for schedules stepped per epoch).
        split_batches: each batch is split across processes (one scheduler step per optimizer
            step) instead of each process having its own batch (``num_processes`` steps).
    """

    def __init__(
        self,
        scheduler: Any,
        optimizers: Any,
        step_with_optimizer: bool = True,
        split_batches: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.optimizers: Sequence[Any] = (
            list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
        )
        self.split_batches = split_batches
        self.step_with_optimizer = step_with_optimizer
        self.gradient_state = GradientState()
        self._steps_per_step = 1 if split_batches else AcceleratorState().num_processes
        self._total_steps: int | None = getattr(scheduler, "total_steps", None)  # OneCycleLR's limit

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Step the scheduler if the optimizers stepped (see the class docstring)."""
        scheduler = self.scheduler
        if not self.step_with_optimizer:
            scheduler.step(*args, **kwargs)
            return
        if not self.gradient_state.sync_gradients:
            if self.gradient_state.adjust_scheduler:
                scheduler._step_count += 1
            return
        for optimizer in self.optimizers:
            if optimizer.step_was_skipped:
                return
        total = self._total_steps
        for _ in range(self._steps_per_step):
            if total is None or scheduler._step_count <= total:
                scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:
        """The last learning rates the scheduler computed."""
        return self.scheduler.get_last_lr()

    def get_lr(self) -> list[float]:
        """The scheduler's current learning rates."""
        return self.scheduler.get_lr()

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state dict."""
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict into the scheduler."""
        self.scheduler.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"AcceleratedScheduler({self.scheduler!r})"
