"""Crash-safe saving: SIGKILL at random moments during ``save_state``, on 1 and 2 real ranks, then
``load_state()`` loads the last complete checkpoint, bit for bit.

``tests/save_forever.py`` saves again and again (automatic naming, ``total_limit=2``), each save
with every weight set to its number and each rank's RNG seeded from it. The test kills every
rank at a random moment inside a save, then loads in fresh processes and checks that the
checkpoint loaded is the newest one whose save had finished or a newer complete one, with its
weights, optimizer state and RNG states exactly as saved.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.ranks import free_port, rank_environment

ROOT = Path(__file__).resolve().parents[2]


def _kill_during_a_save(project: Path, world: int, rng: random.Random) -> tuple[int, int]:
    """Start the savers, kill them all at a random moment of a save; the last save the parent saw
    finished before the kill, and the last one begun (read after the kill)."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_CURRENT_TEST"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, "-u", "-m", "tests.save_forever", str(project)],
            cwd=ROOT,
            env={**env, **(rank_environment(rank, world, port) if world > 1 else {})},
            stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
            text=True,
        )
        for rank in range(world)
    ]
    target = rng.randrange(2, 5)
    done = -1
    try:
        assert procs[0].stdout is not None
        for line in procs[0].stdout:
            word, number = line.split()
            if word == "saved":
                done = int(number)
            elif int(number) == target:
                time.sleep(rng.uniform(0.0, 0.06))  # a save takes tens of milliseconds here
                break
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        begun = target
        for proc in procs:
            proc.wait(timeout=60)
            if proc.stdout is not None:
                begun = max([begun] + [int(line.split()[1]) for line in proc.stdout.read().splitlines()])
                proc.stdout.close()
    assert done >= 1, "the saver never finished a save"
    return done, begun


def _load_and_check(project: str) -> int:
    """Load the latest checkpoint; check it bit for bit; return its number."""
    from tests.save_forever import prepared, seed_of

    accelerator, model, optimizer = prepared(project)
    torch.manual_seed(12345)
    accelerator.load_state()
    number = accelerator.save_iteration - 1
    for parameter in model.parameters():
        assert torch.equal(parameter, torch.full_like(parameter, number)), f"weights of checkpoint {number}"
    expected = torch.Generator().manual_seed(seed_of(number, accelerator.process_index)).get_state()
    assert torch.equal(torch.get_rng_state(), expected)
    steps = {int(state["step"]) for state in optimizer.state_dict()["state"].values()}
    assert steps == {1}
    return number


@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_during_save_state_keeps_the_last_complete_checkpoint(
    tmp_path: Path, world: int, ranks2: Any
) -> None:
    rng = random.Random(os.getpid() + world)
    for attempt in range(2):
        project = tmp_path / f"run{attempt}"
        done, begun = _kill_during_a_save(project, world, rng)
        numbers = ranks2.run(_load_and_check, str(project)) if world == 2 else [_load_and_check(str(project))]
        assert len(set(numbers)) == 1
        # The saver may be ahead of what the parent read: any save from the last one seen finished to
        # the last one begun may be the newest complete checkpoint (checked bit for bit above).
        assert done <= numbers[0] <= begun, f"loaded checkpoint {numbers[0]}, saves {done} to {begun}"
        complete = sorted(p.name for p in (project / "checkpoints").iterdir() if not p.name.startswith("."))
        assert len(complete) <= 2 and f"checkpoint_{numbers[0]}" in complete
