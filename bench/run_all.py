"""Run every benchmark in this folder, one after the other, printing their Markdown tables.

Run: ``make bench`` (or ``.venv/bin/python bench/run_all.py``). Each benchmark runs in its own
interpreter so one's imports and caches do not colour the next one's figures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    failures = 0
    for script in sorted(Path(__file__).resolve().parent.glob("bench_*.py")):
        print(f"\n## {script.name}\n", flush=True)
        failures += subprocess.run([sys.executable, str(script)], check=False).returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
