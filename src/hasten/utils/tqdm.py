"""A tqdm progress bar drawn by one process per machine (``accelerate.utils.tqdm``)."""

from __future__ import annotations

from typing import Any

from hasten.utils.imports import require
from hasten.utils.process_env import LaunchEnvironment


def tqdm(*args: Any, main_process_only: bool = True, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(*args, **kwargs)``, disabled on every process but local rank 0 unless
    ``main_process_only=False``.

    Raises:
        ImportError: tqdm is not installed (the message says how to install it).
        ValueError: the first argument is a bool (the old way of passing ``main_process_only``).
    """
    require("tqdm", purpose="hasten.utils.tqdm")
    if args and isinstance(args[0], bool):
        raise ValueError(
            f"tqdm({args[0]!r}, ...): passing `True` or `False` as the first argument is unsupported; it "
            "would be taken as the iterable. Pass main_process_only=... as a keyword instead."
        )
    from tqdm.auto import tqdm as _tqdm

    disable = kwargs.pop("disable", False)
    if main_process_only and not disable:
        disable = LaunchEnvironment.from_environ().local_rank != 0
    return _tqdm(*args, disable=disable, **kwargs)
