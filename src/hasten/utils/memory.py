"""Device memory: freeing cached blocks after large objects go away."""

from __future__ import annotations

import gc

import torch

from hasten.utils.device import accelerator_type


def clear_device_cache(garbage_collection: bool = False) -> None:
    """Return the accelerator's cached, unused memory to the driver (no-op on CPU).

    Args:
        garbage_collection: run a full ``gc.collect()`` first, so that tensors only kept
            alive by reference cycles are freed too. It costs tens of milliseconds in a large
            process, so it is off by default.
    """
    if garbage_collection:
        gc.collect()
    kind = accelerator_type()
    if kind == "cpu":
        return
    module = getattr(torch, kind, None)
    empty_cache = getattr(module, "empty_cache", None)
    if empty_cache is not None:
        empty_cache()
