"""MLflow: an experiment and a run in the tracking store that ``MLFLOW_TRACKING_URI`` names."""

from __future__ import annotations

import json
import os
from typing import Any

from hasten._tracking.base import GeneralTracker, check_values, logger, numbers_only, on_main_process
from hasten.utils.dataclasses._env import read_env, to_bool
from hasten.utils.errors import ConfigurationError
from hasten.utils.imports import require


def _tags_from(value: dict[str, Any] | str | None, name: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        tags = json.loads(value)
    except json.JSONDecodeError as error:
        raise ConfigurationError(
            f"{name}={value!r} is not JSON ({error.msg}); give the tags as a JSON object such as "
            '\'{"team": "nlp"}\'.'
        ) from None
    if not isinstance(tags, dict):
        raise ConfigurationError(
            f'{name}={value!r} is not a JSON object; give the tags as \'{{"key": "value"}}\'.'
        )
    return tags


class MLflowTracker(GeneralTracker):
    """Logs to an MLflow run; where it is stored is MLflow's choice (``MLFLOW_TRACKING_URI``).

    Each argument may be overridden by its MLflow environment variable, which wins, as in Accelerate.

    Args:
        experiment_name: the experiment (``MLFLOW_EXPERIMENT_NAME``); created when missing. The project
            name under ``init_trackers``.
        logging_dir: artifact location of a newly created experiment.
        run_id: resume this run instead of starting one (``MLFLOW_RUN_ID``).
        tags: tags of the run (and of a new experiment), a dict or its JSON (``MLFLOW_TAGS``).
        nested_run: start the run nested in the active one (``MLFLOW_NESTED_RUN``).
        run_name: name of a new run.
        description: description of the run.

    Raises:
        ConfigurationError: ``MLFLOW_TAGS`` (or ``tags``) is not a JSON object, or ``MLFLOW_NESTED_RUN``
            is not a boolean.
    """

    name = "mlflow"
    requires_logging_directory = False

    def __init__(
        self,
        experiment_name: str | None = None,
        logging_dir: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        tags: dict[str, Any] | str | None = None,
        nested_run: bool | None = False,
        run_name: str | None = None,
        description: str | None = None,
    ) -> None:
        super().__init__()
        self.experiment_name = read_env("MLFLOW_EXPERIMENT_NAME") or experiment_name
        self.logging_dir = logging_dir
        self.run_id = read_env("MLFLOW_RUN_ID") or run_id
        env_tags = read_env("MLFLOW_TAGS")
        self.tags = _tags_from(env_tags, "MLFLOW_TAGS") if env_tags else _tags_from(tags, "tags")
        env_nested = read_env("MLFLOW_NESTED_RUN")
        self.nested_run = to_bool(env_nested, "MLFLOW_NESTED_RUN") if env_nested else bool(nested_run)
        self.run_name = run_name
        self.description = description
        self.active_run: Any = None

    @on_main_process
    def start(self) -> None:
        """Find or create the experiment, then start (or resume) the run in it."""
        require("mlflow", purpose="MLflowTracker")
        import mlflow

        experiment_id = None
        if self.experiment_name is not None:
            experiment = mlflow.get_experiment_by_name(self.experiment_name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                location = None if self.logging_dir is None else os.fspath(self.logging_dir)
                experiment_id = mlflow.create_experiment(
                    name=self.experiment_name, artifact_location=location, tags=self.tags
                )
        self.active_run = mlflow.start_run(
            run_id=self.run_id,
            experiment_id=experiment_id,
            run_name=self.run_name,
            nested=self.nested_run,
            tags=self.tags,
            description=self.description,
        )
        logger.debug(f"MLflow run {self.active_run.info.run_id} started in {self.experiment_name!r}")

    @property
    def tracker(self) -> Any:
        """The active ``mlflow.ActiveRun``."""
        return self.active_run

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """Log ``values`` as the run's parameters, in batches of the size MLflow allows.

        A value whose text is longer than MLflow's parameter limit is left out with a warning naming it
        (MLflow would reject the whole batch).
        """
        import mlflow
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = {}
        for key, value in check_values(values, "MLflowTracker", "config").items():
            if len(str(value)) > MAX_PARAM_VAL_LENGTH:
                logger.warning(
                    f"MLflowTracker: config[{key!r}] is {len(str(value))} characters as text, over MLflow's "
                    f"limit of {MAX_PARAM_VAL_LENGTH} for a parameter; it is not logged. Log it as an "
                    "artifact (log_artifact) instead."
                )
                continue
            params[key] = value
        items = list(params.items())
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            mlflow.log_params(dict(items[start : start + MAX_PARAMS_TAGS_PER_BATCH]))

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Log the numbers of ``values`` as metrics at ``step``; ``kwargs`` go to ``mlflow.log_metrics``.

        Raises:
            TypeError: a value is neither a number nor a string (strings are skipped with a warning).
        """
        import mlflow

        mlflow.log_metrics(numbers_only(values, "MLflowTracker"), step=step, **kwargs)

    @on_main_process
    def log_figure(self, figure: Any, artifact_file: str, **save_kwargs: Any) -> None:
        """Log a matplotlib or plotly ``figure`` as the artifact ``artifact_file``."""
        import mlflow

        mlflow.log_figure(figure=figure, artifact_file=artifact_file, **save_kwargs)

    @on_main_process
    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        """Log every file under ``local_dir`` as artifacts (under ``artifact_path``)."""
        import mlflow

        mlflow.log_artifacts(local_dir=local_dir, artifact_path=artifact_path)

    @on_main_process
    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Log the file ``local_path`` as an artifact (under ``artifact_path``)."""
        import mlflow

        mlflow.log_artifact(local_path=local_path, artifact_path=artifact_path)

    @on_main_process
    def finish(self) -> None:
        """End the run."""
        import mlflow

        mlflow.end_run()
