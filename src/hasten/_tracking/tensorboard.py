"""TensorBoard: event files written by ``torch.utils.tensorboard`` (or ``tensorboardX`` without tensorboard).

``log`` writes all the numbers of one call as a single event (one summary with
one value per name), where Accelerate writes one event per number: the files
read the same in TensorBoard, and a step of ten scalars costs one record.
"""

from __future__ import annotations

import os
import time
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
from hasten.utils.atomic import atomic_write
from hasten.utils.errors import ConfigurationError
from hasten.utils.imports import package_version, require

_ACCEPTED = f"{NUMBERS}, str (as text) and dicts of numbers (grouped scalars)"
_HPARAM_TYPES = "int, float, bool, str or None"


def _backend() -> tuple[Any, Any, bool]:
    """The ``SummaryWriter`` class, the ``Summary`` protobuf class, and whether they are tensorboardX's."""
    if package_version("tensorboard") is None and package_version("tensorboardX") is not None:
        from tensorboardX import SummaryWriter as WriterX
        from tensorboardX.proto.summary_pb2 import Summary as SummaryX

        return WriterX, SummaryX, True
    require("tensorboard", purpose="TensorBoardTracker")
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter, Summary, False


class TensorBoardTracker(GeneralTracker):
    """Logs to TensorBoard event files in ``logging_dir/run_name``.

    Args:
        run_name: the run's folder inside ``logging_dir`` (the project name under ``init_trackers``).
        logging_dir: where TensorBoard runs are kept.
        **kwargs: passed to ``SummaryWriter`` (``flush_secs``, ``max_queue``, ...).
    """

    name = "tensorboard"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__()
        if logging_dir is None:
            raise ConfigurationError(
                "TensorBoardTracker needs a `logging_dir` (got None): pass the folder for its event files, "
                "or give the Accelerator a `project_dir` / `logging_dir`."
            )
        self.run_name = run_name
        self.logging_dir_param = logging_dir
        self.logging_dir = os.path.join(logging_dir, run_name)
        self.init_kwargs = kwargs
        self.writer: Any = None
        self._summary: Any = None
        self._is_tensorboardx = False

    @on_main_process
    def start(self) -> None:
        """Open the ``SummaryWriter``."""
        writer_class, self._summary, self._is_tensorboardx = _backend()
        self.writer = writer_class(self.logging_dir, **self.init_kwargs)
        logger.debug(f"TensorBoard logs {self.run_name!r} to {self.logging_dir}")

    @property
    def tracker(self) -> Any:
        """The ``SummaryWriter``."""
        return self.writer

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """Record ``values`` in TensorBoard's hparams view and in ``hparams.yml`` beside it.

        Both go to a new folder named by the time, inside the run's folder.

        Raises:
            TypeError: a value is not an int, float, bool, str or None (nested dicts and lists
                included: flatten them first).
        """
        hparams = {}
        for key, value in check_values(values, "TensorBoardTracker", "config").items():
            number = as_number(value)
            if number is None and not isinstance(value, (str, type(None))):
                raise TypeError(
                    f"TensorBoardTracker cannot store config[{key!r}] of type {type(value).__name__}: "
                    f"hyperparameters are {_HPARAM_TYPES}. Flatten nested values (e.g. "
                    f"{{'{key}.name': ...}}) before passing the config."
                )
            hparams[key] = value if number is None else number
        stamp = str(time.time())
        if self._is_tensorboardx:
            self.writer.add_hparams(hparams, metric_dict={}, name=stamp)
        else:
            self.writer.add_hparams(hparams, metric_dict={}, run_name=stamp)
        self.writer.flush()
        import yaml  # here, not at module level: `import hasten` does not pay for it

        with atomic_write(os.path.join(self.logging_dir, stamp, "hparams.yml"), "w") as handle:
            yaml.safe_dump(hparams, handle)

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Log numbers as scalars, strings as text and dicts of numbers as grouped scalars, then flush.

        Args:
            values: name -> value.
            step: the global step of these values.
            **kwargs: passed to ``add_scalar`` / ``add_text`` / ``add_scalars`` (``walltime``, ...).

        Raises:
            TypeError: a value is none of these; nothing of this call is logged.
        """
        numbers: dict[str, int | float] = {}
        texts: dict[str, str] = {}
        groups: dict[str, dict[str, int | float]] = {}
        for key, value in check_values(values, "TensorBoardTracker").items():
            number = as_number(value)
            if number is not None:
                numbers[key] = number
            elif isinstance(value, str):
                texts[key] = value
            elif isinstance(value, Mapping):
                groups[key] = self._group(key, value)
            else:
                raise unsupported_value(
                    "TensorBoardTracker",
                    f"values[{key!r}]",
                    value,
                    _ACCEPTED,
                    "Log histograms or images through get_tracker('tensorboard', unwrap=True).",
                )
        writer = self.writer
        if numbers:
            if kwargs.keys() <= {"walltime"}:
                summary = self._summary
                values_pb = [summary.Value(tag=key, simple_value=number) for key, number in numbers.items()]
                writer._get_file_writer().add_summary(summary(value=values_pb), step, kwargs.get("walltime"))
            else:  # options such as new_style change how each scalar is encoded: leave it to add_scalar
                for key, number in numbers.items():
                    writer.add_scalar(key, number, global_step=step, **kwargs)
        for key, text in texts.items():
            writer.add_text(key, text, global_step=step, **kwargs)
        for key, group in groups.items():
            writer.add_scalars(key, group, global_step=step, **kwargs)
        writer.flush()

    @staticmethod
    def _group(key: str, value: Mapping[Any, Any]) -> dict[str, int | float]:
        group = {}
        for name, item in value.items():
            number = as_number(item)
            if number is None or not isinstance(name, str):
                raise unsupported_value(
                    "TensorBoardTracker", f"values[{key!r}][{name!r}]", item, "dicts of str -> number"
                )
            group[name] = number
        return group

    @on_main_process
    def log_images(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Log batches of images (``add_images``: arrays or tensors of shape NCHW by default), then flush."""
        for key, images in check_values(values, "TensorBoardTracker").items():
            self.writer.add_images(key, images, global_step=step, **kwargs)
        self.writer.flush()

    @on_main_process
    def finish(self) -> None:
        """Flush and close the writer."""
        self.writer.close()
