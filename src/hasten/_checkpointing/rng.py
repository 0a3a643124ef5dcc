"""Every random stream of a process, captured for a checkpoint and put back on resume.

The keys are Accelerate's (``random_state``, ``numpy_random_seed``, ``torch_manual_seed``,
``torch_<device>_manual_seed``), so either library resumes the other's RNG files. Restoring
happens last in ``load_state``, after everything that might draw, so the resumed run draws
exactly the numbers the uninterrupted one drew.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hasten.utils.device import accelerator_type
from hasten.utils.errors import CheckpointError

_DEVICE_RNGS = ("cuda", "xpu", "mlu", "sdaa", "musa", "hpu", "neuron", "npu")
REQUIRED = ("random_state", "numpy_random_seed", "torch_manual_seed")


def _device_module() -> tuple[str, Any] | None:
    """The accelerator's torch module and its key, when it is in use (``None`` on CPU)."""
    kind = accelerator_type()
    if kind not in _DEVICE_RNGS:
        return None
    module = getattr(torch, kind, None)
    initialized = getattr(module, "is_initialized", None)
    if module is None or (initialized is not None and not initialized()):
        return None
    return f"torch_{kind}_manual_seed", module


def capture() -> dict[str, Any]:
    """The python, numpy, torch and accelerator RNG states of this process."""
    states: dict[str, Any] = {
        "random_state": random.getstate(),
        "numpy_random_seed": np.random.get_state(),
        "torch_manual_seed": torch.get_rng_state(),
    }
    device = _device_module()
    if device is not None:
        key, module = device
        states[key] = module.get_rng_state_all()
    return states


def check(states: Any, path: Path) -> None:
    """Raise if ``states`` (read from ``path``) lacks a stream :func:`restore` needs.

    Raises:
        CheckpointError: a stream is missing.
    """
    missing = [key for key in REQUIRED if not isinstance(states, dict) or key not in states]
    if missing:
        held = sorted(states) if isinstance(states, dict) else type(states).__name__
        raise CheckpointError(
            f"{path} holds no {missing} (it has {held}); it is not an RNG state file written by save_state. "
            "Nothing was loaded."
        )


def restore(states: dict[str, Any]) -> None:
    """Put back what :func:`capture` returned (the accelerator's only when both have one)."""
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    device = _device_module()
    if device is not None and device[0] in states:
        device[1].set_rng_state_all(states[device[0]])
