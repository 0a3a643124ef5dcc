"""ParallelismConfig building real device meshes over gloo ranks (2 and 4) and checking a layout against the job."""

from __future__ import annotations

import warnings
from typing import Any

from tests.ranks import RankPool


def _mesh_of_fsdp_and_tensor_parallel() -> dict[str, Any]:
    from hasten.parallelism_config import ParallelismConfig
    from hasten.state import PartialState

    PartialState()
    config = ParallelismConfig(dp_shard_size=2, tp_size=2)
    mesh = config.get_device_mesh("cpu")
    assert config.get_device_mesh() is mesh and config.get_device_mesh("cpu") is mesh
    try:
        config.get_device_mesh("cuda")
    except ValueError as error:
        wrong_device = str(error)
    joint = {name: config._submesh([name]) for name in ("dp", "dp_shard_cp", "dp_cp")}
    fsdp = config._submesh(config.fsdp_dim_names)
    return {
        "names": tuple(mesh.mesh_dim_names),
        "local": {name: mesh[name].get_local_rank() for name in ("dp_shard", "tp")},
        "joint": {name: (m.size(), m.get_local_rank()) for name, m in joint.items()},
        "fsdp": (fsdp.size(), fsdp.get_local_rank()),
        "wrong_device": wrong_device,
    }


def test_mesh_for_fsdp_and_tensor_parallel_on_four_ranks(ranks4: RankPool) -> None:
    results = ranks4.run(_mesh_of_fsdp_and_tensor_parallel)
    for rank, result in enumerate(results):
        assert result["names"] == ("dp_shard", "tp")
        shard, tp = divmod(rank, 2)  # row-major: tp is the fastest-moving dimension
        assert result["local"] == {"dp_shard": shard, "tp": tp}
        assert result["joint"] == {"dp": (2, shard), "dp_shard_cp": (2, shard), "dp_cp": (2, shard)}
        assert result["fsdp"] == (2, shard)
        assert "built for 'cpu', not device_type='cuda'" in result["wrong_device"]


def _layouts_against_the_job() -> dict[str, Any]:
    from hasten.parallelism_config import ParallelismConfig
    from hasten.state import AcceleratorState
    from hasten.utils.dataclasses.plugins.fsdp import FullyShardedDataParallelPlugin
    from hasten.utils.dataclasses.plugins.parallelism import TorchTensorParallelConfig
    from hasten.utils.errors import ConfigurationError

    messages: dict[str, Any] = {}
    data_parallel = ParallelismConfig()
    data_parallel._validate_accelerator(AcceleratorState())  # two processes, all sizes 1: plain DDP
    messages["replicate"] = data_parallel.dp_replicate_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ParallelismConfig(dp_shard_size=2, tp_handler=TorchTensorParallelConfig())._validate_accelerator(
            AcceleratorState()
        )
    messages["warned"] = [str(w.message) for w in caught]
    try:
        ParallelismConfig(tp_size=4).get_device_mesh("cpu")
    except ConfigurationError as error:
        messages["world"] = str(error)
    AcceleratorState._reset_state()
    fsdp = AcceleratorState(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    try:
        ParallelismConfig(tp_size=2)._validate_accelerator(fsdp)
    except ConfigurationError as error:
        messages["fsdp"] = str(error)
    return messages


def test_layouts_are_checked_against_the_job(ranks2: RankPool) -> None:
    results = ranks2.run(_layouts_against_the_job)
    for rank, result in enumerate(results):
        assert result["replicate"] == 2
        assert "the parallelism sizes multiply to 4 but there are 2 processes" in result["world"]
        assert "has no dimension to shard over" in result["fsdp"]
        if rank == 0:
            assert result["warned"] == [
                "ParallelismConfig: ['tp_handler'] set but their dimensions have size 1; they are ignored."
            ]
        else:
            assert result["warned"] == []  # warned once, on the main process
