"""The tracker interface every backend implements, and the value checks the backends share.

A tracker is built on every process but, unless it says otherwise
(``main_process_only = False``), starts, logs and finishes on the main process
only: :func:`on_main_process` asks the process state at call time, so building a
tracker never creates the state (and never joins a process group).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

from hasten.state import PartialState
from hasten.utils.tree import is_torch_tensor

F = TypeVar("F", bound=Callable[..., Any])

# A plain logger: trackers that run on every process must log without the process state existing.
logger = logging.getLogger("hasten.tracking")
_warned: set[tuple[str, str]] = set()

NUMBERS = "numbers (int, float, bool, one-element tensors or arrays)"


def _runs_here(tracker: Any) -> bool:
    if not getattr(tracker, "main_process_only", False):
        return True
    return PartialState().is_main_process


def on_main_process(function: F) -> F:
    """Decorator for tracker methods: run on the main process only when ``self.main_process_only``.

    Elsewhere the call does nothing and returns ``None``. The check happens at each call, so a
    tracker may be built before the process state exists.
    """

    @functools.wraps(function)
    def run_on_main_process(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _runs_here(self):
            return function(self, *args, **kwargs)
        return None

    return run_on_main_process  # type: ignore[return-value]


class GeneralTracker:
    """Base class of every tracker: subclass it to log to a backend hasten does not know.

    A subclass sets the class attributes ``name`` (what ``log_with``, ``init_kwargs`` and
    ``get_tracker`` call it) and ``requires_logging_directory`` (whether it is built with the
    Accelerator's logging directory as its second argument), and a ``tracker`` property that returns
    the backend's own object (a writer, a run). It may set ``main_process_only = False`` to run on
    every process. The methods below do nothing here; a backend overrides those it supports.

    Args:
        _blank: build an empty tracker without the checks (what ``get_tracker`` returns on processes
            that have no trackers).

    Raises:
        TypeError: the subclass lacks ``name``, ``requires_logging_directory`` or ``tracker``.
    """

    name: ClassVar[str]
    requires_logging_directory: ClassVar[bool]
    main_process_only: bool = True

    def __init__(self, _blank: bool = False) -> None:
        if _blank:
            return
        problems = []
        name = getattr(self, "name", None)
        if not isinstance(name, str) or not name:
            problems.append(f"`name` (a non-empty str; found {name!r})")
        requires = getattr(self, "requires_logging_directory", None)
        if not isinstance(requires, bool):
            problems.append(f"`requires_logging_directory` (a bool; found {requires!r})")
        if "tracker" not in dir(self):
            problems.append("a `tracker` property returning the backend's run or writer")
        if problems:
            raise TypeError(
                f"{type(self).__name__} is not a complete GeneralTracker: define "
                + ", ".join(problems)
                + " in the class body."
            )

    def start(self) -> None:
        """Create the backend's run; called once by ``init_trackers`` after every tracker is built."""

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """Record ``values`` as the run's hyperparameters."""

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Log ``values`` (name -> value) at ``step``; ``kwargs`` go to the backend's logging call."""

    def finish(self) -> None:
        """Close the run and flush what the backend still holds."""


# --- values --------------------------------------------------------------------------------------


def as_number(value: Any) -> int | float | None:
    """``value`` as a Python ``int`` or ``float`` when it is a number, else ``None``.

    Numbers are ``int``, ``float`` and ``bool``, and tensors and numpy arrays or scalars holding
    exactly one number (so ``loss.detach()`` can be logged as it is).
    """
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        size = value.size
    elif is_torch_tensor(value):
        size = value.numel()
    else:
        return None
    item = value.item() if size == 1 else None
    return item if isinstance(item, (int, float)) else None


def check_values(values: Any, tracker: str, what: str = "values") -> Mapping[str, Any]:
    """``values`` when it is a mapping with ``str`` keys; a ``TypeError`` naming the tracker otherwise."""
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{tracker}: `{what}` must be a dict of name -> value, got {type(values).__name__} "
            f"{_short(values)}."
        )
    for key in values:
        if not isinstance(key, str):
            raise TypeError(
                f"{tracker}: the names in `{what}` must be str; got {key!r} ({type(key).__name__})."
            )
    return values


def plain_values(values: Any, tracker: str) -> dict[str, Any]:
    """``values`` with one-element tensors and arrays turned into Python numbers, the rest as it is.

    For backends that take many value types of their own (W&B media, Aim objects) but not every
    backend reads a tensor as a number (Trackio drops it).
    """
    plain = {}
    for key, value in check_values(values, tracker).items():
        if not isinstance(value, (int, float, str)):
            number = as_number(value)
            value = value if number is None else number
        plain[key] = value
    return plain


def unsupported_value(tracker: str, where: str, value: Any, accepted: str, hint: str = "") -> TypeError:
    """The error for a value a backend cannot log, naming where it is (``values['loss']``), its type and
    what is accepted."""
    return TypeError(
        f"{tracker} cannot log {where} = {_short(value)} of type {type(value).__name__}; it "
        f"accepts {accepted}.{' ' + hint if hint else ''} Nothing was logged by this call."
    )


def numbers_only(values: Any, tracker: str, hint: str = "") -> dict[str, int | float]:
    """The numbers of ``values`` for a backend that logs numbers only.

    Strings are left out with a warning (once per key), as Accelerate does, so one ``log`` call can
    feed several backends; any other type raises ``TypeError`` before anything is logged.
    """
    numbers: dict[str, int | float] = {}
    for key, value in check_values(values, tracker).items():
        number = as_number(value)
        if number is not None:
            numbers[key] = number
        elif isinstance(value, str):
            if (tracker, key) not in _warned:  # once per tracker and key, not at every step
                _warned.add((tracker, key))
                logger.warning(
                    f"{tracker} logs numbers only: the string values[{key!r}] is not logged there."
                )
        else:
            raise unsupported_value(tracker, f"values[{key!r}]", value, NUMBERS, hint)
    return numbers


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
