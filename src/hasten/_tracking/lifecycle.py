"""What the ``Accelerator`` does with its trackers: build and start them, log, look one up, finish.

Kept here so the ``Accelerator`` methods (``init_trackers``, ``log``, ``get_tracker``,
``end_training``) stay one-liners and the tracker rules live in one place.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hasten._tracking.base import GeneralTracker
from hasten._tracking.registry import TrackerSpec, tracker_class_of
from hasten.utils.errors import ConfigurationError


def _check_names(per_tracker: Mapping[str, Any], names: Iterable[str], what: str) -> None:
    """Every key of ``per_tracker`` (``init_kwargs`` / ``log_kwargs``) names a tracker in use."""
    names = list(names)
    unknown = sorted(set(per_tracker) - set(names))
    if unknown:
        raise ConfigurationError(
            f"{what} has entries for {unknown}, which name no tracker in use ({names}); its keys are "
            "tracker names, such as {'tensorboard': {...}}."
        )
    for name, kwargs in per_tracker.items():
        if not isinstance(kwargs, Mapping):
            raise TypeError(
                f"{what}[{name!r}] must be a dict of keyword arguments, got {type(kwargs).__name__}."
            )


def start_trackers(
    log_with: Sequence[TrackerSpec],
    project_name: str,
    logging_dir: str | os.PathLike[str] | None,
    config: Mapping[str, Any] | None = None,
    init_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[GeneralTracker]:
    """Build the trackers ``log_with`` (from :func:`filter_trackers`) names, start them, store ``config``.

    A name or class is built as ``cls(project_name, **init_kwargs[name])``, with ``logging_dir`` as
    second argument when the class requires a logging directory; a built tracker is used as it is.

    Raises:
        ConfigurationError: ``init_kwargs`` has a key that names no tracker of ``log_with``, or names
            one that was passed already built (give its arguments to its constructor instead).
    """
    init_kwargs = dict(init_kwargs or {})
    _check_names(init_kwargs, (tracker_class_of(spec).name for spec in log_with), "init_kwargs")
    trackers: list[GeneralTracker] = []
    for spec in log_with:
        if isinstance(spec, GeneralTracker):
            if spec.name in init_kwargs:
                raise ConfigurationError(
                    f"init_kwargs[{spec.name!r}] is given, but that tracker was passed to log_with already "
                    "built; pass those arguments to its constructor."
                )
            trackers.append(spec)
            continue
        tracker_class: Any = tracker_class_of(spec)
        kwargs = init_kwargs.get(tracker_class.name, {})
        if tracker_class.requires_logging_directory:
            trackers.append(tracker_class(project_name, logging_dir, **kwargs))
        else:
            trackers.append(tracker_class(project_name, **kwargs))
    for tracker in trackers:
        tracker.start()
    if config is not None:
        for tracker in trackers:
            tracker.store_init_configuration(dict(config))
    return trackers


def log_to_trackers(
    trackers: Sequence[GeneralTracker],
    values: Mapping[str, Any],
    step: int | None = None,
    log_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Log ``values`` to every tracker; ``log_kwargs[name]`` goes to the tracker called ``name``.

    Raises:
        ConfigurationError: ``log_kwargs`` has a key that names no tracker.
    """
    if not log_kwargs:
        for tracker in trackers:
            tracker.log(values, step=step)  # type: ignore[arg-type]
        return
    _check_names(log_kwargs, (tracker.name for tracker in trackers), "log_kwargs")
    for tracker in trackers:
        tracker.log(values, step=step, **log_kwargs.get(tracker.name, {}))  # type: ignore[arg-type]


def find_tracker(trackers: Sequence[GeneralTracker], name: str, unwrap: bool = False) -> Any:
    """The tracker called ``name`` (its backend object with ``unwrap``).

    With no trackers at all (processes other than the main one, where ``init_trackers`` builds
    nothing), an empty ``GeneralTracker`` whose methods do nothing, so the same code runs everywhere.

    Raises:
        ConfigurationError: there are trackers, and none is called ``name``.
    """
    if not trackers:
        return GeneralTracker(_blank=True)
    for tracker in trackers:
        if tracker.name == name:
            return tracker.tracker if unwrap else tracker  # type: ignore[attr-defined]
    raise ConfigurationError(
        f"get_tracker({name!r}): no tracker of that name was started; the trackers are "
        f"{[tracker.name for tracker in trackers]}."
    )


def finish_trackers(trackers: Sequence[GeneralTracker]) -> None:
    """Finish every tracker, in the order they were started."""
    for tracker in trackers:
        tracker.finish()
