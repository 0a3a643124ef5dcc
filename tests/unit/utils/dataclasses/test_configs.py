"""DataLoaderConfiguration and ProjectConfiguration (BnbQuantizationConfig: tests/unit/utils/test_bnb.py)."""

from __future__ import annotations

import dataclasses

import pytest

from hasten.utils.dataclasses.configs import DataLoaderConfiguration, ProjectConfiguration


def test_defaults_match_accelerate() -> None:
    accelerate = pytest.importorskip("accelerate.utils")
    for ours, theirs in ((DataLoaderConfiguration, accelerate.DataLoaderConfiguration),
                         (ProjectConfiguration, accelerate.ProjectConfiguration)):  # fmt: skip
        assert dataclasses.asdict(ours()) == dataclasses.asdict(theirs())


def test_project_directories() -> None:
    project = ProjectConfiguration(project_dir="runs/a")
    assert project.logging_dir == "runs/a"
    project.set_directories("runs/b")
    assert project.project_dir == "runs/b" and project.logging_dir == "runs/a"
    later = ProjectConfiguration()
    later.set_directories("runs/c")
    assert later.logging_dir == "runs/c"


@pytest.mark.parametrize(
    ("factory", "message"),
    [(lambda: ProjectConfiguration(total_limit=0), r"total_limit=0 must be a positive int"),
     (lambda: ProjectConfiguration(iteration=-1), r"iteration=-1 must be a non-negative int"),
     (lambda: DataLoaderConfiguration(split_batches="yes"), r"split_batches='yes' must be True or False"),
     (lambda: DataLoaderConfiguration(dispatch_batches=1), r"dispatch_batches=1 must be True, False or None"),
     (lambda: DataLoaderConfiguration(data_seed="7"), r"data_seed='7' must be an int or None")],
)  # fmt: skip
def test_bad_values_are_named(factory: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()  # type: ignore[operator]
