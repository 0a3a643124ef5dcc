"""The one place hasten parses environment variables, and helpers that scope changes to them.

Every boolean read from the environment goes through :func:`str_to_bool`, every
integer through :func:`get_int_from_env`, so ``ACCELERATE_*`` variables mean the
same thing everywhere in hasten (and the same thing they mean in Accelerate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import platform
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, TypeVar, cast, overload

from hasten.utils.numa import cpus_of_accelerator

logger = logging.getLogger(__name__)

_TRUE = ("y", "yes", "t", "true", "on", "1")
_FALSE = ("n", "no", "f", "false", "off", "0")

T = TypeVar("T")


@overload
def str_to_bool(value: str, to_bool: Literal[False] = ...) -> int: ...
@overload
def str_to_bool(value: str, to_bool: Literal[True]) -> bool: ...
def str_to_bool(value: str, to_bool: bool = False) -> int | bool:
    """Read a yes/no string: ``1`` (or ``True``) for y, yes, t, true, on, 1; ``0`` for their opposites.

    Raises:
        ValueError: the string is neither; the message lists both spellings.

    >>> str_to_bool("Yes"), str_to_bool("off", to_bool=True)
    (1, False)
    """
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True if to_bool else 1
    if lowered in _FALSE:
        return False if to_bool else 0
    raise ValueError(f"Cannot read {value!r} as a boolean; use one of {_TRUE} or {_FALSE}.")


def parse_flag_from_env(key: str, default: bool = False) -> bool:
    """Read the environment variable ``key`` as a boolean, ``default`` when unset or empty."""
    value = os.environ.get(key, "")
    if not value.strip():
        return default
    try:
        return str_to_bool(value, to_bool=True)
    except ValueError as error:
        raise ValueError(f"Environment variable {key}={value!r}: {error}") from None


def parse_choice_from_env(key: str, default: str = "no") -> str:
    """Read the environment variable ``key`` as a string, ``default`` when unset."""
    return os.environ.get(key, str(default))


def int_variables(env_keys: Iterable[str], env: Mapping[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """Each variable among ``env_keys`` that is set (and not empty) in ``env`` (``os.environ`` by
    default), in order, with its integer value.

    Raises:
        ValueError: a variable is set to something that is not an integer, naming it.
    """
    env = os.environ if env is None else env
    for key in env_keys:
        raw = env.get(key)
        if raw is None or not raw.strip():
            continue
        try:
            yield key, int(raw)
        except ValueError:
            raise ValueError(f"Environment variable {key}={raw!r} must be an integer.") from None


def get_int_from_env(env_keys: Iterable[str], default: int) -> int:
    """The first non-negative integer found among the variables ``env_keys``, else ``default``.

    Raises:
        ValueError: a variable is set to something that is not an integer.
    """
    return next((value for _, value in int_variables(env_keys) if value >= 0), default)


def are_libraries_initialized(*library_names: str) -> list[str]:
    """The names among ``library_names`` that have already been imported in this process."""
    import sys

    return [name for name in library_names if name in sys.modules]


@contextlib.contextmanager
def patch_environment(**kwargs: Any) -> Iterator[None]:
    """Set environment variables for the duration of a ``with`` block, then restore exactly.

    Keys are upper-cased and values converted with ``str``. On exit (also on an
    exception) each key gets back its previous value, and keys that were absent
    are removed again.

    >>> with patch_environment(hasten_doc_example=1):
    ...     os.environ["HASTEN_DOC_EXAMPLE"]
    '1'
    >>> "HASTEN_DOC_EXAMPLE" in os.environ
    False
    """
    updates = {key.upper(): str(value) for key, value in kwargs.items()}
    previous = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def clear_environment() -> Iterator[None]:
    """Empty ``os.environ`` for the duration of a ``with`` block, then restore it exactly.

    ``os.environ`` keeps its identity, so references to it held elsewhere stay valid.
    """
    saved = dict(os.environ)
    os.environ.clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _restore_accelerate_variables(before: Mapping[str, str]) -> None:
    for key in [key for key in os.environ if key.startswith("ACCELERATE_")]:
        if key not in before:
            del os.environ[key]
    for key, value in before.items():
        os.environ[key] = value


def _purged(function: Callable[..., T]) -> Callable[..., T]:
    if getattr(function, "_purges_accelerate_environment", False):
        return function

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        before = {key: value for key, value in os.environ.items() if key.startswith("ACCELERATE_")}
        try:
            return function(*args, **kwargs)
        finally:
            _restore_accelerate_variables(before)

    wrapper._purges_accelerate_environment = True  # type: ignore[attr-defined]
    return wrapper


def _purge_test_methods(cls: type) -> None:
    """Wrap every ``test*`` method ``cls`` has (its own and inherited ones), once."""
    for name in dir(cls):
        member = inspect.getattr_static(cls, name, None)
        if name.startswith("test") and inspect.isfunction(member):
            setattr(cls, name, _purged(member))


def purge_accelerate_environment(func_or_cls: T) -> T:
    """Decorator: undo every ``ACCELERATE_*`` variable a function (or each ``test*`` method) sets.

    Some calls (building a plugin from a config, for instance) export ``ACCELERATE_*`` variables;
    decorating a test or helper with this keeps them from leaking into whatever runs next. On a
    class (``unittest.TestCase`` or a plain pytest class) it wraps the ``test*`` methods, inherited
    ones included, and those of every subclass defined later.
    """
    if inspect.isclass(func_or_cls):
        cls = cast(type, func_or_cls)
        _purge_test_methods(cls)
        previous = cls.__dict__.get("__init_subclass__")

        def __init_subclass__(subclass: type, **kwargs: Any) -> None:
            if previous is not None:
                previous.__get__(None, subclass)(**kwargs)
            else:
                super(cls, subclass).__init_subclass__(**kwargs)  # type: ignore[arg-type]
            _purge_test_methods(subclass)

        cls.__init_subclass__ = classmethod(__init_subclass__)  # type: ignore[assignment]
        return func_or_cls
    if callable(func_or_cls):
        return _purged(func_or_cls)  # type: ignore[return-value]
    raise TypeError(f"purge_accelerate_environment decorates a function or a class, not {func_or_cls!r}.")


_FORBIDDEN_IN_ENV_FILES = (";", "\n", "\r", "\0", "<", ">", " ")


def convert_dict_to_env_variables(current_env: Mapping[str, Any]) -> list[str]:
    """``KEY=value`` lines for an environment file, one per entry that can safely be written.

    An entry with an empty key or value, ``=`` in its key, or a character that would end the line
    or be read by a shell (``;``, ``<``, ``>``, space, newline, carriage return, NUL) is skipped
    with a warning naming it, as Accelerate does.
    """
    lines = []
    for key, value in current_env.items():
        text = str(value)
        bad = [char for char in _FORBIDDEN_IN_ENV_FILES if char in key or char in text]
        if not key or not text or "=" in key or bad:
            problem = (
                "an empty key or value"
                if not key or not text
                else "'=' in the key"
                if "=" in key
                else f"the forbidden character(s) {bad}"
            )
            warnings.warn(
                f"WARNING: Skipping {key!r}={text!r} as it contains forbidden characters or missing values "
                f"({problem}).",
                UserWarning,
                stacklevel=2,
            )
            continue
        lines.append(f"{key}={text}\n")
    return lines


def override_numa_affinity(local_process_index: int, verbose: bool | None = None) -> None:
    """Pin this process to the CPUs of the NUMA node that holds its local accelerator.

    On a host without accelerators, or one whose sysfs does not report the node,
    this does nothing and says why in a debug log.
    """
    if verbose is None:
        verbose = parse_flag_from_env("ACCELERATE_DEBUG_MODE")
    cpus = cpus_of_accelerator(local_process_index)
    if cpus is None:
        logger.debug(
            "No NUMA information for local process %d; CPU affinity left as is.", local_process_index
        )
        return
    os.sched_setaffinity(0, cpus)
    if verbose:
        logger.info("Process %d pinned to CPUs %s.", local_process_index, sorted(cpus))


_numa_done: set[int] = set()


def set_numa_affinity(local_process_index: int, verbose: bool | None = None) -> None:
    """Like :func:`override_numa_affinity`, but only the first time for each local process index."""
    if local_process_index in _numa_done:
        return
    override_numa_affinity(local_process_index, verbose=verbose)
    _numa_done.add(local_process_index)


@dataclasses.dataclass
class CPUInformation:
    """Where this process sits in a CPU job: its rank and world size, globally and on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


def get_cpu_distributed_information() -> CPUInformation:
    """This process's :class:`CPUInformation`, read from the variables torchrun or an MPI launcher set."""
    from hasten.utils.process_env import LaunchEnvironment

    launch = LaunchEnvironment.from_environ()
    return CPUInformation(launch.rank, launch.world_size, launch.local_rank, launch.local_world_size)


def get_current_device_type() -> tuple[str, str]:
    """The accelerator type and the matching multi-process ``DistributedType`` value, without
    initialising any device (safe before forking).

    Returns ``("cpu", "MULTI_CPU")`` on a host without accelerators; Accelerate answers
    ``("cuda", "MULTI_GPU")`` there.
    """
    from hasten.utils.device import accelerator_type
    from hasten.utils.imports import (
        is_hpu_available,
        is_mlu_available,
        is_musa_available,
        is_neuron_available,
        is_sdaa_available,
    )

    for present, device in (
        (is_mlu_available, "mlu"),
        (is_sdaa_available, "sdaa"),
        (is_musa_available, "musa"),
        (is_hpu_available, "hpu"),
        (is_neuron_available, "neuron"),
    ):
        if present():
            return device, f"MULTI_{device.upper()}"
    device = accelerator_type()
    kinds = {"cuda": "MULTI_GPU", "xpu": "MULTI_XPU", "npu": "MULTI_NPU", "mps": "NO", "cpu": "MULTI_CPU"}
    return device, kinds[device]


def _nvidia_smi(*query: str) -> list[str]:
    """One line per GPU of ``nvidia-smi --query-gpu=...`` (which, unlike torch, does not initialise CUDA).

    Raises:
        FileNotFoundError: ``nvidia-smi`` is not on ``PATH`` (no NVIDIA driver here).
    """
    executable = shutil.which("nvidia-smi")
    if executable is None:
        raise FileNotFoundError(
            "nvidia-smi was not found on PATH: this machine has no NVIDIA driver, so there is no GPU to "
            "query."
        )
    output = subprocess.run(
        [executable, f"--query-gpu={','.join(query)}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [line.strip() for line in output.strip().splitlines() if line.strip()]


def get_gpu_info() -> tuple[list[str], int]:
    """The names and the number of the NVIDIA GPUs, asked of ``nvidia-smi``."""
    names = [line.split(",")[-1].strip() for line in _nvidia_smi("count", "name")]
    return names, len(names)


def get_driver_version() -> str:
    """The NVIDIA driver version (of the first GPU), asked of ``nvidia-smi``."""
    return _nvidia_smi("driver_version")[0]


def check_cuda_p2p_ib_support() -> bool:
    """Whether peer-to-peer and InfiniBand transfers can be used between the GPUs.

    Several consumer RTX 40 cards need driver 550.40.07 or newer for it. Without ``nvidia-smi`` there
    is no such card, and the answer is ``True``.
    """
    from packaging.version import Version

    try:
        names, count = get_gpu_info()
        if count > 1 and any("RTX 40" in name for name in names):
            return Version(get_driver_version()) >= Version("550.40.07")
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return True


@functools.cache
def check_cuda_fp8_capability() -> bool:
    """Whether the first NVIDIA GPU can compute in FP8 (compute capability 8.9 or newer)."""
    try:
        capability = tuple(int(part) for part in _nvidia_smi("compute_capability")[0].split("."))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        import torch

        if not torch.cuda.is_available():
            return False
        capability = tuple(torch.cuda.get_device_capability())
    return capability >= (8, 9)


def check_os_kernel() -> None:
    """Warn when this Linux kernel is older than 5.5.0, where distributed jobs can hang."""
    info = platform.uname()
    if info.system != "Linux":
        return
    found = re.search(r"\d+\.\d+\.\d+", info.release)
    if found is None:
        return
    from packaging.version import Version

    if Version(found.group()) < Version("5.5.0"):
        logger.warning(
            "Detected kernel version %s, which is below the recommended minimum of 5.5.0; this can cause "
            "the process to hang. It is recommended to upgrade the kernel to the minimum version or higher.",
            found.group(),
        )
