"""Backends built around one run object: ``package.init(project=...)``, ``run.log``, ``run.finish``.

Weights & Biases, Trackio and SwanLab share that shape. They accept many value
types of their own (images, histograms, tables), so ``log`` hands values to the
run as they are. Like Accelerate's, these trackers run on every process
(``main_process_only = False``); under ``init_trackers`` only the main process
builds them.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

from hasten._tracking.base import GeneralTracker, check_values, logger, on_main_process, plain_values
from hasten.utils.imports import require


class _RunTracker(GeneralTracker):
    """A backend whose ``init(project=...)`` returns a run with ``config``, ``log`` and ``finish``."""

    requires_logging_directory = False
    main_process_only = False
    _package: ClassVar[str]
    _title: ClassVar[str]

    def __init__(self, run_name: str, **kwargs: Any) -> None:
        super().__init__()
        self.run_name = run_name
        self.init_kwargs = kwargs
        self.run: Any = None

    def _module(self) -> Any:
        require(self._package, purpose=type(self).__name__)
        return importlib.import_module(self._package)

    @on_main_process
    def start(self) -> None:
        """Start the run, in the project named ``run_name``; ``init_kwargs`` go to ``init``."""
        self.run = self._module().init(project=self.run_name, **self.init_kwargs)
        logger.debug(f"{self._title} run started in project {self.run_name!r}")

    @property
    def tracker(self) -> Any:
        """The backend's run object."""
        return self.run

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """Add ``values`` to the run's config."""
        self.run.config.update(dict(check_values(values, type(self).__name__, "config")))

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Log ``values`` to the run at ``step``; ``kwargs`` go to ``run.log``.

        One-element tensors and arrays are logged as numbers; other values go to the backend as they are.
        """
        self.run.log(plain_values(values, type(self).__name__), step=step, **kwargs)

    @on_main_process
    def finish(self) -> None:
        """Finish the run."""
        self.run.finish()

    def _log_image_lists(self, image: Any, values: dict[str, Any], step: int | None, **kwargs: Any) -> None:
        """Log each list of images as a list of the backend's ``image`` objects."""
        lists = check_values(values, type(self).__name__)
        self.run.log(
            {key: [image(item) for item in items] for key, items in lists.items()}, step=step, **kwargs
        )


class WandBTracker(_RunTracker):
    """Logs to a Weights & Biases run (``wandb.init(project=run_name, **kwargs)``).

    Set ``WANDB_MODE=offline`` (or pass ``mode="offline"``) to keep the run in local files.
    """

    name = "wandb"
    _package = "wandb"
    _title = "W&B"

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """Add ``values`` to the run's config (values already there may change)."""
        self.run.config.update(dict(check_values(values, "WandBTracker", "config")), allow_val_change=True)

    @on_main_process
    def log_images(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Log lists of images (arrays, tensors or PIL images) as ``wandb.Image`` lists."""
        import wandb

        self._log_image_lists(wandb.Image, values, step, **kwargs)

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
        """Log a ``wandb.Table`` made of ``columns`` and ``data`` rows, or of a ``dataframe``."""
        import wandb

        table_class: Any = wandb.Table
        table = table_class(columns=columns, data=data, dataframe=dataframe)
        self.run.log({table_name: table}, step=step, **kwargs)


class TrackioTracker(_RunTracker):
    """Logs to a Trackio run (``trackio.init(project=run_name, **kwargs)``), stored locally unless a Space is
    given."""

    name = "trackio"
    _package = "trackio"
    _title = "Trackio"


class SwanLabTracker(_RunTracker):
    """Logs to a SwanLab run (``swanlab.init(project=run_name, **kwargs)``); ``mode="offline"`` keeps it
    local."""

    name = "swanlab"
    _package = "swanlab"
    _title = "SwanLab"

    @on_main_process
    def log_images(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Log lists of images (arrays or PIL images) as ``swanlab.Image`` lists."""
        import swanlab

        self._log_image_lists(swanlab.Image, values, step, **kwargs)
