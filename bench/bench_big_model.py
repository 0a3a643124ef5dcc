"""Big-model inference: forward passes of offloaded models, hasten against Accelerate, one run.

Run: ``.venv/bin/python bench/bench_big_model.py`` (needs Accelerate). A 256 MiB model of 8
blocks; timed per forward pass (batch of 4): fully disk-offloaded (``disk_offload``), CPU-offloaded
(``cpu_offload``, execution on the CPU: the hook overhead), dispatched half on CPU and half on
disk (``dispatch_model``), against the plain model. Prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import measure, table

WIDTH = 2048


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH)) for _ in range(8))
    ).eval()


def main() -> None:
    import accelerate

    import hasten

    x = torch.randn(4, WIDTH)
    plain = build()
    rows = []
    with tempfile.TemporaryDirectory(dir=Path.home()) as folder, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_disk = hasten.disk_offload(build(), f"{folder}/ours", execution_device="cpu")
        theirs_disk = accelerate.disk_offload(build(), f"{folder}/theirs", execution_device="cpu")
        assert torch.allclose(ours_disk(x), plain(x)) and torch.allclose(theirs_disk(x), plain(x))
        rows.append(
            (
                "disk_offload",
                [
                    measure("hasten", lambda: ours_disk(x), repeat=7),
                    measure("Accelerate", lambda: theirs_disk(x), repeat=7),
                    measure("plain model", lambda: plain(x), repeat=7),
                ],
            )
        )
        ours_cpu = hasten.cpu_offload(build(), execution_device="cpu")
        theirs_cpu = accelerate.cpu_offload(build(), execution_device="cpu")
        rows.append(
            (
                "cpu_offload",
                [
                    measure("hasten", lambda: ours_cpu(x), repeat=7),
                    measure("Accelerate", lambda: theirs_cpu(x), repeat=7),
                    measure("plain model", lambda: plain(x), repeat=7),
                ],
            )
        )
        device_map = {str(i): ("cpu" if i < 4 else "disk") for i in range(8)}
        ours_mixed = hasten.dispatch_model(
            build(), device_map, main_device="cpu", offload_dir=f"{folder}/ours-mixed"
        )
        theirs_mixed = accelerate.dispatch_model(
            build(), device_map, main_device="cpu", offload_dir=f"{folder}/theirs-mixed"
        )
        rows.append(
            (
                "dispatch_model, half CPU half disk",
                [
                    measure("hasten", lambda: ours_mixed(x), repeat=7),
                    measure("Accelerate", lambda: theirs_mixed(x), repeat=7),
                    measure("plain model", lambda: plain(x), repeat=7),
                ],
            )
        )
    print(table("Forward pass of a 256 MiB model (8 blocks), batch of 4, on CPU", rows))


if __name__ == "__main__":
    main()
