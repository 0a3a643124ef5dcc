"""Run a model larger than its memory budget: a third in RAM, the rest streamed from disk.

1. Build a ~400 MB model, run it once fully in memory (the reference), save it as
   sharded safetensors.
2. In a fresh process, build the same model on ``meta`` (no memory), and let
   ``load_checkpoint_and_dispatch`` plan a device map under ``max_memory`` of a third
   of the model, stream the weights into place, and hook the model so each
   disk-bound block is loaded only while it runs.
3. Run it, compare with the reference, and print the map and the peak resident memory.

Run: ``python examples/big_model_inference.py`` (part of ``make demo``).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from hasten import init_empty_weights, load_checkpoint_and_dispatch
from hasten.utils import compute_module_sizes
from hasten.utils.sharding import save_sharded_safetensors

WIDTH, HIDDEN, BLOCKS = 1024, 4096, 12  # 12 blocks of ~33 MB (fp32)


class Block(nn.Module):
    """A transformer-style feed-forward block: the unit the device map may not split."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, HIDDEN)
        self.down = nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's ``VmHWM`` is per process image; ``ru_maxrss`` would carry over the parent's peak
    into a spawned child, so it is only the fallback elsewhere (where it reports bytes or KiB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def load_and_run(folder: str, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    """The fresh process: meta model, budgeted dispatch, one forward pass."""
    baseline = peak_rss_mib()
    with init_empty_weights():
        model = Model()
    total = compute_module_sizes(model)[""]
    budget = total // 3
    model = load_checkpoint_and_dispatch(
        model,
        Path(folder) / "checkpoint",
        device_map="auto",
        max_memory={"cpu": budget},
        no_split_module_classes=["Block"],
        offload_folder=Path(folder) / "offload",
    )
    inputs, expected = torch.load(Path(folder) / "reference.pt", weights_only=True)
    with torch.no_grad():
        output = model(inputs)
    places = Counter(str(device) for device in model.hf_device_map.values())
    queue.put(
        {
            "total_mib": total / 2**20,
            "budget_mib": budget / 2**20,
            "map": dict(places),
            "first_entries": dict(list(model.hf_device_map.items())[:3]),
            "max_abs_diff": (output - expected).abs().max().item(),
            "baseline_mib": baseline,
            "peak_mib": peak_rss_mib(),
        }
    )


def main() -> int:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model = Model().eval()
        inputs = torch.randn(4, WIDTH)
        with torch.no_grad():
            expected = model(inputs)
        torch.save((inputs, expected), Path(folder) / "reference.pt")
        save_sharded_safetensors(model.state_dict(), Path(folder) / "checkpoint", max_shard_size="100MB")
        del model
        shards = sorted(p.name for p in (Path(folder) / "checkpoint").iterdir())
        print(f"Saved the model as {len(shards) - 1} safetensors shards plus {shards[-1]}.")

        queue: mp.Queue = mp.get_context("spawn").Queue()  # type: ignore[type-arg]
        child = mp.get_context("spawn").Process(target=load_and_run, args=(folder, queue))
        child.start()
        report = queue.get(timeout=600)
        child.join()
    print(f"Model: {report['total_mib']:.0f} MiB; CPU budget: {report['budget_mib']:.0f} MiB (a third).")
    print(f"Device map: {report['map']} blocks (first entries: {report['first_entries']}).")
    print(
        f"Peak resident memory of the loading process: {report['peak_mib']:.0f} MiB "
        f"({report['peak_mib'] - report['baseline_mib']:.0f} MiB above its start)."
    )
    ok = report["max_abs_diff"] < 1e-5
    print(
        f"Outputs {'match' if ok else 'DIFFER from'} the in-memory model (max abs diff "
        f"{report['max_abs_diff']:.2e})."
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
