"""Comet: an experiment started with ``comet_ml.start`` (``comet_ml.Experiment`` before comet_ml 3.41)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hasten._tracking.base import (
    NUMBERS,
    GeneralTracker,
    as_number,
    check_values,
    logger,
    on_main_process,
    unsupported_value,
)
from hasten.utils.imports import package_version, require
from hasten.utils.versions import compare_versions


class CometMLTracker(GeneralTracker):
    """Logs to a Comet experiment in the project ``run_name``.

    The API key comes from Comet's own configuration; ``COMET_MODE=offline`` or
    ``online=False`` in ``kwargs`` keeps the experiment in a local archive.

    Args:
        run_name: the Comet project name.
        **kwargs: passed to ``comet_ml.start`` (``comet_ml.Experiment`` before 3.41).
    """

    name = "comet_ml"
    requires_logging_directory = False

    def __init__(self, run_name: str, **kwargs: Any) -> None:
        super().__init__()
        self.run_name = run_name
        self.init_kwargs = kwargs
        self.writer: Any = None

    @on_main_process
    def start(self) -> None:
        """Start the experiment."""
        require("comet_ml", purpose="CometMLTracker")
        import comet_ml

        version = package_version("comet_ml")
        if version in (None, "unknown") or compare_versions(version, ">=", "3.41.0"):
            self.writer = comet_ml.start(project_name=self.run_name, **self.init_kwargs)
        else:
            self.writer = comet_ml.Experiment(project_name=self.run_name, **self.init_kwargs)
        logger.debug(f"Comet experiment started in project {self.run_name!r}")

    @property
    def tracker(self) -> Any:
        """The Comet ``Experiment``."""
        return self.writer

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """Log ``values`` as the experiment's parameters."""
        self.writer.log_parameters(dict(check_values(values, "CometMLTracker", "config")))

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Log numbers as metrics, strings as "others" and dicts of numbers as metrics prefixed by their key.

        ``{"eval": {"loss": 0.1}}`` logs ``eval_loss`` (Comet's ``prefix``), so groups with the same inner
        names stay apart; Accelerate drops the key.

        Args:
            values: name -> value.
            step: the step of these values (also set as the experiment's current step).
            **kwargs: passed to ``log_metric`` / ``log_other`` / ``log_metrics``.

        Raises:
            TypeError: a value is none of these; nothing of this call is logged.
        """
        metrics: dict[str, int | float] = {}
        others: dict[str, str] = {}
        groups: dict[str, dict[Any, Any]] = {}
        for key, value in check_values(values, "CometMLTracker").items():
            number = as_number(value)
            if number is not None:
                metrics[key] = number
            elif isinstance(value, str):
                others[key] = value
            elif isinstance(value, Mapping):
                groups[key] = dict(value)
            else:
                raise unsupported_value(
                    "CometMLTracker", f"values[{key!r}]", value, f"{NUMBERS}, str and dicts of numbers"
                )
        if step is not None:
            self.writer.set_step(step)
        for key, number in metrics.items():
            self.writer.log_metric(key, number, step=step, **kwargs)
        for key, text in others.items():
            self.writer.log_other(key, text, **kwargs)
        for key, group in groups.items():
            self.writer.log_metrics(group, **{"prefix": key, "step": step, **kwargs})

    @on_main_process
    def finish(self) -> None:
        """End the experiment (uploads, or writes the offline archive)."""
        self.writer.end()
