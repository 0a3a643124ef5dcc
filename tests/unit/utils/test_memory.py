"""Batch-size search and out-of-memory recognition (utils/memory.py)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from hasten.utils.memory import (
    find_executable_batch_size,
    find_largest_executable_batch_size,
    release_memory,
    should_reduce_batch_size,
)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("out of memory"),
        MemoryError(),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("XPU out of memory."),
        RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"),
        RuntimeError("NPU out of memory."),
        RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a ..."),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"
        ),
    ],
)
def test_every_out_of_memory_form_is_recognised(error: BaseException) -> None:
    assert should_reduce_batch_size(error)


@pytest.mark.parametrize(
    "error", [RuntimeError("shape mismatch"), ValueError("out of memory"), KeyError("x")]
)
def test_other_errors_are_not(error: BaseException) -> None:
    assert not should_reduce_batch_size(error)


def _limited(limit: int, tried: list[int]):
    def step(batch_size: int, scale: int = 1) -> int:
        tried.append(batch_size)
        held = torch.empty(batch_size)  # something the failed trial holds on to
        if batch_size > limit:
            raise torch.OutOfMemoryError(f"out of memory at {batch_size} ({held.numel()})")
        return batch_size * scale

    return step


def test_shrinks_like_accelerate_and_resumes_where_it_stopped() -> None:
    tried: list[int] = []
    run = find_executable_batch_size(_limited(77, tried), starting_batch_size=512)
    assert run(scale=2) == 2 * 72 and len(tried) == 19  # the 0.9 ladder: 512, 460, ..., 81, 72
    tried.clear()
    assert run() == 72 and tried == [72]  # later calls start from the size that worked


def test_decorator_forms_and_custom_schedule() -> None:
    @find_executable_batch_size
    def bare(batch_size: int) -> int:
        return batch_size

    assert bare() == 128

    sizes = iter([100, 50, 10])

    @find_executable_batch_size(starting_batch_size=200, reduce_batch_size_fn=lambda: next(sizes))
    def custom(batch_size: int) -> int:
        if batch_size > 20:
            raise MemoryError
        return batch_size

    assert custom() == 10


def test_zero_is_an_error_and_other_errors_pass_through() -> None:
    with pytest.raises(RuntimeError) as raised:
        find_executable_batch_size(_limited(0, []), starting_batch_size=8)()
    # Accelerate's sentence first (code in the wild matches on it), then the explanation.
    assert str(raised.value).startswith(
        "No executable batch size found, reached zero. step ran out of memory"
    )
    assert "at every batch size down to 1 (starting from 8)" in str(raised.value)

    def broken(batch_size: int) -> None:
        raise KeyError("not memory")

    with pytest.raises(KeyError, match="not memory"):
        find_executable_batch_size(broken)()


def test_passing_the_batch_size_yourself_is_explained() -> None:
    def step(batch_size: int, scale: int) -> int:
        return batch_size

    with pytest.raises(
        TypeError, match=r"step\(\) got the batch size as its first argument.*call step\(scale=3\)"
    ):
        find_executable_batch_size(step)(64, 3)


def test_failed_trials_free_their_tensors_without_a_collection() -> None:
    survivors: list[weakref.ref] = []

    def step(batch_size: int) -> int:
        held = torch.empty(batch_size)
        survivors.append(weakref.ref(held))
        if batch_size > 50:
            raise torch.OutOfMemoryError("out of memory")
        return batch_size

    gc.disable()
    try:
        assert find_executable_batch_size(step, starting_batch_size=64)() == 45
        assert all(ref() is None for ref in survivors[:-1])
    finally:
        gc.enable()


def test_bisection_finds_the_largest_size_in_few_trials() -> None:
    tried: list[int] = []
    assert find_largest_executable_batch_size(_limited(77, tried), starting_batch_size=512)() == 77
    assert len(tried) <= 12 and 77 in tried
    tried.clear()
    assert (
        find_largest_executable_batch_size(_limited(77, tried), starting_batch_size=8, max_batch_size=64)()
        == 64
    )
    with pytest.raises(RuntimeError, match=r"^No executable batch size found, reached zero\. step ran out"):
        find_largest_executable_batch_size(_limited(0, []), starting_batch_size=4)()


def test_the_largest_size_respects_the_limit() -> None:
    tried: list[int] = []
    assert (
        find_largest_executable_batch_size(_limited(1000, tried), starting_batch_size=10, max_batch_size=10)()
        == 10
    )
    assert tried == [10]
    with pytest.raises(
        ValueError, match=r"starting_batch_size=100 is above max_batch_size=10; start at or below the limit"
    ):
        find_largest_executable_batch_size(_limited(1000, []), starting_batch_size=100, max_batch_size=10)
    with pytest.raises(ValueError, match=r"starting_batch_size=100 is above max_batch_size=10"):
        find_largest_executable_batch_size(starting_batch_size=100, max_batch_size=10)
    with pytest.raises(ValueError, match=r"max_batch_size=0 must be at least 1"):
        find_largest_executable_batch_size(starting_batch_size=1, max_batch_size=0)


@pytest.mark.parametrize(
    ("size", "error", "message"),
    [
        (0, ValueError, r"starting_batch_size=0 must be at least 1"),
        (-4, ValueError, r"starting_batch_size=-4 must be at least 1"),
        ("8", TypeError, r"starting_batch_size='8' must be an int of at least 1, not a str"),
        (8.0, TypeError, r"starting_batch_size=8.0 must be an int of at least 1, not a float"),
        (True, TypeError, r"starting_batch_size=True must be an int of at least 1, not a bool"),
    ],
)
def test_the_starting_size_is_an_int_of_at_least_one(size: object, error: type, message: str) -> None:
    for search in (find_executable_batch_size, find_largest_executable_batch_size):
        with pytest.raises(error, match=f"{search.__name__}: {message}"):
            search(starting_batch_size=size)
        with pytest.raises(error, match=message):
            search(_limited(10, []), starting_batch_size=size)


def test_a_schedule_that_does_not_shrink_is_an_error() -> None:
    run = find_executable_batch_size(
        _limited(10, []), starting_batch_size=64, reduce_batch_size_fn=lambda: 64
    )
    with pytest.raises(ValueError, match=r"reduce_batch_size_fn\(\) returned 64 after batch size 64 ran out"):
        run()


def test_release_memory_returns_nones() -> None:
    a, b = torch.ones(3), torch.ones(4)
    a, b = release_memory(a, b)
    assert a is None and b is None
