"""Seeding every random-number generator, and making all ranks share rank 0's state."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from hasten.state import PartialState
from hasten.utils.dataclasses.enums import RNGType
from hasten.utils.device import accelerator_type
from hasten.utils.imports import is_torch_xla_available
from hasten.utils.operations import broadcast

_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.manual_seed accepts
_ACCELERATOR_RNGS = ("cuda", "xpu", "npu", "mlu", "musa", "sdaa", "hpu", "neuron")


def set_seed(seed: int, device_specific: bool = False, deterministic: bool = False) -> None:
    """Seed Python's ``random``, NumPy, torch's CPU generator and every accelerator present.

    Args:
        seed: the seed, an int from -2**63 to 2**64 - 1 (the range torch's generators take).
        device_specific: add the process index, so each rank draws different numbers
            (data augmentation) while runs stay reproducible.
        deterministic: also make torch use deterministic algorithms (slower; raises on
            operations that have none).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"set_seed: seed={seed!r} must be an int")
    if device_specific:
        seed += PartialState().process_index
    if not _SEED_MIN <= seed <= _SEED_MAX:
        added = " (with the process index added)" if device_specific else ""
        raise ValueError(
            f"set_seed: seed={seed!r}{added} is outside the range torch's generators take, "
            f"{_SEED_MIN} to {_SEED_MAX} (2**64 - 1); pass a smaller seed, e.g. seed % 2**32."
        )
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    kind = accelerator_type()
    if kind in _ACCELERATOR_RNGS:
        getattr(torch, kind).manual_seed_all(seed)
    if is_torch_xla_available():
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def _device_module(rng_type: RNGType) -> Any:
    module = getattr(torch, rng_type.value, None)
    if module is None or not getattr(module, "is_available", lambda: False)():
        raise ValueError(
            f"rng_type={rng_type.value!r}: this machine has no {rng_type.value} device to synchronise; "
            f"use one of {[RNGType.TORCH.value, RNGType.GENERATOR.value]} here"
        )
    return module


def _get_state(rng_type: RNGType, generator: torch.Generator | None) -> torch.Tensor:
    if rng_type == RNGType.TORCH:
        return torch.get_rng_state()
    if rng_type == RNGType.GENERATOR:
        if generator is None:
            raise ValueError("rng_type='generator' needs the generator to synchronise: pass generator=...")
        return generator.get_state()
    if rng_type == RNGType.XLA:
        if not is_torch_xla_available():
            raise ValueError(
                "rng_type='xla': torch_xla is not installed, so there is no XLA generator to synchronise"
            )
        import torch_xla.core.xla_model as xm

        return torch.tensor(xm.get_rng_state(), dtype=torch.int64)
    return _device_module(rng_type).get_rng_state()


def _set_state(rng_type: RNGType, state: torch.Tensor, generator: torch.Generator | None) -> None:
    if rng_type == RNGType.TORCH:
        torch.set_rng_state(state)
    elif rng_type == RNGType.GENERATOR:
        assert generator is not None
        generator.set_state(state)
    elif rng_type == RNGType.XLA:
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(int(state.item()))
    else:
        _device_module(rng_type).set_rng_state(state)


def synchronize_rng_state(
    rng_type: RNGType | str | None = None, generator: torch.Generator | None = None
) -> None:
    """Give this rank's generator rank 0's state, so every rank draws the same numbers next.

    Args:
        rng_type: which generator (an :class:`RNGType` or its value); ``None`` means ``generator``
            when one is passed, else torch's CPU generator.
        generator: the ``torch.Generator`` to synchronise for ``rng_type="generator"``.
    """
    if rng_type is None:
        kind = RNGType.GENERATOR if generator is not None else RNGType.TORCH
    else:
        kind = RNGType.parse(rng_type, "rng_type")
    state = _get_state(kind, generator)
    if PartialState().num_processes > 1:
        state = broadcast(state.clone(), from_process=0)
    _set_state(kind, state, generator)


def synchronize_rng_states(
    rng_types: Iterable[RNGType | str], generator: torch.Generator | None = None
) -> None:
    """:func:`synchronize_rng_state` for each of ``rng_types``."""
    for rng_type in rng_types:
        synchronize_rng_state(RNGType.parse(rng_type, "rng_types"), generator)
