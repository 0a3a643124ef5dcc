"""Run the real `hasten` command line in a subprocess, as users run it, for the command tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def hasten(
    home: Path, *argv: str, timeout: float = 120, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    """``python -m hasten ARGV`` with ``HF_HOME=home`` (no default config file unless the test writes one),
    no launch variables of this process, and ``extra_env`` on top."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_", "PYTEST_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "hasten", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "HF_HOME": str(home), "COLUMNS": "200", **extra_env},
    )
