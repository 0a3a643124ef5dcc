"""Start-up cost: `import hasten` against `import torch` and `import accelerate`, each in a fresh interpreter.

Run: .venv/bin/python bench/bench_import.py [--repeat 9]
Interpreters are started interleaved (torch, hasten, accelerate, torch, …) so machine noise
spreads evenly; the table reports medians and each import's cost on top of torch's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python (nothing)": "pass",
    "import torch": "import torch",
    "import hasten": "import hasten",
    "import hasten.utils": "import hasten.utils",
    "import accelerate": "import accelerate",
    "import accelerate.utils": "import accelerate.utils",
}


def _run(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    repeat = parser.parse_args().repeat
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    for code in CASES.values():  # warm the file cache once
        _run(code)
    for _ in range(repeat):
        for name, code in CASES.items():
            samples[name].append(_run(code))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    base, torch_time = medians["python (nothing)"], medians["import torch"]
    print(f"### Start-up: fresh interpreter, wall time (median of {repeat})\n")
    print("| command | wall time | on top of `import torch` |")
    print("|---|---|---|")
    for name, median in medians.items():
        extra = (
            "—" if name in ("python (nothing)", "import torch") else f"{(median - torch_time) * 1000:.0f} ms"
        )
        print(f"| `{name}` | {median * 1000:.0f} ms | {extra} |")
    hasten_extra = medians["import hasten.utils"] - torch_time
    accelerate_extra = medians["import accelerate.utils"] - torch_time
    print(
        f"\nPython itself: {base * 1000:.0f} ms. `accelerate.utils` costs "
        f"{accelerate_extra / max(hasten_extra, 1e-3):.1f}× what `hasten.utils` costs on top of torch."
    )


if __name__ == "__main__":
    main()
