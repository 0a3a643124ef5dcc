"""DVCLive: metrics and parameters written by ``dvclive.Live`` into its folder (``dvclive/`` by default)."""

from __future__ import annotations

from typing import Any

from hasten._tracking.base import (
    NUMBERS,
    GeneralTracker,
    as_number,
    check_values,
    on_main_process,
    unsupported_value,
)
from hasten.utils.imports import require


class DVCLiveTracker(GeneralTracker):
    """Logs through a ``dvclive.Live``.

    Args:
        run_name: not used by DVCLive (its folder is ``dir`` in ``kwargs``); kept for ``init_trackers``.
        live: an existing ``Live`` to log through instead of creating one.
        **kwargs: passed to ``dvclive.Live`` (``dir``, ``save_dvc_exp``, ...).
    """

    name = "dvclive"
    requires_logging_directory = False

    def __init__(self, run_name: str | None = None, live: Any | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.live: Any = live
        self.init_kwargs = kwargs

    @on_main_process
    def start(self) -> None:
        """Create the ``Live`` (unless one was given)."""
        if self.live is None:
            require("dvclive", purpose="DVCLiveTracker")
            from dvclive import Live

            self.live = Live(**self.init_kwargs)

    @property
    def tracker(self) -> Any:
        """The ``dvclive.Live``."""
        return self.live

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """Write ``values`` to DVCLive's ``params.yaml``."""
        self.live.log_params(dict(check_values(values, "DVCLiveTracker", "config")))

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Log each value as a metric at ``step``, then advance DVCLive's step.

        ``kwargs`` go to ``Live.log_metric``.

        Raises:
            TypeError: a value is not a number or string DVCLive can log; nothing of this call is logged.
        """
        from dvclive.plots import Metric

        metrics = {}
        for key, value in check_values(values, "DVCLiveTracker").items():
            if Metric.could_log(value):
                metrics[key] = value
            elif (number := as_number(value)) is not None:
                metrics[key] = number
            else:
                raise unsupported_value("DVCLiveTracker", f"values[{key!r}]", value, f"{NUMBERS} and str")
        if step is not None:
            self.live.step = step
        for key, value in metrics.items():
            self.live.log_metric(key, value, **kwargs)
        self.live.next_step()

    @on_main_process
    def finish(self) -> None:
        """End the ``Live`` (writes its summary and, when it should, the DVC experiment)."""
        self.live.end()
