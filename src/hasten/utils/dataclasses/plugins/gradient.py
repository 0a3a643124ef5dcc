"""Gradient accumulation settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from hasten.utils.dataclasses._env import resolve
from hasten.utils.dataclasses.kwargs import KwargsHandler


@dataclass
class GradientAccumulationPlugin(KwargsHandler):
    """How many batches to accumulate before each optimizer step, and when to synchronise gradients.

    ``num_steps`` left unset reads ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` (set by ``hasten launch
    --gradient_accumulation_steps``); it stays ``None`` when that is unset too, and the Accelerator
    then uses 1. ``adjust_scheduler`` steps schedulers once per optimizer step;
    ``sync_with_dataloader`` forces a step at the end of the data; ``sync_each_batch`` synchronises
    every batch (less memory with DDP, more communication).
    """

    num_steps: Union[int, None] = None
    adjust_scheduler: bool = True
    sync_with_dataloader: bool = True
    sync_each_batch: bool = False

    def __post_init__(self) -> None:
        self.num_steps = resolve(self.num_steps, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", int)
        if self.num_steps is not None and (isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int)
                                           or self.num_steps < 1):  # fmt: skip
            raise ValueError(f"num_steps={self.num_steps!r} must be a positive int (batches per optimizer step)")
        for name in ("adjust_scheduler", "sync_with_dataloader", "sync_each_batch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
