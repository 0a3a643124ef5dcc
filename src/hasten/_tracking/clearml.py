"""ClearML: a ``Task`` (the one already running, or a new one), reported to through its logger."""

from __future__ import annotations

from typing import Any

from hasten._tracking.base import GeneralTracker, check_values, logger, numbers_only, on_main_process
from hasten.utils.dataclasses._env import read_env
from hasten.utils.errors import ConfigurationError
from hasten.utils.imports import require


class ClearMLTracker(GeneralTracker):
    """Logs to a ClearML task.

    When a task is already running (``Task.init`` called by the script), it is used and left open at
    the end; otherwise a task is created in the project ``CLEARML_PROJECT`` (else ``run_name``) named
    ``CLEARML_TASK`` (else ``run_name``).

    Args:
        run_name: the default project and task name.
        **kwargs: passed to ``Task.init``.
    """

    name = "clearml"
    requires_logging_directory = False

    def __init__(self, run_name: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.user_provided_run_name = run_name
        self._initialized_externally = False
        self.init_kwargs = kwargs
        self.task: Any = None

    @on_main_process
    def start(self) -> None:
        """Adopt the running task, or create one."""
        require("clearml", purpose="ClearMLTracker")
        from clearml import Task

        current: Any = Task.current_task()
        if current is not None:
            self._initialized_externally = True
            self.task = current
            return
        arguments = dict(self.init_kwargs)
        arguments.setdefault("project_name", read_env("CLEARML_PROJECT") or self.user_provided_run_name)
        arguments.setdefault("task_name", read_env("CLEARML_TASK") or self.user_provided_run_name)
        self.task = Task.init(**arguments)
        logger.debug(f"ClearML task {self.task.id} started")

    @property
    def tracker(self) -> Any:
        """The ClearML ``Task``."""
        return self.task

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> Any:
        """Connect ``values`` to the task as its configuration; returns ``connect_configuration``'s result."""
        return self.task.connect_configuration(dict(check_values(values, "ClearMLTracker", "config")))

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Report numbers: as scalars at ``step``, or as single values when ``step`` is ``None``.

        A name starting with ``train_``, ``eval_`` or ``test_`` is reported as that series with the
        prefix removed from the title; any other name is in the ``train`` series.

        Raises:
            TypeError: a value is neither a number nor a string (strings are skipped with a warning).
        """
        reporter = self.task.get_logger()
        for key, number in numbers_only(values, "ClearMLTracker").items():
            if step is None:
                reporter.report_single_value(name=key, value=number, **kwargs)
            else:
                title, series = self._get_title_series(key)
                reporter.report_scalar(title=title, series=series, value=number, iteration=step, **kwargs)

    @on_main_process
    def log_images(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Report images (arrays or PIL images) at ``step``, titled and in series as ``log`` names them."""
        reporter = self.task.get_logger()
        for key, image in check_values(values, "ClearMLTracker").items():
            title, series = self._get_title_series(key)
            reporter.report_image(title=title, series=series, iteration=step, image=image, **kwargs)

    @on_main_process
    def log_table(
        self,
        table_name: str,
        columns: list[str] | None = None,
        data: list[list[Any]] | None = None,
        dataframe: Any = None,
        step: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Report a table: a ``dataframe``, or ``data`` rows with ``columns`` as the header row.

        Raises:
            ConfigurationError: neither ``dataframe`` nor ``data`` was given.
        """
        table = dataframe
        if table is None:
            if data is None:
                raise ConfigurationError(
                    f"ClearMLTracker.log_table({table_name!r}) got neither `dataframe` nor `data`; pass a "
                    "dataframe, or `data` as a list of rows (with `columns` for the header)."
                )
            table = [columns, *data] if columns else data
        title, series = self._get_title_series(table_name)
        self.task.get_logger().report_table(
            title=title, series=series, table_plot=table, iteration=step, **kwargs
        )

    @on_main_process
    def finish(self) -> None:
        """Close the task, unless the script created it (then closing is the script's call)."""
        if self.task is not None and not self._initialized_externally:
            self.task.close()

    @staticmethod
    def _get_title_series(name: str) -> tuple[str, str]:
        for prefix in ("eval", "test", "train"):
            if name.startswith(prefix + "_"):
                return name[len(prefix) + 1 :], prefix
        return name, "train"
