"""The ``Accelerator``'s view of the processes: who and where this process is, collectives, and
helpers that run code on some processes only.

A mixin of :class:`hasten.accelerator.Accelerator`, kept apart so the facade stays small; it
reads the shared state and the frozen settings and holds nothing of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from hasten.engines.connector import Settings
from hasten.engines.outputs import gather_for_metrics
from hasten.state import AcceleratorState, GradientState
from hasten.utils.dataclasses.configs import DataLoaderConfiguration
from hasten.utils.dataclasses.enums import DistributedType, FP8BackendType
from hasten.utils.operations import gather, pad_across_processes, reduce

F = TypeVar("F", bound=Callable[..., Any])

_ACCELERATOR_DEVICES = (
    DistributedType.MULTI_GPU,
    DistributedType.MULTI_MLU,
    DistributedType.MULTI_SDAA,
    DistributedType.MULTI_MUSA,
    DistributedType.MULTI_NPU,
    DistributedType.MULTI_XPU,
    DistributedType.MULTI_HPU,
    DistributedType.MULTI_NEURON,
)


class ProcessMixin:
    """Process layout, collectives and process-selective helpers of the ``Accelerator``."""

    state: AcceleratorState
    gradient_state: GradientState
    dataloader_config: DataLoaderConfiguration
    flag_tensor: torch.Tensor | None
    _settings: Settings
    _dataloaders: list[Any]

    # --- the process layout -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device this process computes on."""
        return self._settings.device

    @property
    def distributed_type(self) -> DistributedType:
        """How the processes share the work."""
        return self._settings.distributed_type

    @property
    def num_processes(self) -> int:
        """How many processes take part."""
        return self._settings.num_processes

    @property
    def process_index(self) -> int:
        """This process's global rank."""
        return self._settings.process_index

    @property
    def local_process_index(self) -> int:
        """This process's rank on its machine."""
        return self._settings.local_process_index

    @property
    def use_distributed(self) -> bool:
        """Whether several processes take part."""
        return self._settings.use_distributed

    @property
    def multi_device(self) -> bool:
        """Whether several processes each drive an accelerator (GPU, XPU, NPU, ...)."""
        return self._settings.use_distributed and self._settings.distributed_type in _ACCELERATOR_DEVICES

    @property
    def is_main_process(self) -> bool:
        """Whether this is global rank 0."""
        return self.state.is_main_process

    @property
    def is_local_main_process(self) -> bool:
        """Whether this is rank 0 on its machine."""
        return self.state.is_local_main_process

    @property
    def is_last_process(self) -> bool:
        """Whether this is the highest global rank."""
        return self.state.is_last_process

    @property
    def mixed_precision(self) -> str:
        """``"no"``, ``"fp16"`` or ``"bf16"``."""
        return self._settings.mixed_precision.value

    @property
    def fp8_backend(self) -> FP8BackendType:
        """The FP8 backend named by ``ACCELERATE_FP8_BACKEND`` (hasten trains in FP8 with none)."""
        return self._settings.fp8_backend

    @property
    def deepspeed_plugin(self) -> Any:
        """The active DeepSpeed plugin, if any."""
        return self.state.deepspeed_plugin

    @property
    def is_fsdp2(self) -> bool:
        """Whether models are sharded with FSDP2 (``fully_shard``)."""
        plugin = self.state.fsdp_plugin
        return self.distributed_type == DistributedType.FSDP and getattr(plugin, "fsdp_version", 1) == 2

    @property
    def is_composable_parallelism_enabled(self) -> bool:
        """Whether composable (FSDP2) parallelism is in use."""
        return self.is_fsdp2

    @property
    def parallelism_config(self) -> None:
        """n-D parallelism layout: hasten has none."""
        return None

    @property
    def torch_device_mesh(self) -> None:
        """The device mesh of n-D parallelism: hasten has none."""
        return None

    @property
    def should_save_model(self) -> bool:
        """Whether this process writes model files (the local main process)."""
        return self.is_local_main_process

    def _no_parallelism(self, kind: str) -> RuntimeError:
        return RuntimeError(
            f"{kind} parallelism is not configured: hasten runs data parallelism only (no "
            "parallelism_config)."
        )

    @property
    def tensor_parallel_rank(self) -> int:
        """Raises ``RuntimeError``: hasten has no tensor parallelism."""
        raise self._no_parallelism("Tensor")

    @property
    def pipeline_parallel_rank(self) -> int:
        """Raises ``RuntimeError``: hasten has no pipeline parallelism."""
        raise self._no_parallelism("Pipeline")

    @property
    def context_parallel_rank(self) -> int:
        """Raises ``RuntimeError``: hasten has no context parallelism."""
        raise self._no_parallelism("Context")

    @property
    def data_parallel_rank(self) -> int:
        """Raises ``RuntimeError``: without ``parallelism_config`` use :attr:`process_index`."""
        raise self._no_parallelism("Replicated data")

    @property
    def data_parallel_shard_rank(self) -> int:
        """Raises ``RuntimeError``: without ``parallelism_config`` use :attr:`process_index`."""
        raise self._no_parallelism("Sharded data")

    # --- across processes ---------------------------------------------------------------------

    def gather(self, tensor: Any) -> Any:
        """``hasten.utils.gather``: every process's tensors, concatenated in rank order."""
        return gather(tensor)

    def gather_for_metrics(self, input_data: Any, use_gather_object: bool = False) -> Any:
        """Gather predictions or labels for metrics, dropping the samples the last batch repeated to
        even out the processes. Non-tensors (or all, with ``use_gather_object``) go through
        ``gather_object``."""
        return gather_for_metrics(
            input_data, use_gather_object, self.gradient_state, self._settings.use_distributed
        )

    def reduce(self, tensor: Any, reduction: str = "sum", scale: float = 1.0) -> Any:
        """``hasten.utils.reduce``, summing by default."""
        return reduce(tensor, reduction, scale)  # type: ignore[arg-type]

    def pad_across_processes(
        self, tensor: Any, dim: int = 0, pad_index: int = 0, pad_first: bool = False
    ) -> Any:
        """``hasten.utils.pad_across_processes``."""
        return pad_across_processes(tensor, dim=dim, pad_index=pad_index, pad_first=pad_first)

    def set_trigger(self) -> None:
        """Raise this process's flag; :meth:`check_trigger` then sees it on every process."""
        self.flag_tensor = torch.tensor(1, device=self.device)

    def check_trigger(self) -> bool:
        """Whether any process called :meth:`set_trigger` since the last check (the flag is then
        lowered)."""
        if self.flag_tensor is None:
            self.flag_tensor = torch.tensor(0, device=self.device)
        if reduce(self.flag_tensor, "sum").item() >= 1:
            self.flag_tensor = torch.tensor(0, device=self.device)
            return True
        return False

    def wait_for_everyone(self) -> None:
        """Block until every process gets here."""
        self.state.wait_for_everyone()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the local main process only."""
        self.state.print(*args, **kwargs)

    def split_between_processes(
        self, inputs: Any, apply_padding: bool = False
    ) -> contextlib.AbstractContextManager[Any]:
        """Context yielding this process's share of ``inputs`` (see ``PartialState``)."""
        return self.state.split_between_processes(inputs, apply_padding=apply_padding)

    def main_process_first(self) -> contextlib.AbstractContextManager[None]:
        """Context running its block on the main process first, then on the others."""
        return self.state.main_process_first()

    def local_main_process_first(self) -> contextlib.AbstractContextManager[None]:
        """Context running its block on each machine's local main process first."""
        return self.state.local_main_process_first()

    def on_main_process(self, function: F | None = None) -> F:
        """Decorator: run the function on the main process only."""
        return self.state.on_main_process(function)

    def on_local_main_process(self, function: F | None = None) -> F:
        """Decorator: run the function on each machine's local main process only."""
        return self.state.on_local_main_process(function)

    def on_last_process(self, function: F | None = None) -> F:
        """Decorator: run the function on the last process only."""
        return self.state.on_last_process(function)

    def on_process(self, function: F | None = None, process_index: int | None = None) -> Any:
        """Decorator: run the function on global rank ``process_index`` only."""
        return self.state.on_process(function, process_index=process_index)

    def on_local_process(self, function: F | None = None, local_process_index: int | None = None) -> Any:
        """Decorator: run the function on local rank ``local_process_index`` only."""
        return self.state.on_local_process(function, local_process_index=local_process_index)

    @contextlib.contextmanager
    def join_uneven_inputs(
        self, joinables: Sequence[Any], even_batches: bool | None = None
    ) -> Iterator[None]:
        """Context letting DDP processes with fewer batches finish early (``torch.distributed``'s
        ``Join``), on every backend; ``even_batches`` overrides the prepared data loaders' setting inside.

        Raises:
            TypeError: a joinable is not a ``torch.distributed.algorithms.Joinable`` (e.g. a model that
                DDP does not wrap).
        """
        if not self.use_distributed:
            yield
            return
        from torch.distributed.algorithms.join import Join, Joinable

        for position, joinable in enumerate(joinables):
            if not isinstance(joinable, Joinable):
                raise TypeError(
                    f"join_uneven_inputs: joinables[{position}] is a {type(joinable).__qualname__}, not a "
                    "Joinable; pass the models prepare() wrapped in DistributedDataParallel."
                )
        overridden = []
        if even_batches is not None:
            for loader in self._dataloaders:
                sampler: Any = getattr(loader, "batch_sampler", None)
                if hasattr(sampler, "even_batches"):
                    overridden.append((sampler, sampler.even_batches))
                    sampler.even_batches = even_batches
        enable = not (self.dataloader_config.even_batches if even_batches is None else even_batches)
        try:
            with Join(list(joinables), enable=enable, throw_on_early_termination=False):
                yield
        finally:
            for sampler, value in overridden:
                sampler.even_batches = value
