"""The Accelerator's tracking methods with a real TensorBoard run read back through tensorboard's
own reader, and a custom tracker (the backends themselves are tested in test_tracking*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hasten import Accelerator
from hasten.tracking import GeneralTracker
from hasten.utils.errors import ConfigurationError
from tests.unit.test_tracking import ListTracker, events, scalars

pytest.importorskip("tensorboard")


def test_init_log_get_and_end_through_the_accelerator(tmp_path: Path) -> None:
    custom = ListTracker()
    accelerator = Accelerator(log_with=["tensorboard", custom], project_dir=str(tmp_path))
    accelerator.init_trackers("demo", config={"lr": 0.1}, init_kwargs={"tensorboard": {"flush_secs": 1}})
    assert [tracker.name for tracker in accelerator.trackers] == ["tensorboard", "list_tracker"]
    for step in range(3):
        accelerator.log({"loss": 1.0 / (step + 1), "accuracy": step / 4}, step=step)
    accelerator.log({"loss": 0.125}, step=3, log_kwargs={"list_tracker": {"note": "last"}})
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    assert writer is accelerator.get_tracker("tensorboard").tracker
    with pytest.raises(ConfigurationError, match=r"get_tracker\('wandb'\): no tracker of that name"):
        accelerator.get_tracker("wandb")
    accelerator.end_training()
    assert scalars(tmp_path / "demo", "loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3)), (3, 0.125)]
    assert scalars(tmp_path / "demo", "accuracy") == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert events(tmp_path / "demo").Tags()["tensors"] or events(tmp_path / "demo").Tags()["scalars"]
    assert ("log", ({"loss": 0.125}, 3, {"note": "last"})) in custom.calls
    assert custom.calls[-1][0] == "finish"


def test_without_trackers_get_tracker_gives_an_empty_one() -> None:
    accelerator = Accelerator()
    accelerator.init_trackers("nothing")
    accelerator.log({"loss": 1.0})
    blank = accelerator.get_tracker("tensorboard")
    assert accelerator.trackers == [] and isinstance(blank, GeneralTracker)
    blank.log({"loss": 1.0})  # does nothing, so the same code runs on every process
