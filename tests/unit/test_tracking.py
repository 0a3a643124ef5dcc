"""Trackers in one process: the GeneralTracker contract, log_with handling, the Accelerator helpers, and
TensorBoard for real (event files read back with tensorboard's EventAccumulator).

The other backends run in fresh processes (tests/unit/test_tracking_backends.py): their packages patch
the interpreter they are imported into.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from hasten import tracking
from hasten._tracking.base import as_number, numbers_only
from hasten._tracking.lifecycle import find_tracker, finish_trackers, log_to_trackers, start_trackers
from hasten.state import PartialState
from hasten.tracking import (
    LOGGER_TYPE_TO_CLASS,
    AimTracker,
    ClearMLTracker,
    CometMLTracker,
    DVCLiveTracker,
    GeneralTracker,
    LoggerType,
    MLflowTracker,
    SwanLabTracker,
    TensorBoardTracker,
    TrackioTracker,
    WandBTracker,
    filter_trackers,
    get_available_trackers,
    register_tracker_class,
)
from hasten.utils.errors import ConfigurationError
from hasten.utils.imports import package_version

BACKENDS = ["tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio"]
PIP_NAMES = {"comet_ml": "comet-ml"}


def events(folder: Path) -> Any:
    """TensorBoard's own reader over the event files in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in events(folder).Scalars(tag)]


class ListTracker(GeneralTracker):
    """A custom tracker that keeps what it is given, on every process."""

    name = "list_tracker"
    requires_logging_directory = False
    main_process_only = False

    def __init__(self, run_name: str = "run", **kwargs: Any) -> None:
        super().__init__()
        self.run_name = run_name
        self.kwargs = kwargs
        self.calls: list[tuple[str, Any]] = []

    @property
    def tracker(self) -> list[tuple[str, Any]]:
        return self.calls

    def start(self) -> None:
        self.calls.append(("start", self.run_name))

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self.calls.append(("config", values))

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self.calls.append(("log", (values, step, kwargs)))

    def finish(self) -> None:
        self.calls.append(("finish", None))


class MainOnlyTracker(ListTracker):
    name = "main_only"
    main_process_only = True

    @tracking.on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self.calls.append(("log", (values, step, kwargs)))


@pytest.fixture
def hidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Hide installed packages from the probes and the import system (``sys.modules[name] = None``)."""

    def hide(*names: str) -> None:
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)  # type: ignore[arg-type]
        package_version.cache_clear()

    yield hide
    monkeypatch.undo()
    package_version.cache_clear()


# --- the GeneralTracker contract -------------------------------------------------------------------


def test_a_subclass_missing_its_attributes_is_refused_naming_them() -> None:
    class Incomplete(GeneralTracker):
        pass

    with pytest.raises(TypeError) as error:
        Incomplete()
    message = str(error.value)
    assert "Incomplete" in message and "`name`" in message
    assert "`requires_logging_directory`" in message and "`tracker`" in message

    class WrongTypes(GeneralTracker):
        name = ""
        requires_logging_directory = "yes"  # type: ignore[assignment]

        @property
        def tracker(self) -> None:
            return None

    with pytest.raises(TypeError, match=r"non-empty str; found ''.*a bool; found 'yes'"):
        WrongTypes()


def test_blank_tracker_does_nothing_and_base_methods_are_no_ops() -> None:
    blank = GeneralTracker(_blank=True)
    blank.start()
    blank.store_init_configuration({"lr": 1})
    blank.log({"loss": 1.0}, step=1)
    blank.finish()
    assert not hasattr(blank, "tracker")


def test_on_main_process_asks_the_state_at_call_time() -> None:
    tracker = MainOnlyTracker()
    assert not PartialState().initialized or True  # the state may exist; the call must work either way
    tracker.log({"a": 1}, step=3)
    assert tracker.calls == [("log", ({"a": 1}, 3, {}))]  # one process: it is the main one


def test_as_number_accepts_python_numpy_and_one_element_tensors() -> None:
    assert as_number(3) == 3 and as_number(2.5) == 2.5 and as_number(True) is True
    assert as_number(torch.tensor(1.5)) == 1.5 and as_number(torch.tensor([7])) == 7
    assert as_number(np.float32(0.25)) == 0.25 and as_number(np.array([[4]])) == 4
    assert as_number(torch.ones(2)) is None and as_number("1") is None and as_number([1]) is None
    assert as_number(torch.tensor(1 + 2j)) is None


def test_numbers_only_skips_strings_with_a_warning_and_refuses_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    PartialState()
    with caplog.at_level("WARNING"):
        assert numbers_only({"loss": torch.tensor(0.5), "phase": "train"}, "SomeTracker") == {"loss": 0.5}
    assert "SomeTracker logs numbers only" in caplog.text and "'phase'" in caplog.text
    with pytest.raises(
        TypeError, match=r"SomeTracker cannot log values\['hist'\] = .* list; it accepts numbers"
    ):
        numbers_only({"hist": [1, 2]}, "SomeTracker")
    with pytest.raises(TypeError, match=r"`values` must be a dict of name -> value, got list"):
        numbers_only([("loss", 1.0)], "SomeTracker")
    with pytest.raises(TypeError, match=r"names in `values` must be str; got 3 \(int\)"):
        numbers_only({3: 1.0}, "SomeTracker")


# --- log_with --------------------------------------------------------------------------------------


def test_available_trackers_are_the_installed_ones_in_accelerate_order() -> None:
    installed = [name for name in BACKENDS if package_version(name) is not None]
    if package_version("tensorboardX") is not None and "tensorboard" not in installed:
        installed.insert(0, "tensorboard")
    assert [str(t) for t in get_available_trackers()] == installed
    assert filter_trackers("all", "logs") == get_available_trackers()
    assert filter_trackers(LoggerType.ALL, "logs") == get_available_trackers()


def test_filter_trackers_parses_dedupes_and_keeps_custom_trackers(tmp_path: Path) -> None:
    custom = ListTracker()
    assert filter_trackers(None) == []
    assert filter_trackers("TensorBoard", tmp_path) == [LoggerType.TENSORBOARD]
    result = filter_trackers(["tensorboard", custom, LoggerType.TENSORBOARD, ListTracker, custom], tmp_path)
    assert result == [LoggerType.TENSORBOARD, custom, ListTracker]
    assert result[1] is custom
    with_all = filter_trackers([custom, "all"], tmp_path)
    assert with_all[0] is custom and with_all[1:] == get_available_trackers()


def test_filter_trackers_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigurationError, match=r"log_with='tensorbord' names no tracker; expected one of \["
    ):
        filter_trackers("tensorbord")
    with pytest.raises(TypeError, match=r"log_with got 3 \(int\); expected a tracker name"):
        filter_trackers([3])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match=r"'tensorboard' writes to a logging directory.*project_dir"):
        filter_trackers("tensorboard")
    with pytest.raises(ConfigurationError, match="writes to a logging directory"):
        filter_trackers("all")  # TensorBoard is installed here and needs the folder
    with pytest.raises(TypeError, match="needs a class attribute `name`"):
        filter_trackers([type("Nameless", (GeneralTracker,), {"requires_logging_directory": False})])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tracker_asked_for_but_not_installed_names_the_pip_package(
    backend: str, hidden: Any, tmp_path: Path
) -> None:
    hidden(backend, "tensorboardX")
    assert LoggerType(backend) not in get_available_trackers()
    with pytest.raises(ImportError) as error:
        filter_trackers(backend, tmp_path)
    assert f"log_with={backend!r} needs the optional package {backend!r}" in str(error.value)
    assert f"pip install {PIP_NAMES.get(backend, backend)}" in str(error.value)


TRACKER_BUILDS = {
    "tensorboard": lambda tmp: TensorBoardTracker("run", tmp),
    "wandb": lambda tmp: WandBTracker("run"),
    "comet_ml": lambda tmp: CometMLTracker("run"),
    "aim": lambda tmp: AimTracker("run", tmp),
    "mlflow": lambda tmp: MLflowTracker("run"),
    "clearml": lambda tmp: ClearMLTracker("run"),
    "dvclive": lambda tmp: DVCLiveTracker("run"),
    "swanlab": lambda tmp: SwanLabTracker("run"),
    "trackio": lambda tmp: TrackioTracker("run"),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_starting_a_tracker_whose_package_is_missing_names_the_pip_package(
    backend: str, hidden: Any, tmp_path: Path
) -> None:
    hidden(backend, "tensorboardX")
    tracker = TRACKER_BUILDS[backend](tmp_path)
    with pytest.raises(
        ImportError,
        match=rf"{type(tracker).__name__} needs the optional package {backend!r}.*"
        rf"pip install {PIP_NAMES.get(backend, backend)}",
    ):
        tracker.start()


def test_importing_the_trackers_and_listing_them_imports_no_backend() -> None:
    code = (
        "import sys, json; import torch; before = set(sys.modules); import hasten.tracking as t; "
        "t.get_available_trackers(); t.filter_trackers('all', 'logs'); "
        "[cls('p') if not cls.requires_logging_directory else cls('p', 'logs') "
        " for cls in t.LOGGER_TYPE_TO_CLASS.values()]; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        f"print(json.dumps(sorted(new & set({[*BACKENDS, 'tensorboardX']!r}))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_register_tracker_class_makes_a_name_usable(recwarn: pytest.WarningsRecorder) -> None:
    try:
        register_tracker_class(ListTracker)
        assert filter_trackers("list_tracker") == ["list_tracker"]
        trackers = start_trackers(
            ["list_tracker"], "proj", None, config={"lr": 0.1}, init_kwargs={"list_tracker": {"flavour": "x"}}
        )
        (tracker,) = trackers
        assert isinstance(tracker, ListTracker) and tracker.kwargs == {"flavour": "x"}
        assert tracker.calls == [("start", "proj"), ("config", {"lr": 0.1})]
        with pytest.warns(UserWarning, match="'list_tracker' was .*ListTracker.*it is now"):
            register_tracker_class(ListTracker)
    finally:
        LOGGER_TYPE_TO_CLASS.pop("list_tracker", None)
    with pytest.raises(TypeError, match="takes a subclass of GeneralTracker, got <class 'int'>"):
        register_tracker_class(int)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match="needs a class attribute `requires_logging_directory`, True or False"
    ):
        register_tracker_class(type("NoDir", (GeneralTracker,), {"name": "nodir"}))


# --- what the Accelerator does with them -----------------------------------------------------------


def test_start_log_find_finish(tmp_path: Path) -> None:
    custom = ListTracker("given")
    specs = filter_trackers(["tensorboard", custom, MainOnlyTracker], tmp_path)
    trackers = start_trackers(
        specs,
        "proj",
        tmp_path,
        config={"lr": 0.5, "name": "x"},
        init_kwargs={"tensorboard": {"flush_secs": 5}, "main_only": {"colour": "red"}},
    )
    board, given, main_only = trackers
    assert isinstance(board, TensorBoardTracker) and board.init_kwargs == {"flush_secs": 5}
    assert given is custom and main_only.kwargs == {"colour": "red"} and main_only.run_name == "proj"
    log_to_trackers(trackers, {"loss": 1.5}, step=2)
    log_to_trackers(trackers, {"loss": 1.0}, step=3, log_kwargs={"list_tracker": {"commit": False}})
    assert custom.calls[-1] == ("log", ({"loss": 1.0}, 3, {"commit": False}))
    assert find_tracker(trackers, "tensorboard") is board
    assert find_tracker(trackers, "tensorboard", unwrap=True) is board.writer
    blank = find_tracker([], "tensorboard")
    assert type(blank) is GeneralTracker
    finish_trackers(trackers)
    assert custom.calls[-1] == ("finish", None)
    assert scalars(tmp_path / "proj", "loss") == [(2, 1.5), (3, 1.0)]


def test_lifecycle_errors_name_what_is_wrong(tmp_path: Path) -> None:
    custom = ListTracker()
    with pytest.raises(
        ConfigurationError, match=r"init_kwargs has entries for \['tensorbaord'\].*\['list_tracker'\]"
    ):
        start_trackers([custom], "proj", None, init_kwargs={"tensorbaord": {}})
    with pytest.raises(
        ConfigurationError, match=r"init_kwargs\['list_tracker'\] is given, but that tracker was"
    ):
        start_trackers([custom], "proj", None, init_kwargs={"list_tracker": {"a": 1}})
    with pytest.raises(
        TypeError, match=r"init_kwargs\['main_only'\] must be a dict of keyword arguments, got list"
    ):
        start_trackers([MainOnlyTracker], "proj", None, init_kwargs={"main_only": [1]})
    with pytest.raises(ConfigurationError, match=r"log_kwargs has entries for \['wandb'\]"):
        log_to_trackers([custom], {"a": 1}, log_kwargs={"wandb": {}})
    with pytest.raises(
        ConfigurationError, match=r"get_tracker\('wandb'\): .* the trackers are \['list_tracker'\]"
    ):
        find_tracker([custom], "wandb")


# --- TensorBoard for real ----------------------------------------------------------------------------


def test_tensorboard_round_trip(tmp_path: Path) -> None:
    tracker = TensorBoardTracker("run", tmp_path)
    tracker.start()
    tracker.store_init_configuration(
        {"lr": 0.1, "layers": 3, "opt": "adamw", "wd": None, "amp": True, "scale": torch.tensor(2.0)}
    )
    for step in range(3):
        tracker.log(
            {"loss": 1.0 / (step + 1), "acc": torch.tensor(step / 10), "n": np.int64(step)}, step=step
        )
    tracker.log({"note": "hello", "lrs": {"group0": 0.1, "group1": 0.2}}, step=5)
    tracker.log({"late": 9.0}, step=6, walltime=1234.5)
    tracker.log({"styled": 3.0}, step=7, new_style=True)
    tracker.log_images({"pictures": np.zeros((2, 3, 4, 4), dtype=np.uint8)}, step=1)
    tracker.finish()

    run = tmp_path / "run"
    assert scalars(run, "loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert scalars(run, "acc") == [(0, 0.0), (1, pytest.approx(0.1)), (2, pytest.approx(0.2))]
    assert scalars(run, "n") == [(0, 0.0), (1, 1.0), (2, 2.0)]
    accumulator = events(run)
    late = accumulator.Scalars("late")[0]
    assert (late.step, late.value, late.wall_time) == (6, 9.0, 1234.5)
    assert [(e.step, e.tensor_proto.float_val[0]) for e in accumulator.Tensors("styled")] == [(7, 3.0)]
    assert "note/text_summary" in accumulator.Tags()["tensors"]
    assert [(e.step, e.width, e.height) for e in accumulator.Images("pictures")] == [(1, 8, 4)]  # a grid of 2
    assert scalars(run / "lrs_group0", "lrs") == [(5, pytest.approx(0.1))]
    (stamp,) = [p for p in run.iterdir() if p.is_dir() and (p / "hparams.yml").exists()]
    assert yaml.safe_load((stamp / "hparams.yml").read_text()) == {
        "lr": 0.1,
        "layers": 3,
        "opt": "adamw",
        "wd": None,
        "amp": True,
        "scale": 2.0,
    }
    hparams = events(stamp).summary_metadata  # the hparams plugin's session record is in that folder
    assert any("_hparams_/session_start_info" in tag for tag in hparams)


def test_tensorboard_refuses_what_it_cannot_log_before_writing_anything(tmp_path: Path) -> None:
    tracker = TensorBoardTracker("run", tmp_path)
    tracker.start()
    with pytest.raises(
        TypeError, match=r"TensorBoardTracker cannot log values\['hist'\] .* list.*unwrap=True"
    ):
        tracker.log({"loss": 1.0, "hist": [1, 2, 3]}, step=0)
    with pytest.raises(TypeError, match=r"cannot log values\['lrs'\]\['g0'\] = 'x'"):
        tracker.log({"loss": 1.0, "lrs": {"g0": "x"}}, step=0)
    with pytest.raises(TypeError, match=r"cannot store config\['optimizer'\] of type dict.*Flatten"):
        tracker.store_init_configuration({"optimizer": {"lr": 1}})
    tracker.log({"loss": 2.0}, step=1)
    tracker.finish()
    assert scalars(tmp_path / "run", "loss") == [(1, 2.0)]  # the refused calls wrote nothing
    with pytest.raises(ConfigurationError, match="TensorBoardTracker needs a `logging_dir` \\(got None\\)"):
        TensorBoardTracker("run", None)  # type: ignore[arg-type]


# --- MLflow's environment overrides (constructor only: no mlflow import) ---------------------------------


def test_mlflow_arguments_and_their_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = MLflowTracker("exp", tags='{"team": "nlp"}', nested_run=True, run_name="r")
    assert (tracker.experiment_name, tracker.tags, tracker.nested_run) == ("exp", {"team": "nlp"}, True)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from_env")
    monkeypatch.setenv("MLFLOW_TAGS", '{"a": 1}')
    monkeypatch.setenv("MLFLOW_NESTED_RUN", "false")
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    tracker = MLflowTracker("exp", tags={"b": 2}, nested_run=True)
    assert (tracker.experiment_name, tracker.tags, tracker.nested_run, tracker.run_id) == (
        "from_env",
        {"a": 1},
        False,
        "abc",
    )
    monkeypatch.setenv("MLFLOW_TAGS", "{team: nlp}")
    with pytest.raises(ConfigurationError, match=r"MLFLOW_TAGS='\{team: nlp\}' is not JSON"):
        MLflowTracker("exp")
    monkeypatch.setenv("MLFLOW_TAGS", "[1]")
    with pytest.raises(ConfigurationError, match=r"MLFLOW_TAGS='\[1\]' is not a JSON object"):
        MLflowTracker("exp")
    monkeypatch.delenv("MLFLOW_TAGS")
    monkeypatch.setenv("MLFLOW_NESTED_RUN", "maybe")
    with pytest.raises(ConfigurationError, match="MLFLOW_NESTED_RUN='maybe' is not a boolean"):
        MLflowTracker("exp")


def test_comet_refuses_what_it_cannot_log_before_touching_the_experiment() -> None:
    with pytest.raises(TypeError, match=r"CometMLTracker cannot log values\['hist'\] = \[1\] of type list"):
        CometMLTracker("run").log({"loss": 1.0, "hist": [1]}, step=1)  # never started: nothing to write to


def test_clearml_title_series_and_table_without_data() -> None:
    assert ClearMLTracker._get_title_series("eval_loss") == ("loss", "eval")
    assert ClearMLTracker._get_title_series("test_acc") == ("acc", "test")
    assert ClearMLTracker._get_title_series("loss") == ("loss", "train")
    with pytest.raises(ConfigurationError, match=r"log_table\('scores'\) got neither `dataframe` nor `data`"):
        ClearMLTracker("run").log_table("scores", columns=["a"])


def test_every_public_name_is_exported() -> None:
    assert sorted(tracking.__all__) == sorted(
        name for name in vars(tracking) if not name.startswith("_") and name != "annotations"
    )
