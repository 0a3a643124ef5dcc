"""Trackers on 2 gloo ranks: main-process-only trackers write from rank 0 alone; others run everywhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.ranks import RankPool
from tests.unit.test_tracking import scalars


def _track_on_every_rank(folder: str) -> dict[str, Any]:
    from hasten._tracking.lifecycle import find_tracker, finish_trackers, log_to_trackers, start_trackers
    from hasten.state import PartialState
    from hasten.tracking import filter_trackers
    from tests.unit.test_tracking import ListTracker

    rank = PartialState().process_index
    everywhere = ListTracker("mine")
    trackers = start_trackers(
        filter_trackers(["tensorboard", everywhere], folder), "run", folder, config={"lr": 0.1}
    )
    for step in range(3):
        log_to_trackers(trackers, {"loss": step / 2, "rank": rank}, step=step)
    board = find_tracker(trackers, "tensorboard")
    started = board.writer is not None
    finish_trackers(trackers)
    return {"rank": rank, "started": started, "calls": [name for name, _ in everywhere.calls]}


def test_tensorboard_writes_from_the_main_process_only(ranks2: RankPool, tmp_path: Path) -> None:
    results = ranks2.run(_track_on_every_rank, str(tmp_path))
    assert [result["started"] for result in results] == [True, False]
    expected_calls = ["start", "config", "log", "log", "log", "finish"]
    assert [result["calls"] for result in results] == [expected_calls, expected_calls]
    run = tmp_path / "run"
    assert len([name for name in os.listdir(run) if name.startswith("events.out.tfevents")]) == 1
    assert scalars(run, "rank") == [(0, 0.0), (1, 0.0), (2, 0.0)]  # rank 1 logged nothing
    assert scalars(run, "loss") == [(0, 0.0), (1, 0.5), (2, 1.0)]
