"""Gradient-accumulation bookkeeping shared by the ``Accelerator``, its data loaders and schedulers.

:class:`GradientState` is one record per process (like :class:`hasten.state.PartialState`'s): whether
the next backward synchronises gradients, the accumulation settings in effect, and the data loaders
being iterated (whose end forces a synchronisation). It is importable from ``hasten.state``, where
Accelerate defines it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from hasten.utils.errors import StateResetError


class _HasToKwargs(Protocol):
    def to_kwargs(self) -> dict[str, Any]: ...


@dataclass
class _GradientStateData:
    plugin_kwargs: dict[str, Any] = field(default_factory=dict)
    sync_gradients: bool = True
    active_dataloader: Any = None
    dataloader_references: list[Any] = field(default_factory=lambda: [None])
    is_xla_gradients_synced: bool = False


class GradientState:
    """Gradient-accumulation bookkeeping shared by the ``Accelerator``, its data loaders and schedulers.

    Args:
        gradient_accumulation_plugin: a ``GradientAccumulationPlugin`` (anything with ``to_kwargs()``);
            its settings replace the current ones.
    """

    _shared: ClassVar[_GradientStateData | None] = None

    def __init__(self, gradient_accumulation_plugin: _HasToKwargs | None = None) -> None:
        if GradientState._shared is None:
            GradientState._shared = _GradientStateData()
        if gradient_accumulation_plugin is not None:
            GradientState._shared.plugin_kwargs = dict(gradient_accumulation_plugin.to_kwargs())

    @classmethod
    def _reset_state(cls) -> None:
        """Forget the gradient record (for tests)."""
        GradientState._shared = None

    @property
    def _data(self) -> _GradientStateData:
        if GradientState._shared is None:
            raise StateResetError("The gradient state was reset; create `GradientState()` again.")
        return GradientState._shared

    @property
    def initialized(self) -> bool:
        """Whether the gradient record exists in this process."""
        return GradientState._shared is not None

    @property
    def plugin_kwargs(self) -> dict[str, Any]:
        """The gradient-accumulation settings in effect."""
        return self._data.plugin_kwargs

    @property
    def num_steps(self) -> int:
        """How many batches each optimizer step accumulates."""
        return int(self._data.plugin_kwargs.get("num_steps", 1))

    @property
    def adjust_scheduler(self) -> bool:
        """Whether schedulers step once per accumulated step instead of once per batch."""
        return bool(self._data.plugin_kwargs.get("adjust_scheduler", False))

    @property
    def sync_with_dataloader(self) -> bool:
        """Whether gradients are synchronised at the end of each data loader."""
        return bool(self._data.plugin_kwargs.get("sync_with_dataloader", True))

    @property
    def sync_each_batch(self) -> bool:
        """Whether gradients are synchronised on every batch even while accumulating."""
        return bool(self._data.plugin_kwargs.get("sync_each_batch", False))

    @property
    def sync_gradients(self) -> bool:
        """Whether the next backward pass synchronises gradients across processes."""
        return self._data.sync_gradients

    @property
    def active_dataloader(self) -> Any:
        """The data loader being iterated, if any."""
        return self._data.active_dataloader

    @property
    def dataloader_references(self) -> list[Any]:
        """The stack of data loaders being iterated (``None`` at the bottom)."""
        return self._data.dataloader_references

    @property
    def in_dataloader(self) -> bool:
        """Whether a data loader is being iterated."""
        return self._data.active_dataloader is not None

    @property
    def end_of_dataloader(self) -> bool:
        """Whether the active data loader has yielded its last batch."""
        loader = self._data.active_dataloader
        return bool(loader is not None and getattr(loader, "end_of_dataloader", False))

    @property
    def remainder(self) -> int:
        """How many samples the active data loader's last batch holds beyond an even split (-1 when
        unknown)."""
        loader = self._data.active_dataloader
        return -1 if loader is None else int(getattr(loader, "remainder", -1))

    @property
    def is_xla_gradients_synced(self) -> bool:
        """Whether XLA gradients were already all-reduced for this step."""
        return self._data.is_xla_gradients_synced

    def _set_sync_gradients(self, sync_gradients: bool) -> None:
        self._data.sync_gradients = sync_gradients

    def _add_dataloader(self, dataloader: Any) -> None:
        self._data.active_dataloader = dataloader
        self._data.dataloader_references.append(dataloader)

    def _remove_dataloader(self, dataloader: Any) -> None:
        references = self._data.dataloader_references
        if dataloader in references:
            references.remove(dataloader)
        self._data.active_dataloader = references[-1]

    def __repr__(self) -> str:
        return (
            f"Sync Gradients: {self.sync_gradients}\nAt end of current dataloader: {self.end_of_dataloader}\n"
            f"Extra samples added: {self.remainder}\nGradient accumulation plugin: {self.plugin_kwargs}\n"
        )
