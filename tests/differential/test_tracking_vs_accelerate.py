"""hasten's trackers against Accelerate's: same constructors, same log_with answers, same TensorBoard files.

Where hasten deliberately differs (docs/design.md: unknown values raise, missing packages raise,
Comet groups keep their key), the comparison stays on ground both define the same way.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from hasten import tracking as ours
from tests.unit.test_tracking import events

theirs = pytest.importorskip("accelerate.tracking")

CLASSES = [
    "GeneralTracker",
    "TensorBoardTracker",
    "WandBTracker",
    "TrackioTracker",
    "CometMLTracker",
    "AimTracker",
    "MLflowTracker",
    "ClearMLTracker",
    "DVCLiveTracker",
    "SwanLabTracker",
]


def _parameters(function: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("name", CLASSES)
def test_constructors_and_class_attributes_match(name: str) -> None:
    mine, accelerate = getattr(ours, name), getattr(theirs, name)
    assert _parameters(mine.__init__) == _parameters(accelerate.__init__)
    for attribute in ("name", "requires_logging_directory", "main_process_only"):
        assert getattr(mine, attribute, None) == getattr(accelerate, attribute, None), attribute
    public = {n for n in dir(accelerate) if not n.startswith("_") and callable(getattr(accelerate, n))}
    assert public <= {n for n in dir(mine) if callable(getattr(mine, n))}, public - set(dir(mine))
    for method in public - {"__init__"}:
        assert _parameters(getattr(mine, method)) == _parameters(getattr(accelerate, method)), method


def test_module_level_names_match() -> None:
    for name in ("on_main_process", "filter_trackers", "register_tracker_class", "get_available_trackers"):
        assert [p[0] for p in _parameters(getattr(ours, name))] == [
            p[0] for p in _parameters(getattr(theirs, name))
        ]
    assert set(ours.LOGGER_TYPE_TO_CLASS) == set(theirs.LOGGER_TYPE_TO_CLASS)
    assert [str(t) for t in ours.get_available_trackers()] == [
        str(t) for t in theirs.get_available_trackers()
    ]


@pytest.mark.parametrize(
    "log_with",
    [
        "tensorboard",
        ["wandb", "tensorboard", "wandb"],
        "all",
        ["all", "mlflow"],
        None,
        ["comet_ml", "trackio"],
    ],
    ids=str,
)
def test_filter_trackers_agrees(log_with: Any, tmp_path: Path) -> None:
    assert [str(t) for t in ours.filter_trackers(log_with, tmp_path)] == [
        str(t) for t in theirs.filter_trackers(log_with, tmp_path)
    ]


def test_clearml_titles_agree() -> None:
    for name in ("eval_loss", "test_acc", "train_loss", "loss", "evaluation", "eval_"):
        assert ours.ClearMLTracker._get_title_series(name) == theirs.ClearMLTracker._get_title_series(name)


def _tensorboard_contents(folder: Path) -> dict[str, Any]:
    accumulator = events(folder)
    tags = accumulator.Tags()
    return {
        "scalars": {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in tags["scalars"]},
        "tensors": sorted(tags["tensors"]),
    }


def test_tensorboard_files_read_the_same(tmp_path: Path) -> None:
    def run(module: Any, folder: Path) -> None:
        tracker = module.TensorBoardTracker("run", folder)
        tracker.start()
        tracker.store_init_configuration({"lr": 0.1, "optimizer": "adamw", "layers": 4})
        for step in range(4):
            tracker.log({"loss": 1.0 / (step + 1), "acc": step * 0.25, "epoch": step // 2}, step=step)
        tracker.log({"note": "halfway", "lrs": {"g0": 0.1, "g1": 0.01}}, step=4)
        tracker.log({"unstepped": 3.5})
        tracker.finish()

    run(ours, tmp_path / "hasten")
    run(theirs, tmp_path / "accelerate")
    mine = _tensorboard_contents(tmp_path / "hasten" / "run")
    assert mine == _tensorboard_contents(tmp_path / "accelerate" / "run")
    assert mine["scalars"]["loss"][1] == (1, 0.5)
    for group in ("lrs_g0", "lrs_g1"):
        assert _tensorboard_contents(tmp_path / "hasten" / "run" / group) == _tensorboard_contents(
            tmp_path / "accelerate" / "run" / group
        )
    hparams = sorted(p.name for p in (tmp_path / "hasten" / "run").rglob("hparams.yml"))
    assert (
        hparams
        == sorted(p.name for p in (tmp_path / "accelerate" / "run").rglob("hparams.yml"))
        == ["hparams.yml"]
    )
