"""The training example (``make demo``): the loop of Accelerate's documentation, launched by ``hasten
launch`` on 1 and 2 processes, prints and saves exactly what the same script prints and saves
with ``accelerate`` in its imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train.py"


def _launch(script: Path, processes: int, output: Path, *extra: str) -> list[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "PYTEST_"))}
    result = subprocess.run(
        [sys.executable, "-m", "hasten", "launch", "--cpu", "--num_processes", str(processes)]
        + ["--main_process_port", str(free_port()), str(script), "--output_dir", str(output), *extra],
        capture_output=True,
        text=True,
        timeout=240,
        env={**env, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line.startswith(("epoch", "saved [", "resume"))]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_the_example_trains_on_one_and_two_processes_like_accelerate(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    theirs = tmp_path / "train_accelerate.py"
    theirs.write_text(SCRIPT.read_text().replace("from hasten", "from accelerate"))
    one = _launch(SCRIPT, 1, tmp_path / "one")
    two = _launch(SCRIPT, 2, tmp_path / "two")
    two_theirs = _launch(theirs, 2, tmp_path / "two-accelerate")
    for lines in (one, two):
        assert len(lines) == 4 and all("on 301 samples" in line for line in lines[:3])
        losses = [float(line.split("training loss ")[1].split(",")[0]) for line in lines[:3]]
        assert losses == sorted(losses, reverse=True)
        assert float(lines[2].split("accuracy ")[1].split()[0]) > 0.8
    assert [line.split(" to ")[0] for line in two] == [line.split(" to ")[0] for line in two_theirs]
    ours, reference = _weights(tmp_path / "two"), _weights(tmp_path / "two-accelerate")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    resumed = _launch(SCRIPT, 2, tmp_path / "two", "--resume")  # from the state saved halfway
    assert resumed[0].startswith("resumed at batch 48 (epoch 1)")
    assert "resumed run: 48 losses per process after the checkpoint match the first run bit for bit" in resumed
    assert resumed[-3] == two[-2]  # the last epoch prints the same loss and accuracy
    assert _weights(tmp_path / "two").keys() == ours.keys()
    assert all(torch.equal(_weights(tmp_path / "two")[k], ours[k]) for k in ours)
