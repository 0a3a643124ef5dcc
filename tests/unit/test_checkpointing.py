"""save_state / load_state on one process: the files, round trips, naming, total_limit, hooks,
registered objects, the public functions, and every error (raised before anything changes)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from hasten import Accelerator
from hasten.checkpointing import (
    load_accelerator_state,
    load_custom_state,
    save_accelerator_state,
    save_custom_state,
)
from hasten.utils import ProjectConfiguration
from hasten.utils.errors import CheckpointError


class Counter:
    """A registered object: anything with state_dict / load_state_dict."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


class Opaque:
    """Not plain data: only full unpickling restores it."""

    def __init__(self) -> None:
        self.payload = [1, 2]


class OpaqueState(Counter):
    def state_dict(self) -> dict[str, Any]:
        return {"value": Opaque()}


def _setup(
    project: Path | None = None, limit: int | None = None, width: int = 4, **kwargs: Any
) -> tuple[Accelerator, nn.Module, Any, Any, Any]:
    config = ProjectConfiguration(
        project_dir=None if project is None else str(project),
        automatic_checkpoint_naming=project is not None,
        total_limit=limit,
    )
    accelerator = Accelerator(project_config=config, **kwargs)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
    data = torch.utils.data.TensorDataset(torch.randn(24, width))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    return accelerator, *accelerator.prepare(model, optimizer, scheduler, loader)  # type: ignore[return-value]


def _train(
    accelerator: Accelerator, model: nn.Module, optimizer: Any, scheduler: Any, batches: list[Any]
) -> list[float]:
    losses = []
    for (x,) in batches:
        with accelerator.accumulate(model):
            loss = model(x).pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_round_trip_restores_everything_and_the_run_continues_exactly(tmp_path: Path) -> None:
    accelerator, model, optimizer, scheduler, loader = _setup(gradient_accumulation_steps=2)
    counter = Counter(5)
    accelerator.register_for_checkpointing(counter)
    iterator = iter(loader)
    _train(accelerator, model, optimizer, scheduler, [next(iterator) for _ in range(3)])
    random.random(), np.random.rand()
    folder = accelerator.save_state(tmp_path / "state")
    assert sorted(os.listdir(folder)) == [
        "custom_checkpoint_0.pkl",
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "scheduler.bin",
    ]
    expected = (
        random.random(),
        np.random.rand(),
        _train(accelerator, model, optimizer, scheduler, list(iterator)),
    )
    saved_step = 3

    accelerator2, model2, optimizer2, scheduler2, loader2 = _setup(gradient_accumulation_steps=2)
    counter2 = Counter()
    accelerator2.register_for_checkpointing(counter2)
    torch.manual_seed(99)
    accelerator2.load_state(tmp_path / "state")
    assert counter2.value == 5 and accelerator2.step == saved_step
    rest = accelerator2.skip_first_batches(loader2, loader2.state_dict()["batches_yielded"])
    got = (
        random.random(),
        np.random.rand(),
        _train(accelerator2, model2, optimizer2, scheduler2, list(rest)),
    )
    assert got == expected


def test_automatic_naming_total_limit_and_numbering_after_resume(tmp_path: Path) -> None:
    accelerator, *_ = _setup(tmp_path, limit=2)
    names = [Path(accelerator.save_state()).name for _ in range(4)]
    assert names == ["checkpoint_0", "checkpoint_1", "checkpoint_2", "checkpoint_3"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint_2", "checkpoint_3"]

    resumed, *_ = _setup(tmp_path, limit=2)
    (tmp_path / "checkpoints" / ".checkpoint_4.incomplete").mkdir()  # a crash left a staging folder
    resumed.load_state()  # the latest complete one: checkpoint_3
    assert resumed.save_iteration == 4
    assert Path(resumed.save_state()).name == "checkpoint_4"  # numbering continues
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint_3", "checkpoint_4"]

    fresh, *_ = _setup(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint_0 already exists.*load_state\(\) first"):
        (tmp_path / "checkpoints" / "checkpoint_0").mkdir()
        fresh.save_state()


def test_saving_into_an_existing_folder_keeps_other_files(tmp_path: Path) -> None:
    accelerator, *_ = _setup()
    (tmp_path / "notes.txt").write_text("mine")
    accelerator.save_state(tmp_path)
    accelerator.save_state(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]
    assert "model.safetensors" in os.listdir(tmp_path)


def test_state_hooks_see_the_models_and_can_take_one_over(tmp_path: Path) -> None:
    accelerator, model, *_ = _setup()
    seen: list[Any] = []

    def on_save(models: list[nn.Module], weights: list[dict[str, Any]], folder: str) -> None:
        seen.append(("save", models[0] is model, sorted(weights[0])))
        Path(folder, "extra.txt").write_text("written by the hook")  # part of the checkpoint

    def on_load(models: list[nn.Module], folder: str) -> None:
        seen.append(("load", Path(folder, "extra.txt").read_text()))
        models.clear()  # the hook loads the model itself: load_state must not

    handle = accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)
    accelerator.save_state(tmp_path / "a")
    os.remove(tmp_path / "a" / "model.safetensors")  # not needed: the hook took the model over
    accelerator.load_state(tmp_path / "a")
    assert seen == [
        ("save", True, ["0.bias", "0.weight", "2.bias", "2.weight"]),
        ("load", "written by the hook"),
    ]
    handle.remove()
    accelerator.save_state(tmp_path / "b")
    assert len(seen) == 2


def test_public_functions_round_trip(tmp_path: Path) -> None:
    _, model, optimizer, scheduler, loader = _setup()
    torch.manual_seed(3)
    save_accelerator_state(tmp_path, [model.state_dict()], [optimizer], [scheduler], [loader], 0, step=7)
    save_custom_state(Counter(9), tmp_path, index=2)
    draw = torch.rand(3)
    with torch.no_grad():
        model[0].weight.zero_()
    assert load_accelerator_state(tmp_path, [model], [optimizer], [scheduler], [loader], 0) == {"step": 7}
    assert torch.equal(torch.rand(3), draw) and model[0].weight.abs().sum() > 0
    counter = Counter()
    load_custom_state(counter, tmp_path, index=2)
    assert counter.value == 9


def test_register_for_checkpointing_refuses_objects_without_state_methods() -> None:
    accelerator, *_ = _setup()
    with pytest.raises(ValueError, match=r"argument 1: object"):
        accelerator.register_for_checkpointing(Counter(), object())


# --- errors: named, and raised before anything changes ----------------------------------------


def _saved(tmp_path: Path, **kwargs: Any) -> tuple[Accelerator, nn.Module, Path]:
    accelerator, model, *_ = _setup(**kwargs)
    folder = Path(accelerator.save_state(tmp_path / "state"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # now different from the checkpoint
    return accelerator, model, folder


def _unchanged(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda f: os.remove(f / "random_states_0.pkl"),
            r"random_states_0.pkl is missing.*RNG states of process 0",
        ),
        (lambda f: os.remove(f / "model.safetensors"), r"model.safetensors is missing.*Sequential"),
        (
            lambda f: (f / "optimizer.bin").write_bytes((f / "optimizer.bin").read_bytes()[:200]),
            r"optimizer.bin \(state of optimizer 0\) is truncated or corrupt",
        ),
        (
            lambda f: (f / "scheduler.bin").write_bytes((f / "scheduler.bin").read_bytes()[:100]),
            r"scheduler.bin \(state of scheduler 0\) is truncated or corrupt",
        ),
        (
            lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-10]),
            r"model.safetensors",
        ),
    ],
)
def test_a_missing_or_damaged_file_is_named_and_nothing_changes(
    tmp_path: Path, damage: Any, message: str
) -> None:
    accelerator, model, folder = _saved(tmp_path)
    damage(folder)
    before, rng = _unchanged(model), torch.get_rng_state()
    with pytest.raises(CheckpointError, match=message):
        accelerator.load_state(folder)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_model_of_other_shapes_is_refused_naming_the_file(tmp_path: Path) -> None:
    _, _, folder = _saved(tmp_path)
    other, model, *_ = _setup(width=6)
    before = _unchanged(model)
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: .*0.weight: checkpoint \[8, 4\].*model \[8, 6\]"
    ):
        other.load_state(folder)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_an_optimizer_of_other_groups_is_refused(tmp_path: Path) -> None:
    _, _, folder = _saved(tmp_path)
    accelerator = Accelerator()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 4)), batch_size=4)
    accelerator.prepare(model, optimizer, scheduler, loader)
    with pytest.raises(CheckpointError, match=r"parameter groups of sizes \[4\].*has \[2, 2\]"):
        accelerator.load_state(folder)
    torch.save([1, 2], folder / "optimizer.bin")
    with pytest.raises(CheckpointError, match=r"does not hold an optimizer state dict"):
        accelerator.load_state(folder)


def test_registered_objects_and_loaders_must_match(tmp_path: Path) -> None:
    accelerator, _, folder = _saved(tmp_path)
    accelerator.register_for_checkpointing(Counter())
    with pytest.raises(
        CheckpointError, match=r"holds 0 states of registered objects \(\[\]\), but 1 objects"
    ):
        accelerator.load_state(folder)
    other, *_ = _setup()
    other.prepare(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4))))
    with pytest.raises(CheckpointError, match=r"states of 1 data loaders, but 2 are prepared"):
        other.load_state(folder)


def test_an_rng_file_without_the_streams_is_refused(tmp_path: Path) -> None:
    accelerator, _, folder = _saved(tmp_path)
    torch.save({"step": 0}, folder / "random_states_0.pkl")
    with pytest.raises(CheckpointError, match=r"holds no \['random_state'.*not an RNG state file"):
        accelerator.load_state(folder)


def test_pickled_objects_need_the_opt_in(tmp_path: Path) -> None:
    accelerator, *_ = _setup()
    accelerator.register_for_checkpointing(OpaqueState())
    folder = Path(accelerator.save_state(tmp_path / "s"))
    target = OpaqueState()
    accelerator._custom_objects[:] = [target]
    with pytest.raises(
        CheckpointError, match=r'hasten does not unpickle.*load_kwargs=\{"weights_only": False\}'
    ):
        accelerator.load_state(folder)
    with pytest.raises(CheckpointError, match=r"holds pickled objects beyond tensors"):
        load_custom_state(target, folder)
    accelerator.load_state(folder, load_kwargs={"weights_only": False})
    assert isinstance(target.value, Opaque)
    (folder / "scheduler.bin").write_bytes(b"\x80\x04garbage")
    with pytest.raises(
        CheckpointError, match=r"scheduler.bin \(state of scheduler 0\) is not a readable torch file"
    ):
        accelerator.load_state(folder, load_kwargs={"weights_only": False})


def test_argument_errors(tmp_path: Path) -> None:
    accelerator, *_ = _setup()
    with pytest.raises(CheckpointError, match=r"save_state\(\) needs output_dir"):
        accelerator.save_state()
    with pytest.raises(CheckpointError, match=r"load_state\(\) needs input_dir"):
        accelerator.load_state()
    with pytest.raises(CheckpointError, match=r"input_dir='.*nowhere' is not a folder"):
        accelerator.load_state(tmp_path / "nowhere")
    folder = accelerator.save_state(tmp_path / "s")
    with pytest.raises(TypeError, match=r"map_location='gpu' must be None, 'cpu' or 'on_device'"):
        accelerator.load_state(folder, map_location="gpu")
    with pytest.raises(TypeError, match=r"unknown keyword arguments \['assign_all'\]"):
        accelerator.load_state(folder, assign_all=True)
    accelerator.load_state(folder, map_location="on_device", strict=True)
    empty, *_ = _setup(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"holds no complete checkpoint_<i> folder"):
        empty.load_state()
    no_dir = Accelerator(project_config=ProjectConfiguration(automatic_checkpoint_naming=True))
    with pytest.raises(CheckpointError, match=r"needs a project_dir"):
        no_dir.save_state()


def test_pending_gradients_must_match_the_models(tmp_path: Path) -> None:
    accelerator, model, *_ = _setup(gradient_accumulation_steps=2)
    second = accelerator.prepare(nn.Linear(2, 2))
    with accelerator.accumulate(model, second):  # one batch of two: gradients pending
        accelerator.backward(model(torch.ones(1, 4)).sum() + second(torch.ones(1, 2)).sum())
    folder = accelerator.save_state(tmp_path / "s")
    other, *_ = _setup(gradient_accumulation_steps=2)
    with pytest.raises(CheckpointError, match=r"pending gradients of 2 models, but 1 are prepared"):
        other.load_state(folder)


def test_numbering_starts_at_the_configured_iteration(tmp_path: Path) -> None:
    accelerator = Accelerator(
        project_config=ProjectConfiguration(
            project_dir=str(tmp_path), automatic_checkpoint_naming=True, iteration=5, save_on_each_node=True
        )
    )
    assert Path(accelerator.save_state()).name == "checkpoint_5"
    assert accelerator.save_iteration == 6


def test_grad_scaler_state_round_trips(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    save_accelerator_state(tmp_path, [], [], [], [], 0, step=0, scaler=scaler)
    assert (tmp_path / "scaler.pt").is_file()
    restored = torch.amp.GradScaler("cpu", init_scale=2.0)
    load_accelerator_state(tmp_path, [], [], [], [], 0, scaler=restored)
    assert restored.get_scale() == 1024.0
    os.remove(tmp_path / "scaler.pt")
    with pytest.raises(
        CheckpointError, match=r"scaler.pt is missing: the checkpoint has no gradient scaler state"
    ):
        load_accelerator_state(tmp_path, [], [], [], [], 0, scaler=restored)


def test_a_stateful_loader_continues_where_it_was(tmp_path: Path) -> None:
    from hasten.utils import DataLoaderConfiguration

    def prepared() -> tuple[Accelerator, Any]:
        accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
        data = torch.utils.data.TensorDataset(torch.arange(20.0))
        return accelerator, accelerator.prepare(torch.utils.data.DataLoader(data, batch_size=2, shuffle=True))

    torch.manual_seed(0)
    accelerator, loader = prepared()
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    accelerator.save_state(tmp_path / "s")
    rest = [batch[0].tolist() for batch in iterator]
    assert (tmp_path / "s" / "dl_state_dict.bin").is_file()  # Accelerate's file for torchdata loaders
    torch.manual_seed(1)
    accelerator, loader = prepared()
    accelerator.load_state(tmp_path / "s")
    assert [batch[0].tolist() for batch in loader] == rest


def _optimizer_state(optimizer: Any) -> dict[str, Any]:
    state = optimizer.state_dict()["state"]
    return {key: {name: value.clone() for name, value in values.items()} for key, values in state.items()}


def _same_state(got: dict[str, Any], expected: dict[str, Any]) -> bool:
    return got.keys() == expected.keys() and all(
        values.keys() == expected[key].keys()
        and all(torch.equal(value, expected[key][name]) for name, value in values.items())
        for key, values in got.items()
    )


def _zero_in_place(path: Path) -> None:
    """Overwrite the file's bytes without replacing it: anything still viewing it would change."""
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.write(bytes(size))


def test_the_optimizer_state_is_loaded_into_its_own_tensors_and_views_no_file(tmp_path: Path) -> None:
    accelerator, model, optimizer, scheduler, loader = _setup()
    batches = list(loader)
    _train(accelerator, model, optimizer, scheduler, batches[:2])
    folder = Path(accelerator.save_state(tmp_path / "state"))
    expected = _optimizer_state(optimizer)
    _train(accelerator, model, optimizer, scheduler, batches[2:4])
    held = {id(value) for values in optimizer.state.values() for value in values.values()}
    accelerator.load_state(folder)
    # The optimizer's own tensors (the ones its steps update in place) now hold the saved values.
    assert {id(value) for values in optimizer.state.values() for value in values.values()} == held
    _zero_in_place(folder / "optimizer.bin")
    assert _same_state(_optimizer_state(optimizer), expected)
    _train(accelerator, model, optimizer, scheduler, batches[4:])  # and the run goes on


def test_a_fresh_optimizer_gets_the_saved_state_in_memory_of_its_own(tmp_path: Path) -> None:
    accelerator, model, optimizer, scheduler, loader = _setup()
    _train(accelerator, model, optimizer, scheduler, list(loader)[:2])
    folder = Path(accelerator.save_state(tmp_path / "state"))
    expected = _optimizer_state(optimizer)
    accelerator2, _, optimizer2, *_ = _setup()
    assert not optimizer2.state  # no step yet: nothing to load into
    accelerator2.load_state(folder)
    _zero_in_place(folder / "optimizer.bin")
    assert _same_state(_optimizer_state(optimizer2), expected)


def test_an_optimizer_file_in_the_legacy_format_is_read_whole(tmp_path: Path) -> None:
    from hasten._checkpointing.files import mappable

    accelerator, model, optimizer, scheduler, loader = _setup()
    _train(accelerator, model, optimizer, scheduler, list(loader)[:2])
    folder = Path(accelerator.save_state(tmp_path / "state"))
    path = folder / "optimizer.bin"
    assert mappable(path) and not mappable(path, {"mmap": False})
    expected = _optimizer_state(optimizer)
    torch.save(optimizer.state_dict(), path, _use_new_zipfile_serialization=False)
    assert not mappable(path)
    accelerator2, _, optimizer2, *_ = _setup()
    accelerator2.load_state(folder)
    assert _same_state(_optimizer_state(optimizer2), expected)
