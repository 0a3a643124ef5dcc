"""Aim: a run in the Aim repository at ``logging_dir``."""

from __future__ import annotations

import os
from typing import Any

from hasten._tracking.base import GeneralTracker, check_values, logger, on_main_process, plain_values
from hasten.utils.imports import require


class AimTracker(GeneralTracker):
    """Logs to an Aim ``Run`` stored in the repository at ``logging_dir``.

    Args:
        run_name: the run's name.
        logging_dir: the Aim repository (created when missing).
        **kwargs: passed to ``aim.Run``.
    """

    name = "aim"
    requires_logging_directory = True

    def __init__(
        self, run_name: str, logging_dir: str | os.PathLike[str] | None = ".", **kwargs: Any
    ) -> None:
        super().__init__()
        self.run_name = run_name
        self.aim_repo_path = logging_dir
        self.init_kwargs = kwargs
        self.writer: Any = None

    @on_main_process
    def start(self) -> None:
        """Open the repository and start the run."""
        require("aim", purpose="AimTracker")
        from aim import Run

        repo = None if self.aim_repo_path is None else os.fspath(self.aim_repo_path)
        self.writer = Run(repo=repo, **self.init_kwargs)
        self.writer.name = self.run_name
        logger.debug(f"Aim run {self.run_name!r} started in {repo}")

    @property
    def tracker(self) -> Any:
        """The ``aim.Run``."""
        return self.writer

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """Store ``values`` under the run's ``hparams``."""
        self.writer["hparams"] = dict(check_values(values, "AimTracker", "config"))

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Track each value under its name at ``step``; ``kwargs`` go to ``Run.track``."""
        for key, value in plain_values(values, "AimTracker").items():
            self.writer.track(value, name=key, step=step, **kwargs)

    @on_main_process
    def log_images(
        self, values: dict[str, Any], step: int | None = None, kwargs: dict[str, dict[str, Any]] | None = None
    ) -> None:
        """Track images (arrays or PIL images, or ``(image, caption)`` pairs) as ``aim.Image``.

        Args:
            values: name -> image or ``(image, caption)``.
            step: the step of these images.
            kwargs: ``{"aim_image": {...}, "track": {...}}``: arguments for ``aim.Image`` and
                ``Run.track``.
        """
        import aim

        image_kwargs = (kwargs or {}).get("aim_image", {})
        track_kwargs = (kwargs or {}).get("track", {})
        for key, value in check_values(values, "AimTracker").items():
            image, caption = value if isinstance(value, tuple) else (value, "")
            self.writer.track(
                aim.Image(image, caption=caption, **image_kwargs), name=key, step=step, **track_kwargs
            )

    @on_main_process
    def finish(self) -> None:
        """Close the run."""
        self.writer.close()
