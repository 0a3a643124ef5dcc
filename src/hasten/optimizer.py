"""``AcceleratedOptimizer``: a torch optimizer that steps only when gradients are synchronised.

While the ``Accelerator`` accumulates gradients, ``step`` and ``zero_grad`` do nothing; under
fp16 the step goes through the gradient scaler and is skipped when the gradients overflowed
(:attr:`AcceleratedOptimizer.step_was_skipped`). Everything that depends on the wrapped
optimizer (whether its ``zero_grad`` takes ``set_to_none``) is learned once, when it is wrapped.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from hasten.state import AcceleratorState, GradientState
from hasten.utils.batches import send_to_device


def move_to_device(state: Any, device: Any) -> Any:
    """``state`` (nested lists, tuples and dicts of tensors) with every tensor on ``device``."""
    return send_to_device(state, device)


def patch_optimizer_step(
    accelerated_optimizer: AcceleratedOptimizer, method: Callable[..., Any]
) -> Callable[..., Any]:
    """``method`` (an optimizer's ``step``), noting on ``accelerated_optimizer`` that it was called.

    The gradient scaler calls ``step`` only when the gradients are finite; this is how the
    ``AcceleratedOptimizer`` learns that the step was not skipped.
    """

    def patched_step(*args: Any, **kwargs: Any) -> Any:
        accelerated_optimizer._accelerate_step_called = True
        return method(*args, **kwargs)

    return patched_step


def _takes_set_to_none(optimizer: torch.optim.Optimizer) -> bool:
    try:
        return "set_to_none" in inspect.signature(optimizer.zero_grad).parameters
    except (TypeError, ValueError):  # a builtin without a signature: assume torch's
        return True


class AcceleratedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` so that it steps only on the batches where gradients are synchronised.

    Args:
        optimizer: the optimizer to wrap.
        device_placement: move the optimizer's state to the ``Accelerator``'s device.
        scaler: the gradient scaler of fp16 mixed precision, if any.

    ``state``, ``param_groups`` and ``defaults`` are the wrapped optimizer's; the object
    pickles (the scaler with it).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        device_placement: bool = True,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        # torch.optim.Optimizer.__init__ is not called: the wrapped optimizer holds the state.
        self.optimizer = optimizer
        self.scaler = scaler
        self.accelerator_state = AcceleratorState()
        self.gradient_state = GradientState()
        self.device_placement = device_placement
        self._is_overflow = False
        self._accelerate_step_called = False
        self._set_to_none = _takes_set_to_none(optimizer)
        if device_placement and optimizer.state:
            state_dict = optimizer.state_dict()
            optimizer.load_state_dict(send_to_device(state_dict, self.accelerator_state.device))

    @property
    def state(self) -> Any:
        """The wrapped optimizer's per-parameter state."""
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, param_groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = param_groups

    @property
    def defaults(self) -> dict[str, Any]:
        """The wrapped optimizer's default hyper-parameters."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict into the wrapped optimizer (it casts and places the state itself)."""
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Clear the gradients, except while gradients are being accumulated.

        Raises:
            ValueError: ``set_to_none`` was passed, but the wrapped optimizer's ``zero_grad``
                takes no such argument.
        """
        if not self.gradient_state.sync_gradients:
            return
        if self._set_to_none:
            self.optimizer.zero_grad(set_to_none=True if set_to_none is None else set_to_none)
            return
        if set_to_none is not None:
            raise ValueError(
                f"zero_grad(set_to_none={set_to_none!r}): {type(self.optimizer).__qualname__}.zero_grad "
                "takes no set_to_none argument; call zero_grad() without it."
            )
        self.optimizer.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step the wrapped optimizer, except while gradients are being accumulated.

        Under fp16 the step goes through the gradient scaler, which skips it when a gradient is
        infinite or NaN (then :attr:`step_was_skipped` is ``True``).
        """
        if not self.gradient_state.sync_gradients:
            return None
        if self.scaler is None:
            return self.optimizer.step(closure)
        return self._scaled_step(closure)

    def _scaled_step(self, closure: Callable[[], Any] | None) -> Any:
        inner = self.optimizer
        original = inner.step
        had_own = "step" in inner.__dict__
        self._accelerate_step_called = False
        inner.step = patch_optimizer_step(self, original)  # type: ignore[method-assign]
        try:
            result = self.scaler.step(inner, closure) if closure is not None else self.scaler.step(inner)  # type: ignore[union-attr]
        finally:
            if had_own:
                inner.step = original  # type: ignore[method-assign]
            else:
                del inner.step
        self.scaler.update()  # type: ignore[union-attr]
        self._is_overflow = not self._accelerate_step_called
        return result

    def train(self) -> None:
        """Put the wrapped optimizer in training mode, if it has one (schedule-free optimizers)."""
        for candidate in (self.optimizer, getattr(self.optimizer, "optimizer", None)):
            if callable(getattr(candidate, "train", None)):
                candidate.train()  # type: ignore[union-attr]
                return

    def eval(self) -> None:
        """Put the wrapped optimizer in evaluation mode, if it has one (schedule-free optimizers)."""
        for candidate in (self.optimizer, getattr(self.optimizer, "optimizer", None)):
            if callable(getattr(candidate, "eval", None)):
                candidate.eval()  # type: ignore[union-attr]
                return

    def _switch_parameters(self, parameters_map: dict[Any, Any]) -> None:
        """Replace parameters in every group (``{old: new}``), e.g. after an engine re-created them."""
        for group in self.optimizer.param_groups:
            group["params"] = [parameters_map.get(p, p) for p in group["params"]]

    @property
    def step_was_skipped(self) -> bool:
        """Whether the last step was skipped because the gradients overflowed (fp16)."""
        return self._is_overflow

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"AcceleratedOptimizer({self.optimizer!r})"
