"""The demo a new user runs first: two processes meet, pad and gather their ragged outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_gathers_ragged_outputs_on_two_processes() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "PYTEST_"))}
    result = subprocess.run(
        [sys.executable, "-m", "hasten", "launch", "--cpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), str(ROOT / "examples" / "quickstart.py")],
        capture_output=True, text=True, timeout=180, env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "sum of (rank + 1) = 3 (expected 3)" in result.stdout
    assert "Gathered ids (padded with -1): [0, 1, -1, 10, 11, 12]" in result.stdout
    assert "['rank 0 had 2 rows', 'rank 1 had 3 rows']" in result.stdout
    assert "loaded back on every rank: identical = [True, True]" in result.stdout
