"""Exact resume after SIGKILL, with real processes on 1 and 2 gloo ranks.

An uninterrupted seeded run records every loss. A second run saves with ``save_state()`` every
few batches and kills itself with SIGKILL at a random batch after a save; a third process resumes
it with ``load_state()`` and the documented recipe (``skip_first_batches`` for the rest of the
loader's epoch). From the resume point on, its losses equal the uninterrupted run's: bitwise in
fp32, within bf16 rounding under bf16 autocast (the training script is ``tests/resume_run.py``).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.ranks import free_port, rank_environment

ROOT = Path(__file__).resolve().parents[2]
STEPS = 36  # resume_run: 3 epochs of 12 batches (of 6 on each of two ranks)


def launch(world: int, *args: str) -> list[int]:
    """Run ``tests/resume_run.py`` on ``world`` ranks; the return codes."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_CURRENT_TEST"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.resume_run", *args],
            cwd=ROOT,
            env={**env, **(rank_environment(rank, world, port) if world > 1 else {})},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    codes = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        if proc.returncode not in (0, -9):
            raise AssertionError(f"resume_run failed ({proc.returncode}):\n{err[-3000:]}")
        codes.append(proc.returncode)
    return codes


def losses(folder: Path, rank: int) -> dict[int, float]:
    lines = (folder / f"losses_{rank}.txt").read_text().split()
    return {int(step): float.fromhex(value) for step, value in zip(lines[::2], lines[1::2])}


def _uninterrupted(argv: list[str]) -> bool:
    from tests.resume_run import run

    run(argv)
    return True


@pytest.mark.parametrize(
    ("world", "precision", "seedable"),
    [
        pytest.param(1, "no", False, id="1-rank-fp32-random-sampler"),
        pytest.param(2, "no", True, id="2-ranks-fp32-seedable"),
        pytest.param(2, "bf16", False, id="2-ranks-bf16-random-sampler"),
    ],
)
def test_resume_after_sigkill_matches_the_uninterrupted_run(
    tmp_path: Path, world: int, precision: str, seedable: bool, ranks2: Any
) -> None:
    total = STEPS // world
    save_every = 5
    kill_at = random.Random(os.getpid()).randrange(save_every + 1, total - 1)
    common = ["--precision", precision] + (["--seedable"] if seedable else [])
    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    for folder in (full, killed, resumed):
        folder.mkdir()
    argv = ["--project", str(full), "--out", str(full), *common]
    assert (ranks2.run(_uninterrupted, argv) if world == 2 else [_uninterrupted(argv)]) == [True] * world
    codes = launch(
        world, "--project", str(killed), "--out", str(killed), "--save-every", str(save_every),
        "--kill-at", str(kill_at), *common,
    )  # fmt: skip
    assert codes == [-9] * world, f"the run was to be killed at batch {kill_at}"
    assert launch(world, "--project", str(killed), "--out", str(resumed), "--resume", *common) == [0] * world
    start = kill_at // save_every * save_every
    for rank in range(world):
        assert int((resumed / f"resumed_{rank}.txt").read_text()) == start
        expected, got = losses(full, rank), losses(resumed, rank)
        assert sorted(got) == list(range(start + 1, total + 1))
        for step, loss in got.items():
            if precision == "no":
                assert loss == expected[step], f"rank {rank}, batch {step} (resumed from {start})"
            else:
                assert loss == pytest.approx(expected[step], rel=1e-2), f"rank {rank}, batch {step}"
        assert sorted(losses(killed, rank)) == list(range(1, kill_at + 1))
