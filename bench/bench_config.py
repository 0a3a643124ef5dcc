"""Kwargs handlers and plugins: hasten against Accelerate, side by side in one process.

Run: ``.venv/bin/python bench/bench_config.py``. Prints a Markdown table for docs/benchmarks.md.
What is timed is pure Python: ``to_kwargs()`` (called each time the ``Accelerator`` builds the
object a handler configures) and building a plugin from the ``accelerate launch`` environment.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import best_interleaved, table

import hasten.utils as hasten
from hasten.utils.environment import patch_environment

LAUNCH_ENV = {
    "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
    "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block",
}


def cases(lib: Any) -> list[tuple[str, Callable[[], Any]]]:
    ddp = lib.DistributedDataParallelKwargs(find_unused_parameters=True)
    scaler = lib.GradScalerKwargs(init_scale=1024.0)
    dynamo = lib.TorchDynamoPlugin(backend="inductor", mode="max-autotune")
    return [
        ("DistributedDataParallelKwargs.to_kwargs()", ddp.to_kwargs),
        ("GradScalerKwargs.to_kwargs()", scaler.to_kwargs),
        ("TorchDynamoPlugin.to_kwargs()", dynamo.to_kwargs),
        ("TorchDynamoPlugin() from the launch environment", lib.TorchDynamoPlugin),
        ("DeepSpeedPlugin() from the launch environment", lib.DeepSpeedPlugin),
        ("FullyShardedDataParallelPlugin() from the launch environment", lib.FullyShardedDataParallelPlugin),
    ]


def main() -> None:
    import accelerate.utils as accelerate

    rows = []
    with patch_environment(**LAUNCH_ENV):
        for (name, ours), (_, theirs) in zip(cases(hasten), cases(accelerate)):
            rows.append((name, best_interleaved([("hasten", ours), ("accelerate", theirs)])))
    print(table("Kwargs handlers and plugins (pure Python, one process)", rows))


if __name__ == "__main__":
    main()
