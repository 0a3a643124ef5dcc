"""Fixtures every test gets: no leaked environment, no leftover hasten state or process group.

Multi-process tests take the session-wide pools ``ranks2`` and ``ranks4``
(real gloo groups on 127.0.0.1, started once and reused; see ``tests/ranks.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch._inductor.config  # noqa: F401  see below
import torch.distributed as dist

from tests.ranks import RankPool

_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def pytest_sessionstart(session: pytest.Session) -> None:
    present = [name for name in _LAUNCH_VARIABLES if name in os.environ]
    if present:
        raise pytest.UsageError(f"Run the tests outside a launcher: {present} are set in the environment.")


# Set by others, not by the code under test: pytest names the running test, torch._dynamo
# (imported by torch itself on first use of some ops, e.g. init on meta) records its cache
# folder (inductor also records a data-pointer setting when it compiles), and importing
# Accelerate (differential tests) sets its CUDA check. The inductor config is also imported
# above, before any test, so its one-time write is never charged to whichever test first runs
# a backward pass, torch.compile or bitsandbytes.
_NOT_OURS = {
    "PYTEST_CURRENT_TEST",
    "TORCHINDUCTOR_CACHE_DIR",
    "PYTORCH_NVML_BASED_CUDA_CHECK",
    "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
}


def _environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in _NOT_OURS}


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """Fail a test that leaves environment variables changed; reset hasten's state and the process group."""
    from hasten.state import AcceleratorState, GradientState

    before = _environment()
    yield
    after = _environment()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if after != before:
        for key in set(after) - set(before):
            del os.environ[key]
        os.environ.update(before)
        changed = sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))
        pytest.fail(f"The test changed environment variables {changed} without restoring them.")


@pytest.fixture(scope="session")
def ranks2() -> Iterator[RankPool]:
    """Two gloo ranks, shared by every test in the session."""
    pool = RankPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def ranks4() -> Iterator[RankPool]:
    """Four gloo ranks, shared by every test in the session."""
    pool = RankPool(4)
    yield pool
    pool.close()
