"""The `is_*_available` probes: hasten's against Accelerate's, first call (cold) and cached, in fresh
interpreters.

Run: .venv/bin/python bench/bench_probes.py [--repeat 5]
Every probe both libraries define is called once after importing the library's `utils.imports`
(cold: what a script pays the first time it asks), then 100 more times (warm). The table also
lists the optional packages each side imported while probing (hasten's probes only look).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_CODE = """
import json, sys, time, torch
import {lib}.utils.imports as probes
names = {names!r}
before = set(sys.modules)
start = time.perf_counter()
for name in names:
    getattr(probes, name)()
cold = time.perf_counter() - start
start = time.perf_counter()
for _ in range(100):
    for name in names:
        getattr(probes, name)()
warm = (time.perf_counter() - start) / 100
new = {{m.split(".")[0] for m in set(sys.modules) - before}} - {{"torch", "{lib}"}}
loaded = sorted(m for m in new if not m.startswith("_") and m not in sys.stdlib_module_names)
print(json.dumps({{"cold": cold, "warm": warm, "loaded": loaded}}))
"""


def _shared_probes() -> list[str]:
    code = (
        "import accelerate.utils.imports as a, hasten.utils.imports as h; "
        "print(' '.join(sorted(n for n in vars(a) if n.startswith('is_') and n.endswith('_available') "
        "and callable(getattr(h, n, None)))))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()


def _run(lib: str, names: list[str]) -> dict[str, object]:
    output = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _CODE.format(lib=lib, names=names)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    names = _shared_probes()
    results: dict[str, list[dict[str, object]]] = {"hasten": [], "accelerate": []}
    for _ in range(repeat):
        for lib in results:
            results[lib].append(_run(lib, names))
    title = f"the {len(names)} probes both define, fresh interpreters (median of {repeat})"
    print(f"### `is_*_available`: {title}\n")
    print("| library | first call of every probe | every probe again | optional packages imported |")
    print("|---|---|---|---|")
    medians = {}
    for lib, runs in results.items():
        cold = statistics.median(float(run["cold"]) for run in runs)  # type: ignore[arg-type]
        warm = statistics.median(float(run["warm"]) for run in runs)  # type: ignore[arg-type]
        medians[lib] = cold
        loaded = ", ".join(runs[-1]["loaded"]) or "none"  # type: ignore[arg-type]
        print(f"| {lib} | {cold * 1000:.1f} ms | {warm * 1e6:.1f} µs | {loaded} |")
    print(f"\nFirst calls: Accelerate takes {medians['accelerate'] / medians['hasten']:.1f}× hasten's time.")


if __name__ == "__main__":
    main()
