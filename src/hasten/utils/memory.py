"""Device memory: freeing cached blocks, releasing objects, and finding a batch size that fits."""

from __future__ import annotations

import functools
import gc
import inspect
import traceback
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

from hasten.utils.device import accelerator_type

T = TypeVar("T")


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


_OUT_OF_MEMORY_MESSAGES = (
    "out of memory",  # CUDA / XPU / NPU / MPS allocators, "CUDA error: out of memory"
    "cudnn_status_not_supported",  # cuDNN's answer when the workspace does not fit
    "can't allocate memory",  # torch's CPU allocator
    "allocation failed",  # Habana's PT_DEVMEM
    "failed to allocate",
)


def should_reduce_batch_size(exception: BaseException) -> bool:
    """Whether ``exception`` means "too big for memory", so a smaller batch may succeed.

    True for ``torch.OutOfMemoryError`` and ``MemoryError`` whatever their message, and for a
    ``RuntimeError`` whose message reports running out of memory on any device (or cuDNN's
    not-supported error, which a smaller batch avoids).
    """
    if isinstance(exception, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exception, RuntimeError):
        message = str(exception).lower()
        return any(pattern in message for pattern in _OUT_OF_MEMORY_MESSAGES)
    return False


def release_memory(*objects: Any) -> list[None]:
    """Drop ``objects`` (pass them, then rebind the names to the result), collect garbage and clear
    the device cache: ``model, optimizer = release_memory(model, optimizer)``."""
    objects_list = list(objects)
    for index in range(len(objects_list)):
        objects_list[index] = None
    del objects_list
    clear_device_cache(garbage_collection=True)
    return [None] * len(objects)


def _forget(exception: BaseException) -> None:
    """Free what a failed trial still holds through the exception's traceback frames.

    The frames keep the trial's tensors alive; clearing them frees those tensors by reference
    counting, which is what makes a failed trial cheap (Accelerate runs a full ``gc.collect()``).
    """
    traceback.clear_frames(exception.__traceback__)
    exception.__traceback__ = None


def _check_signature(function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    parameters = list(inspect.signature(function).parameters)
    if len(parameters) < len(args) + 1:
        given = ", ".join(f"{name}={value!r}" for name, value in zip(parameters[1:], args[1:]))
        raise TypeError(
            f"{function.__name__}() got the batch size as its first argument, but find_executable_batch_size "
            f"passes it: call {function.__name__}({given}) without it"
        )


def _batch_size(caller: str, name: str, value: Any) -> int:
    """``value`` when it is an ``int`` of at least 1; otherwise a ``TypeError`` / ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{caller}: {name}={value!r} must be an int of at least 1, not a {type(value).__name__}"
        )
    if value < 1:
        raise ValueError(f"{caller}: {name}={value!r} must be at least 1")
    return value


def _none_fits(function: Callable[..., Any], starting_batch_size: int) -> RuntimeError:
    # Accelerate's sentence first: code in the wild matches on it.
    return RuntimeError(
        f"No executable batch size found, reached zero. {function.__name__} ran out of memory at every batch "
        f"size down to 1 (starting from {starting_batch_size}); the model itself may not fit"
    )


def _attempt(
    function: Callable[..., T], size: int, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[bool, Any]:
    """Run one trial: ``(True, result)``, or ``(False, None)`` after an out-of-memory error (memory freed)."""
    try:
        return True, function(size, *args, **kwargs)
    except Exception as error:
        if not should_reduce_batch_size(error):
            raise
        _forget(error)
        del error
        clear_device_cache()
        return False, None


def find_executable_batch_size(
    function: Callable[..., T] | None = None,
    starting_batch_size: int = 128,
    reduce_batch_size_fn: Callable[[], int] | None = None,
) -> Any:
    """Run ``function(batch_size, ...)``, shrinking ``batch_size`` after each out-of-memory error.

    Use as ``@find_executable_batch_size`` or ``@find_executable_batch_size(starting_batch_size=512)``,
    or call it on a function. The batch size goes to 90% of itself (rounded down) after each
    failure, or to ``reduce_batch_size_fn()``; reaching 0 raises ``RuntimeError`` (its message
    starts with Accelerate's ``No executable batch size found, reached zero.``). Each failed
    trial frees its tensors by clearing the failed call's frames and the device cache (no full
    garbage collection). Later calls of the same wrapped function start from the last batch
    size that worked, not from ``starting_batch_size``.

    Raises:
        TypeError, ValueError: ``starting_batch_size`` is not an int of at least 1, or
            ``reduce_batch_size_fn`` returns something other than a smaller int.
    """
    _batch_size("find_executable_batch_size", "starting_batch_size", starting_batch_size)
    if function is None:
        return functools.partial(
            find_executable_batch_size,
            starting_batch_size=starting_batch_size,
            reduce_batch_size_fn=reduce_batch_size_fn,
        )
    batch_size = starting_batch_size

    def reduce() -> int:
        if reduce_batch_size_fn is None:
            return int(batch_size * 0.9)
        smaller = reduce_batch_size_fn()
        if isinstance(smaller, bool) or not isinstance(smaller, int) or smaller >= batch_size:
            raise ValueError(
                f"find_executable_batch_size: reduce_batch_size_fn() returned {smaller!r} after batch size "
                f"{batch_size} ran out of memory; it must return a smaller int (0 or less to give up)"
            )
        return smaller

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> T:
        nonlocal batch_size
        _check_signature(function, args)
        clear_device_cache()
        while batch_size > 0:
            fits, result = _attempt(function, batch_size, args, kwargs)
            if fits:
                return cast(T, result)
            batch_size = reduce()
        raise _none_fits(function, starting_batch_size)

    return run


def find_largest_executable_batch_size(
    function: Callable[..., T] | None = None,
    starting_batch_size: int = 128,
    max_batch_size: int | None = None,
) -> Any:
    """Find the largest batch size ``function(batch_size, ...)`` runs with, in O(log n) trials.

    Probes from ``starting_batch_size``, doubling while it fits (up to ``max_batch_size``) or
    halving while it does not, then bisects between the last size that fit and the first that
    did not. Each trial runs ``function``, so use it with a cheap trial step (one forward and
    backward pass), not a whole training loop; it returns what the call at the size found
    returned (kept from that trial, so nothing runs twice). Use
    :func:`find_executable_batch_size` when a trial is the whole job.

    Raises:
        TypeError, ValueError: a size is not an int of at least 1, or ``starting_batch_size`` is
            above ``max_batch_size``.
    """
    caller = "find_largest_executable_batch_size"
    _batch_size(caller, "starting_batch_size", starting_batch_size)
    if (
        max_batch_size is not None
        and _batch_size(caller, "max_batch_size", max_batch_size) < starting_batch_size
    ):
        raise ValueError(
            f"{caller}: starting_batch_size={starting_batch_size} is above max_batch_size={max_batch_size}; "
            "start at or below the limit"
        )
    if function is None:
        return functools.partial(
            find_largest_executable_batch_size,
            starting_batch_size=starting_batch_size,
            max_batch_size=max_batch_size,
        )

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> T:
        _check_signature(function, args)
        fits, result = _attempt(function, starting_batch_size, args, kwargs)
        good, bad, best = (starting_batch_size, None, result) if fits else (0, starting_batch_size, None)
        while fits and (max_batch_size is None or good < max_batch_size):
            size = good * 2 if max_batch_size is None else min(good * 2, max_batch_size)
            fits, result = _attempt(function, size, args, kwargs)
            if fits:
                good, best = size, result
            else:
                bad = size
        while not good and bad is not None and bad > 1:
            size = bad // 2
            fits, result = _attempt(function, size, args, kwargs)
            good, best, bad = (size, result, bad) if fits else (good, best, size)
        if not good:
            raise _none_fits(function, starting_batch_size)
        while bad is not None and bad - good > 1:
            size = (good + bad) // 2
            fits, result = _attempt(function, size, args, kwargs)
            good, best, bad = (size, result, bad) if fits else (good, best, size)
        return cast(T, best)

    return run
