"""The context ``Accelerator.accumulate(*models)`` returns: count the batch, skip the all-reduce
between optimizer steps.

A small class rather than a generator-based context manager: entering and leaving it is a
few attribute reads, which matters on every batch.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol

from torch import nn


class AccumulationOwner(Protocol):
    """What :class:`Accumulate` needs from the ``Accelerator``."""

    def _begin_batch(self) -> bool: ...

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]: ...


class Accumulate:
    """Count one batch on entry; when it does not end an accumulation, run it under each model's
    ``no_sync``."""

    __slots__ = ("_contexts", "_models", "_owner")

    def __init__(self, owner: AccumulationOwner, models: tuple[nn.Module, ...]) -> None:
        self._owner = owner
        self._models = models
        self._contexts: list[AbstractContextManager[Any]] = []

    def __enter__(self) -> None:
        if self._owner._begin_batch():
            return
        for model in self._models:
            context = self._owner.no_sync(model)
            context.__enter__()
            self._contexts.append(context)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        while self._contexts:
            self._contexts.pop().__exit__(exc_type, exc, traceback)
