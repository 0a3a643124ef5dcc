"""save from one process, wait_for_everyone and unwrapping DDP, on real gloo ranks."""

from __future__ import annotations

from pathlib import Path

import pytest


def _save_everywhere(folder: str, on_each_node: bool) -> dict[str, list[str]]:
    import os

    import torch

    from hasten.state import PartialState
    from hasten.utils.parallel import save, wait_for_everyone

    state = PartialState()
    own = os.path.join(folder, f"rank{state.process_index}")  # each rank passes its own folder
    os.makedirs(own, exist_ok=True)
    save({"rank": torch.tensor(state.process_index)}, os.path.join(own, "state.bin"), save_on_each_node=on_each_node)
    wait_for_everyone()
    return {name: sorted(os.listdir(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("on_each_node", [False, True])
def test_only_the_main_process_writes(ranks2, tmp_path: Path, on_each_node: bool) -> None:
    # one node: the local main process is the main process, so both settings write once, from rank 0;
    # rank 1 was given a folder of its own and must leave it empty
    expected = {"rank0": ["state.bin"], "rank1": []}
    assert ranks2.run(_save_everywhere, str(tmp_path), on_each_node) == [expected] * 2


def _unwrap_ddp() -> bool:
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from hasten.state import PartialState
    from hasten.utils.parallel import extract_model_from_parallel

    PartialState()
    inner = nn.Linear(2, 2)
    return extract_model_from_parallel(DistributedDataParallel(inner)) is inner


def test_ddp_is_unwrapped(ranks2) -> None:
    assert ranks2.run(_unwrap_ddp) == [True, True]


def _unwrap_fsdp() -> bool:
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel

    from hasten.state import PartialState
    from hasten.utils.parallel import extract_model_from_parallel

    PartialState()
    inner = nn.Linear(2, 2)
    return extract_model_from_parallel(FullyShardedDataParallel(inner, device_id="cpu")) is inner


def test_fsdp_is_unwrapped(ranks2) -> None:
    assert ranks2.run(_unwrap_fsdp) == [True, True]
