"""Which trackers exist, which are installed, and turning ``log_with`` into the trackers to build.

Whether a backend is installed is asked of the import system (cached probes),
never by importing it, so ``filter_trackers`` and ``get_available_trackers`` stay
cheap and ``import hasten`` loads no tracker package.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Union

from hasten._tracking.aim import AimTracker
from hasten._tracking.base import GeneralTracker
from hasten._tracking.clearml import ClearMLTracker
from hasten._tracking.comet import CometMLTracker
from hasten._tracking.dvclive import DVCLiveTracker
from hasten._tracking.mlflow import MLflowTracker
from hasten._tracking.runs import SwanLabTracker, TrackioTracker, WandBTracker
from hasten._tracking.tensorboard import TensorBoardTracker
from hasten.utils.dataclasses.enums import LoggerType
from hasten.utils.errors import ConfigurationError
from hasten.utils.imports import (
    is_aim_available,
    is_clearml_available,
    is_comet_ml_available,
    is_dvclive_available,
    is_mlflow_available,
    is_swanlab_available,
    is_tensorboard_available,
    is_trackio_available,
    is_wandb_available,
    require,
)

TrackerSpec = Union[str, LoggerType, GeneralTracker, type[GeneralTracker]]  # noqa: UP007  (a runtime alias)
"""One entry of ``log_with``: a tracker's name, a ``LoggerType``, a built tracker or a tracker class."""

LOGGER_TYPE_TO_CLASS: dict[str, type[GeneralTracker]] = {
    "aim": AimTracker,
    "comet_ml": CometMLTracker,
    "mlflow": MLflowTracker,
    "tensorboard": TensorBoardTracker,
    "wandb": WandBTracker,
    "clearml": ClearMLTracker,
    "dvclive": DVCLiveTracker,
    "swanlab": SwanLabTracker,
    "trackio": TrackioTracker,
}
"""Tracker name -> class: the built-in backends and every class given to :func:`register_tracker_class`."""

_BUILT_IN = dict(LOGGER_TYPE_TO_CLASS)

# In the order "all" lists them (Accelerate's), each with the probe that says it is installed.
_PROBES: dict[LoggerType, Callable[[], bool]] = {
    LoggerType.TENSORBOARD: is_tensorboard_available,
    LoggerType.WANDB: is_wandb_available,
    LoggerType.COMETML: is_comet_ml_available,
    LoggerType.AIM: is_aim_available,
    LoggerType.MLFLOW: is_mlflow_available,
    LoggerType.CLEARML: is_clearml_available,
    LoggerType.DVCLIVE: is_dvclive_available,
    LoggerType.SWANLAB: is_swanlab_available,
    LoggerType.TRACKIO: is_trackio_available,
}


def get_available_trackers() -> list[LoggerType]:
    """The built-in trackers whose package is installed, in the order ``log_with="all"`` uses."""
    return [logger_type for logger_type, probe in _PROBES.items() if probe()]


def register_tracker_class(tracker_class: type[GeneralTracker]) -> None:
    """Make a ``GeneralTracker`` subclass available to ``log_with`` under its ``name``.

    ``init_trackers`` builds it as the built-in trackers are: ``tracker_class(project_name)``, or
    ``tracker_class(project_name, logging_dir)`` when it requires a logging directory, plus the
    keyword arguments ``init_kwargs[name]``. Registering a name again replaces the class, with a
    warning.

    Raises:
        TypeError: ``tracker_class`` is not a ``GeneralTracker`` subclass, or lacks a non-empty ``name``
            or a boolean ``requires_logging_directory``.
    """
    if not (isinstance(tracker_class, type) and issubclass(tracker_class, GeneralTracker)):
        raise TypeError(
            f"register_tracker_class takes a subclass of GeneralTracker, got {tracker_class!r}; subclass "
            "hasten.tracking.GeneralTracker."
        )
    _check_class_attributes(tracker_class)
    if tracker_class.name in LOGGER_TYPE_TO_CLASS:
        warnings.warn(
            f"register_tracker_class: {tracker_class.name!r} was "
            f"{LOGGER_TYPE_TO_CLASS[tracker_class.name]!r}; it is now {tracker_class!r}.",
            UserWarning,
            stacklevel=2,
        )
    LOGGER_TYPE_TO_CLASS[tracker_class.name] = tracker_class


def _check_class_attributes(tracker_class: type[GeneralTracker]) -> None:
    name = getattr(tracker_class, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"{tracker_class.__name__} needs a class attribute `name`, a non-empty str; found {name!r}."
        )
    requires = getattr(tracker_class, "requires_logging_directory", None)
    if not isinstance(requires, bool):
        raise TypeError(
            f"{tracker_class.__name__} needs a class attribute `requires_logging_directory`, True or False; "
            f"found {requires!r}."
        )


def _is_all(entry: Any) -> bool:
    return isinstance(entry, str) and entry.strip().lower() == LoggerType.ALL.value


def _named(entry: str) -> LoggerType | str:
    """A ``log_with`` string as the ``LoggerType`` or registered name it means."""
    if entry in LOGGER_TYPE_TO_CLASS and entry not in _BUILT_IN:
        return entry  # a registered custom tracker
    try:
        return LoggerType.parse(entry, "log_with")
    except ConfigurationError:
        custom = sorted(set(LOGGER_TYPE_TO_CLASS) - set(_BUILT_IN))
        raise ConfigurationError(
            f"log_with={entry!r} names no tracker; expected one of {LoggerType.list()}"
            + (f" or a registered tracker {custom}" if custom else "")
            + ", a GeneralTracker instance or subclass, or a list of these. Register a custom tracker "
            "class with register_tracker_class to name it here."
        ) from None


def tracker_class_of(entry: TrackerSpec) -> type[GeneralTracker]:
    if isinstance(entry, GeneralTracker):
        return type(entry)
    if isinstance(entry, type):
        return entry
    return LOGGER_TYPE_TO_CLASS[str(entry)]


def filter_trackers(
    log_with: TrackerSpec | Sequence[TrackerSpec] | None,
    logging_dir: str | os.PathLike[str] | None = None,
) -> list[TrackerSpec]:
    """The trackers ``log_with`` asks for, checked, without repeats, in the order given.

    Args:
        log_with: a tracker name (``LoggerType`` value or registered name, any letter case for the
            built-ins), ``"all"`` (every installed built-in tracker), a built ``GeneralTracker``, a
            ``GeneralTracker`` subclass, or a list of these.
        logging_dir: the folder for trackers that require one (TensorBoard, Aim).

    Returns:
        ``LoggerType`` members for built-in trackers, the name for registered ones, and the given
        instances and classes as they are.

    Raises:
        ConfigurationError: a name is unknown, or a tracker requires ``logging_dir`` and it is ``None``.
        ImportError: a tracker asked for by name is not installed (the message gives the pip command).
        TypeError: an entry is none of the above.
    """
    if log_with is None:
        return []
    entries = list(log_with) if isinstance(log_with, (list, tuple)) else [log_with]
    chosen: list[TrackerSpec] = []
    for entry in entries:
        if isinstance(entry, GeneralTracker):
            found: list[TrackerSpec] = [entry]
        elif isinstance(entry, type) and issubclass(entry, GeneralTracker):
            _check_class_attributes(entry)
            found = [entry]
        elif _is_all(entry):
            found = list(get_available_trackers())
        elif isinstance(entry, str):
            found = [_named(entry)]
        else:
            raise TypeError(
                f"log_with got {entry!r} ({type(entry).__name__}); expected a tracker name such as "
                "'tensorboard', 'all', a GeneralTracker instance or subclass, or a list of these."
            )
        chosen += [spec for spec in found if not any(spec is seen or spec == seen for seen in chosen)]
    for spec in chosen:
        _check_usable(spec, logging_dir)
    return chosen


def _check_usable(spec: TrackerSpec, logging_dir: str | os.PathLike[str] | None) -> None:
    if isinstance(spec, GeneralTracker):
        return  # built by the caller with whatever it needs
    tracker_class = tracker_class_of(spec)
    built_in = isinstance(spec, LoggerType) and _BUILT_IN.get(spec.value) is tracker_class
    if built_in and not _PROBES[spec]():  # type: ignore[index]
        require(str(spec), purpose=f"log_with={str(spec)!r}")
    if tracker_class.requires_logging_directory and logging_dir is None:
        raise ConfigurationError(
            f"The tracker {tracker_class.name!r} writes to a logging directory, and none was given. Pass "
            "`project_dir=...` (or `project_config=ProjectConfiguration(logging_dir=...)`) to the "
            "Accelerator, or `logging_dir=` here."
        )
