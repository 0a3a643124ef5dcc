"""DeepSpeed pieces of the training loop, at Accelerate's path (``accelerate.utils.deepspeed``).

``DummyOptim`` and ``DummyScheduler`` stand for the optimizer and scheduler a DeepSpeed config
file describes, so a script keeps its ``prepare(model, optimizer, scheduler)`` shape. The
wrappers are what ``prepare`` returns under DeepSpeed: the engine runs backward, clipping, the
optimizer and the scheduler in :meth:`DeepSpeedEngineWrapper.backward`, so the prepared
optimizer's and scheduler's own ``step`` and ``zero_grad`` do nothing.

Every name imports without deepspeed installed; what needs deepspeed raises an ``ImportError``
naming the extra that installs it when it is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch

from hasten.optimizer import AcceleratedOptimizer
from hasten.scheduler import AcceleratedScheduler
from hasten.utils.dataclasses.enums import DistributedType
from hasten.utils.dataclasses.plugins.deepspeed_config import HfDeepSpeedConfig as HfDeepSpeedConfig
from hasten.utils.errors import ConfigurationError
from hasten.utils.imports import require


def _bnb_bits(optimizer: Any, names: tuple[str, ...]) -> int | None:
    """The ``optim_bits`` of a bitsandbytes optimizer whose class is one of ``names`` (``None`` otherwise).

    Looks at the class, never imports bitsandbytes.
    """
    cls = type(optimizer)
    if not cls.__module__.startswith("bitsandbytes") or cls.__name__ not in names:
        return None
    bits = getattr(optimizer, "optim_bits", None)
    if bits is None:
        bits = getattr(getattr(optimizer, "args", None), "optim_bits", None)
    return None if bits is None else int(bits)


def map_pytorch_optim_to_deepspeed(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """DeepSpeed's CPU optimizer for ``optimizer`` (what ZeRO-Offload steps on the CPU), with its groups,
    learning rate and weight decay.

    ``torch.optim.Adagrad`` (and 32-bit bitsandbytes Adagrad) becomes ``DeepSpeedCPUAdagrad``, 32-bit
    bitsandbytes Lion ``DeepSpeedCPULion``, anything else ``DeepSpeedCPUAdam`` (in AdamW mode for
    ``torch.optim.AdamW`` and 32-bit bitsandbytes AdamW).

    Raises:
        ImportError: deepspeed is not installed.
    """
    require("deepspeed", purpose="map_pytorch_optim_to_deepspeed")
    defaults = {key: value for key, value in optimizer.defaults.items() if key in ("lr", "weight_decay")}
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.Adagrad) or _bnb_bits(optimizer, ("Adagrad", "Adagrad32bit")) == 32:
        from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

        return DeepSpeedCPUAdagrad(groups, **defaults)
    if _bnb_bits(optimizer, ("Lion", "Lion32bit")) == 32:
        from deepspeed.ops.lion import DeepSpeedCPULion

        return DeepSpeedCPULion(groups, **defaults)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    adamw = isinstance(optimizer, torch.optim.AdamW) or _bnb_bits(optimizer, ("AdamW", "AdamW32bit")) == 32
    return DeepSpeedCPUAdam(groups, adamw_mode=adamw, **defaults)


def get_active_deepspeed_plugin(state: Any) -> Any:
    """The DeepSpeed plugin in use: the selected one of ``state.deepspeed_plugins``.

    Raises:
        ConfigurationError: ``state`` does not run DeepSpeed.
    """
    if state.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigurationError(
            f"There is no active DeepSpeed plugin: the state runs {state.distributed_type.value}. Pass "
            "deepspeed_plugin=DeepSpeedPlugin(...) to the Accelerator (or launch with a DeepSpeed config)."
        )
    plugins = state.deepspeed_plugins
    if not isinstance(plugins, dict):
        return plugins
    return next((plugin for plugin in plugins.values() if plugin.selected), None)


class DeepSpeedEngineWrapper:
    """Runs the training step through a ``deepspeed.DeepSpeedEngine``: backward, then on the last batch of
    an accumulation, the engine's step (clipping, optimizer, zero_grad, scheduler).

    Args:
        engine: what ``deepspeed.initialize`` returned first.

    Raises:
        ImportError: deepspeed is not installed.
    """

    def __init__(self, engine: Any) -> None:
        require("deepspeed", purpose="DeepSpeedEngineWrapper")
        self.engine = engine

    def backward(self, loss: torch.Tensor, sync_gradients: bool = True, **kwargs: Any) -> None:
        """The engine's backward of ``loss`` (it divides by the accumulation steps and scales); with
        ``sync_gradients``, this batch ends an accumulation and the engine steps."""
        engine = self.engine
        engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
        engine.backward(loss, **kwargs)
        if sync_gradients:
            engine.step()

    def get_global_grad_norm(self) -> float | None:
        """The gradients' total norm the engine computed at its last step (``None`` when it computes none)."""
        norm = self.engine.get_global_grad_norm()
        return norm.item() if isinstance(norm, torch.Tensor) else norm


class DeepSpeedOptimizerWrapper(AcceleratedOptimizer):
    """The optimizer ``deepspeed.initialize`` returned; its ``step`` and ``zero_grad`` do nothing because the
    engine runs them in ``backward``.

    Args:
        optimizer: the DeepSpeed (ZeRO) optimizer.
    """

    def __init__(self, optimizer: Any) -> None:
        super().__init__(optimizer, device_placement=False, scaler=None)
        self._reports_overflow = hasattr(optimizer, "overflow")

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Nothing: the DeepSpeed engine clears the gradients after its step."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Nothing: the DeepSpeed engine steps in ``Accelerator.backward``."""
        return None

    @property
    def step_was_skipped(self) -> bool:
        """Whether the engine's last step was skipped because fp16 gradients overflowed."""
        return bool(cast(Any, self.optimizer).overflow) if self._reports_overflow else False


class DeepSpeedSchedulerWrapper(AcceleratedScheduler):
    """The learning-rate scheduler ``deepspeed.initialize`` returned; its ``step`` does nothing because the
    engine steps it after each optimizer step.

    Args:
        scheduler: the scheduler the engine holds.
        optimizers: the prepared optimizer(s) it follows.
    """

    def __init__(self, scheduler: Any, optimizers: Any) -> None:
        super().__init__(scheduler, optimizers)

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the DeepSpeed engine steps the scheduler."""


class DummyOptim:
    """Stands for the optimizer of the DeepSpeed config (its ``"optimizer"`` section): pass it to ``prepare``
    in place of a torch optimizer.

    Args:
        params: the parameters (or parameter groups) to optimise.
        lr: the learning rate, for the config's ``"auto"`` value.
        weight_decay: the weight decay, for the config's ``"auto"`` value.
        **kwargs: kept in :attr:`kwargs`.
    """

    def __init__(
        self, params: Iterable[Any], lr: float = 0.001, weight_decay: float = 0, **kwargs: Any
    ) -> None:
        self.params = params
        self.lr = lr
        self.weight_decay = weight_decay
        self.kwargs = kwargs


class DummyScheduler:
    """Stands for the scheduler of the DeepSpeed config (its ``"scheduler"`` section), or one built by
    ``lr_scheduler_callable(optimizer)``: pass it to ``prepare`` with a :class:`DummyOptim`.

    Args:
        optimizer: the :class:`DummyOptim` it schedules.
        total_num_steps: the optimizer steps of the whole run (for the config's ``"auto"`` value;
            divided by the number of processes unless batches are split).
        warmup_num_steps: warm-up steps (for the config's ``"auto"`` value).
        lr_scheduler_callable: builds the scheduler from the engine's optimizer.
        **kwargs: kept in :attr:`kwargs`.
    """

    def __init__(
        self,
        optimizer: Any,
        total_num_steps: int | None = None,
        warmup_num_steps: int = 0,
        lr_scheduler_callable: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.optimizer = optimizer
        self.total_num_steps = total_num_steps
        self.warmup_num_steps = warmup_num_steps
        self.lr_scheduler_callable = lr_scheduler_callable
        self.kwargs = kwargs
