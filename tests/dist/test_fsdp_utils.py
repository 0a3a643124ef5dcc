"""`hasten.utils.fsdp_utils` on real FSDP2 (`fully_shard`) over 2 and 4 gloo ranks: preparing a model and
its optimizer, save/load round trips (full, sharded DCP, per-rank files) that are bit-exact, files readable
by Accelerate and the other way round, merging a sharded checkpoint, and errors raised on every rank."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.ranks import RankPool


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    """A small language model: embedding, two blocks, final norm, output head (tied or not)."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 32, bias=False)
        if tied:
            self.head.weight = self.embed.weight
            self._tied_weights_keys = ["head.weight"]
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def tie_weights(self) -> None:
        if hasattr(self, "_tied_weights_keys"):
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids) * self.scale
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 32, (8, 5), generator=generator)
    return ids, torch.randint(0, 32, (8, 5), generator=generator)


def _state(**plugin: Any) -> Any:
    from hasten.state import AcceleratorState
    from hasten.utils.dataclasses.plugins.fsdp import FullyShardedDataParallelPlugin

    plugin.setdefault("auto_wrap_policy", "transformer_based_wrap")
    plugin.setdefault("transformer_cls_names_to_wrap", ["Block"])
    mixed_precision = plugin.pop("mixed_precision", "no")
    parallelism_config = plugin.pop("parallelism_config", None)
    return AcceleratorState(
        mixed_precision=mixed_precision,
        fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, **plugin),
        parallelism_config=parallelism_config,
    )


def _prepared(state: Any, seed: int, tied: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Model and Adam built on the whole model, then sharded and switched, as the Accelerator does it."""
    from hasten.utils.fsdp2 import fsdp2_canonicalize_names, fsdp2_prepare_model, fsdp2_switch_optimizer_parameters

    torch.manual_seed(seed)
    model = Net(tied)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    before = fsdp2_canonicalize_names(dict(model.named_parameters()))
    model = fsdp2_prepare_model(state, model)
    after = fsdp2_canonicalize_names(dict(model.named_parameters()))
    fsdp2_switch_optimizer_parameters(optimizer, {before[name]: after[name] for name in before})
    return model, optimizer


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    ids, targets = _batch()
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    logits = model(ids[rows])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return model(ids).detach()


def _full(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    result: dict[str, Any] = {"model": {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}}
    if optimizer is not None:
        result["optimizer"] = get_optimizer_state_dict(model, optimizer, options=options)
    return result


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _reference() -> torch.Tensor:
    """One step of the same training on one process, on the whole batch."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    ids, targets = _batch()
    nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten()).backward()
    optimizer.step()
    return model(ids).detach()


# --- preparing ---------------------------------------------------------------------------------------


def _groups(model: nn.Module) -> list[list[str]]:
    """The FSDP groups of ``model``: the names of the modules that share each one."""
    from torch.distributed.fsdp import FSDPModule

    by_group: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            by_group.setdefault(id(module._get_fsdp_state()._fsdp_param_group), []).append(name)
    return sorted(sorted(names) for names in by_group.values())


def _layout_and_training() -> dict[str, Any]:
    state = _state()
    model, optimizer = _prepared(state, seed=0)
    groups = _groups(model)
    output = _train_step(model, optimizer)
    tied_model, _ = _prepared(state, seed=0, tied=True)
    tied_groups = _groups(tied_model)
    return {
        "groups": groups,
        "tied_groups": tied_groups,
        "output": output,
        "optimizer_holds_shards": all(type(p).__name__ == "DTensor" for p in optimizer.param_groups[0]["params"]),
    }


@pytest.mark.parametrize("pool", ["ranks2", "ranks4"])
def test_prepare_model_shards_blocks_embeddings_tail_and_trains_like_one_process(
    pool: str, request: pytest.FixtureRequest
) -> None:
    ranks: RankPool = request.getfixturevalue(pool)
    results = ranks.run(_layout_and_training)
    reference = _reference()
    for result in results:
        # the blocks (by class name), the input embedding, the tail (norm + head, one group) and the root
        assert result["groups"] == [[""], ["blocks.0"], ["blocks.1"], ["embed"], ["head", "norm"]]
        # tied: embedding and head share one weight, so the embedding joins the tail group
        assert result["tied_groups"] == [[""], ["blocks.0"], ["blocks.1"], ["embed", "head", "norm"]]
        assert result["optimizer_holds_shards"]
        assert torch.allclose(result["output"], reference, atol=1e-5)


def _ram_efficient_loading() -> dict[str, Any]:
    rank = dist.get_rank()
    state = _state(cpu_ram_efficient_loading=True, mixed_precision="bf16")
    from hasten.utils.fsdp2 import fsdp2_prepare_model

    torch.manual_seed(0 if rank == 0 else 100 + rank)  # only rank 0 has the real weights
    model = Net(tied=True).to(torch.bfloat16)
    model.scale.fill_(0.25)  # a non-persistent buffer: not in any state dict
    expected = {k: v.float() for k, v in model.state_dict().items()} if rank == 0 else None
    model = fsdp2_prepare_model(state, model)
    return {
        "full": _full(model)["model"],
        "expected": expected,
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "scale": float(model.scale),
        "tied": model.head.weight is model.embed.weight,
    }


def test_cpu_ram_efficient_loading_takes_rank_0_weights_keeps_buffers_and_ties(ranks2: RankPool) -> None:
    results = ranks2.run(_ram_efficient_loading)
    expected = results[0]["expected"]
    for result in results:
        assert _same(result["full"], expected)  # rank 1's own (different) weights were replaced
        assert result["dtypes"] == ["torch.float32"]  # trainable weights upcast under mixed precision
        assert result["scale"] == 0.25 and result["tied"]


def _hsdp_over_a_parallelism_config() -> dict[str, Any]:
    from hasten.parallelism_config import ParallelismConfig

    config = ParallelismConfig(dp_replicate_size=2, dp_shard_size=2)
    config.get_device_mesh("cpu")
    state = _state(parallelism_config=config)
    model, optimizer = _prepared(state, seed=0)
    weight = model.blocks[0].up.weight
    return {
        "placements": [str(p) for p in weight.placements],
        "mesh": tuple(weight.device_mesh.mesh_dim_names),
        "output": _train_step(model, optimizer),
    }


def test_prepare_model_shards_over_the_parallelism_config_mesh(ranks4: RankPool) -> None:
    results = ranks4.run(_hsdp_over_a_parallelism_config)
    reference = _reference()
    for result in results:
        assert result["mesh"] == ("dp_replicate", "dp_shard")
        assert result["placements"] == ["R", "S(0)"]  # replicated across, sharded within
        assert torch.allclose(result["output"], reference, atol=1e-5)


def _activation_checkpointing(offload: bool) -> dict[str, Any]:
    from hasten.utils.fsdp2 import fsdp2_apply_ac, fsdp2_canonicalize_names, fsdp2_prepare_model

    state = _state(activation_checkpointing=True, activation_checkpointing_offload=offload)
    torch.manual_seed(0)
    model = fsdp2_apply_ac(state, Net())
    wrappers = sorted(type(m).__name__ for m in model.blocks)
    names = sorted(fsdp2_canonicalize_names(dict(model.named_parameters())))
    model = fsdp2_prepare_model(state, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return {"wrappers": wrappers, "names": names, "output": _train_step(model, optimizer)}


@pytest.mark.parametrize("offload", [False, True])
def test_activation_checkpointing_wraps_the_blocks_and_changes_no_number(ranks2: RankPool, offload: bool) -> None:
    results = ranks2.run(_activation_checkpointing, offload)
    reference = _reference()
    plain = sorted(name for name, _ in Net().named_parameters())
    for result in results:
        assert result["wrappers"] == ["OffloadWrapper"] * 2 if offload else ["CheckpointWrapper"] * 2
        assert result["names"] == plain
        assert torch.allclose(result["output"], reference, atol=1e-5)


def _full_state_dict_missing_a_key() -> str:
    from hasten.utils.fsdp2 import fsdp2_load_full_state_dict

    state = _state()
    model, _ = _prepared(state, seed=0)
    full = {k: v for k, v in Net().state_dict().items() if k != "norm.bias"}
    try:
        fsdp2_load_full_state_dict(state, model, full)
    except KeyError as error:
        return str(error)
    return "no error"


def test_load_full_state_dict_missing_keys_fail_on_every_rank(ranks2: RankPool) -> None:
    for message in ranks2.run(_full_state_dict_missing_a_key):
        assert "lacks 1 of the model's keys: ['norm.bias']" in message


# --- saving and loading ------------------------------------------------------------------------------


def _round_trip(folder: str, kind: str, use_dcp: bool) -> dict[str, Any]:
    from hasten.utils import fsdp_checkpoint as ckpt

    state = _state(state_dict_type=kind)
    plugin = state.fsdp_plugin
    model, optimizer = _prepared(state, seed=0)
    _train_step(model, optimizer)
    saved = _full(model, optimizer)
    ckpt.save_fsdp_model(plugin, state, model, folder, use_dcp=use_dcp)
    ckpt.save_fsdp_optimizer(plugin, state, optimizer, model, folder, use_dcp=use_dcp)
    ckpt.save_fsdp_model(plugin, state, model, folder, use_dcp=use_dcp)  # overwriting is crash-safe too
    fresh, fresh_optimizer = _prepared(state, seed=1)
    result = ckpt.load_fsdp_model(plugin, state, fresh, folder, use_dcp=use_dcp)
    ckpt.load_fsdp_optimizer(plugin, state, fresh_optimizer, fresh, folder, use_dcp=use_dcp)
    loaded = _full(fresh, fresh_optimizer)
    return {
        "same": _same(saved, loaded),
        "next_step_same": torch.equal(_train_step(model, optimizer), _train_step(fresh, fresh_optimizer)),
        "missing": list(result.missing_keys),
        "saved": saved["model"],
        "files": sorted(os.listdir(folder)),
    }


@pytest.mark.parametrize("pool", ["ranks2", "ranks4"])
@pytest.mark.parametrize(
    ("kind", "use_dcp"),
    [("FULL_STATE_DICT", True), ("SHARDED_STATE_DICT", True), ("SHARDED_STATE_DICT", False)],
)
def test_save_then_load_is_bit_exact(
    pool: str, kind: str, use_dcp: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ranks: RankPool = request.getfixturevalue(pool)
    results = ranks.run(_round_trip, str(tmp_path), kind, use_dcp)
    for result in results:
        assert result["same"] and result["next_step_same"] and result["missing"] == []
    files = results[0]["files"]
    if kind == "FULL_STATE_DICT":
        assert files == ["optimizer.bin", "pytorch_model_fsdp.bin"]
        on_disk = torch.load(tmp_path / "pytorch_model_fsdp.bin", weights_only=True)
        assert _same(on_disk, results[0]["saved"])  # the whole model, gathered by rank 0
    elif use_dcp:
        assert files == ["optimizer_0", "pytorch_model_fsdp_0"]  # nothing partial left behind
    else:
        world = ranks.world_size
        expected = [f"optimizer_0_rank{r}.bin" for r in range(world)]
        assert files == sorted(expected + [f"pytorch_model_fsdp_0_rank{r}.bin" for r in range(world)])


class _AccelerateView:
    """What Accelerate's fsdp_utils read from its Accelerator, over hasten's state (for the differential test)."""

    def __init__(self, state: Any) -> None:
        self._state = state
        self.is_fsdp2 = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


def _across_libraries(folder: str, kind: str) -> dict[str, Any]:
    import accelerate.utils.fsdp_utils as theirs
    from accelerate.state import PartialState as AcceleratePartialState

    AcceleratePartialState(cpu=True)  # Accelerate's logger needs its state; it adopts the group hasten formed

    from hasten.utils import fsdp_checkpoint as ours

    state = _state(state_dict_type=kind)
    plugin = state.fsdp_plugin
    model, optimizer = _prepared(state, seed=0)
    _train_step(model, optimizer)
    saved = _full(model, optimizer)
    ours.save_fsdp_model(plugin, state, model, os.path.join(folder, "ours"))
    ours.save_fsdp_optimizer(plugin, state, optimizer, model, os.path.join(folder, "ours"))
    theirs.save_fsdp_model(plugin, _AccelerateView(state), model, os.path.join(folder, "theirs"))
    theirs.save_fsdp_optimizer(plugin, _AccelerateView(state), optimizer, model, os.path.join(folder, "theirs"))
    state.wait_for_everyone()
    loaded = {}
    for reader, source in (("ours", "theirs"), ("theirs", "ours")):
        fresh, fresh_optimizer = _prepared(state, seed=1)
        load_model, load_optimizer = (
            (ours.load_fsdp_model, ours.load_fsdp_optimizer)
            if reader == "ours"
            else (theirs.load_fsdp_model, theirs.load_fsdp_optimizer)
        )
        view = state if reader == "ours" else _AccelerateView(state)
        load_model(plugin, view, fresh, os.path.join(folder, source))
        load_optimizer(plugin, view, fresh_optimizer, fresh, os.path.join(folder, source))
        loaded[f"{reader} reads {source}"] = _same(saved, _full(fresh, fresh_optimizer))
    return loaded


@pytest.mark.parametrize("kind", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_checkpoints_are_read_by_accelerate_and_the_other_way_round(
    ranks2: RankPool, tmp_path: Path, kind: str
) -> None:
    pytest.importorskip("accelerate")
    for result in ranks2.run(_across_libraries, str(tmp_path), kind):
        assert result == {"ours reads theirs": True, "theirs reads ours": True}


def _save_sharded(folder: str) -> dict[str, torch.Tensor]:
    from hasten.utils.fsdp_checkpoint import save_fsdp_model, save_fsdp_optimizer

    state = _state(state_dict_type="SHARDED_STATE_DICT")
    model, optimizer = _prepared(state, seed=0)
    _train_step(model, optimizer)
    save_fsdp_model(state.fsdp_plugin, state, model, folder)
    save_fsdp_optimizer(state.fsdp_plugin, state, optimizer, model, folder)
    return _full(model)["model"]


def test_merge_fsdp_weights_gives_the_full_model_as_accelerate_does(ranks4: RankPool, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from hasten.utils.fsdp_utils import merge_fsdp_weights

    full = ranks4.run(_save_sharded, str(tmp_path / "ckpt"))[0]
    written = merge_fsdp_weights(str(tmp_path / "ckpt" / "pytorch_model_fsdp_0"), str(tmp_path / "ours"))
    assert written == tmp_path / "ours" / "model.safetensors"
    assert _same(load_file(written), full)
    accelerate = pytest.importorskip("accelerate.utils.fsdp_utils")
    accelerate.merge_fsdp_weights(str(tmp_path / "ckpt" / "pytorch_model_fsdp_0"), str(tmp_path / "theirs"))
    assert _same(load_file(tmp_path / "theirs" / "model.safetensors"), full)
    # the optimizer folder holds steps and nested state: .bin with dotted names, not safetensors
    with pytest.raises(ValueError, match=r"not tensors .*merge with safe_serialization=False"):
        merge_fsdp_weights(str(tmp_path / "ckpt" / "optimizer_0"), str(tmp_path / "optim"))
    merge_fsdp_weights(
        str(tmp_path / "ckpt" / "optimizer_0"), str(tmp_path / "optim"), safe_serialization=False, remove_checkpoint_dir=True
    )
    optim = torch.load(tmp_path / "optim" / "pytorch_model.bin", weights_only=True)
    assert optim["state.head.weight.exp_avg"].shape == (32, 8) and optim["param_groups.0.lr"] == 0.01
    assert not (tmp_path / "ckpt" / "optimizer_0").exists()


def _load_missing(folder: str, kind: str) -> str:
    from hasten.utils.fsdp_checkpoint import load_fsdp_model

    state = _state(state_dict_type=kind)
    model, _ = _prepared(state, seed=0)
    try:
        load_fsdp_model(state.fsdp_plugin, state, model, folder)
    except FileNotFoundError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("FULL_STATE_DICT", "pytorch_model_fsdp.bin does not exist (rank 0 reads it)"),
        ("SHARDED_STATE_DICT", "pytorch_model_fsdp_0 is not a DCP checkpoint (no .metadata file)"),
    ],
)
def test_loading_what_is_not_there_fails_on_every_rank(
    ranks2: RankPool, tmp_path: Path, kind: str, message: str
) -> None:
    for result in ranks2.run(_load_missing, str(tmp_path), kind):
        assert message in result


def _adapters(folder: str, kind: str) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from hasten.utils.fsdp2 import fsdp2_prepare_model
    from hasten.utils.fsdp_checkpoint import load_fsdp_model, save_fsdp_model

    state = _state(state_dict_type=kind)

    def lora(seed: int) -> nn.Module:
        torch.manual_seed(0)  # the same base weights
        base = Net()
        torch.manual_seed(seed)  # different adapters
        config = LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False)
        return fsdp2_prepare_model(state, get_peft_model(base, config))

    model = lora(1)
    save_fsdp_model(state.fsdp_plugin, state, model, folder, adapter_only=True)
    fresh = lora(2)
    load_fsdp_model(state.fsdp_plugin, state, fresh, folder, adapter_only=True)
    saved, loaded = _full(model)["model"], _full(fresh)["model"]
    files = sorted(os.listdir(folder))
    on_disk = sorted(torch.load(os.path.join(folder, files[0]), weights_only=True)) if kind == "FULL_STATE_DICT" else []
    return {"same": _same(saved, loaded), "files": files, "keys": on_disk}


@pytest.mark.parametrize("kind", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_adapter_only_saves_and_loads_the_peft_adapters(ranks2: RankPool, tmp_path: Path, kind: str) -> None:
    pytest.importorskip("peft")
    for result in ranks2.run(_adapters, str(tmp_path), kind):
        assert result["same"]  # the adapters came back; the base weights were equal already
        if kind == "FULL_STATE_DICT":
            assert result["files"] == ["pytorch_model_fsdp.bin"]
            assert result["keys"] and all("lora_" in key for key in result["keys"])  # adapters only
        else:
            assert result["files"] == ["pytorch_model_fsdp_0"]
