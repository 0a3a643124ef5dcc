"""The Accelerator's training loop on one process: prepare, backward, accumulation, precision, compile,
clipping, and the equivalence with a loop written by hand."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional

from hasten import Accelerator, AcceleratorState, GradientState
from hasten.optimizer import AcceleratedOptimizer
from hasten.scheduler import AcceleratedScheduler
from hasten.utils import AutocastKwargs, GradientAccumulationPlugin, TorchDynamoPlugin
from hasten.utils.errors import ConfigurationError
from tests.training import library_run, raw_run, same_run


def _reset() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _parts() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_one_process_matches_the_loop_written_by_hand(steps: int, precision: str) -> None:
    raw = raw_run(steps, precision)
    ours = library_run("hasten", steps, precision)
    assert same_run(raw, ours), (raw[0][:6], ours[0][:6])  # bf16 too: the same autocast, the same casts


def test_prepare_keeps_order_and_wraps_each_kind() -> None:
    accelerator = Accelerator()
    model, optimizer, scheduler = _parts()
    prepared = accelerator.prepare(scheduler, optimizer, model)  # schedulers come last whatever the order
    assert isinstance(prepared[0], AcceleratedScheduler) and prepared[0].scheduler is scheduler
    assert isinstance(prepared[1], AcceleratedOptimizer) and prepared[1].optimizer is optimizer
    assert prepared[2] is model and model._is_accelerate_prepared
    assert accelerator._models == [model] and accelerator._optimizers == [prepared[1]]
    assert accelerator._schedulers == [prepared[0]] and prepared[0].optimizers == [prepared[1]]
    assert accelerator.prepare(model) is model  # preparing a prepared object returns it
    assert accelerator.prepare(prepared[1]) is prepared[1] and accelerator.prepare(prepared[0]) is prepared[0]
    assert len(accelerator._models) == len(accelerator._optimizers) == len(accelerator._schedulers) == 1
    assert accelerator.prepare() == ()


def test_prepare_refuses_what_it_does_not_know() -> None:
    accelerator = Accelerator()
    with pytest.raises(
        TypeError, match=r"argument 1 is a builtins.dict, which the Accelerator does not know"
    ):
        accelerator.prepare(nn.Linear(2, 2), {"lr": 0.1})
    assert accelerator._models == []  # nothing was prepared
    with pytest.raises(TypeError, match=r"prepare_model takes a torch\.nn\.Module, got str"):
        accelerator.prepare_model("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"prepare_optimizer takes a torch\.optim\.Optimizer, got list"):
        accelerator.prepare_optimizer([])  # type: ignore[arg-type]


def test_device_placement_per_object() -> None:
    accelerator = Accelerator()
    model, optimizer, _ = _parts()
    model, optimizer = accelerator.prepare(model, optimizer, device_placement=[False, True])
    assert isinstance(optimizer, AcceleratedOptimizer) and optimizer.device_placement
    with pytest.raises(ConfigurationError, match="must be a list of 2 bools"):
        accelerator.prepare(nn.Linear(2, 2), nn.Linear(2, 2), device_placement=[True])


def test_optimizer_state_follows_the_model_to_the_device() -> None:
    model = nn.Linear(3, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    accelerator = Accelerator()
    wrapped = accelerator.prepare(optimizer)
    assert all(v.device.type == "cpu" for s in wrapped.state.values() for v in s.values())
    assert wrapped.state_dict()["state"][0]["step"].item() == 1.0


def test_prepared_twice_is_refused() -> None:
    accelerator = Accelerator(dynamo_backend="eager")
    model, optimizer, scheduler = _parts()
    compiled, _ = accelerator.prepare(model, optimizer)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ConfigurationError, match="Sequential was prepared already, as a OptimizedModule"):
        accelerator.prepare(model)
    with pytest.raises(ConfigurationError, match="SGD was prepared already"):
        accelerator.prepare(optimizer)
    accelerator.prepare(scheduler)
    with pytest.raises(ConfigurationError, match="StepLR was prepared already"):
        accelerator.prepare_scheduler(scheduler)


def test_a_scheduler_needs_its_optimizer_prepared() -> None:
    accelerator = Accelerator()
    _, optimizer, scheduler = _parts()
    with pytest.raises(ConfigurationError, match="StepLR steps a SGD that this Accelerator has not prepared"):
        accelerator.prepare(scheduler)
    prepared = accelerator.prepare(optimizer)
    other = torch.optim.lr_scheduler.LambdaLR(prepared, lambda step: 1.0)  # built on the prepared one
    assert accelerator.prepare(other).optimizers == [prepared]


def test_backward_refuses_a_loss_that_is_not_a_scalar() -> None:
    accelerator = Accelerator()
    model = accelerator.prepare(nn.Linear(3, 2))
    out = model(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"the loss has shape \(4, 2\), not a single value"):
        accelerator.backward(out)
    accelerator.backward(out, gradient=torch.ones_like(out))
    assert model.weight.grad is not None and model.weight.grad[0, 0].item() == 4.0
    with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
        accelerator.backward(out.sum() * 0 + out.sum())  # a torch error that is not about the shape


def test_accumulate_counts_batches_and_skips_steps() -> None:
    accelerator = Accelerator(gradient_accumulation_steps=3)
    model, optimizer, scheduler = _parts()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    pattern, lrs = [], []
    for _ in range(7):
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(2, 4)).sum())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            pattern.append(accelerator.sync_gradients)
            lrs.append(scheduler.get_last_lr()[0])
    assert pattern == [False, False, True, False, False, True, False]
    assert accelerator.step == 7
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001])
    assert model[0].weight.grad is not None  # the 7th batch accumulated, not yet zeroed


def test_no_sync_and_trigger_on_one_process_change_nothing() -> None:
    accelerator = Accelerator()
    model = accelerator.prepare(nn.Linear(2, 2))
    with accelerator.no_sync(model), accelerator.trigger_sync_in_backward(model):
        accelerator.backward(model(torch.ones(1, 2)).sum())
    assert model.weight.grad is not None


def test_bf16_casts_inside_the_forward_and_returns_float32() -> None:
    accelerator = Accelerator(mixed_precision="bf16")
    model = accelerator.prepare(nn.Linear(4, 4))
    out = model(torch.ones(2, 4))
    assert out.dtype == torch.float32
    with accelerator.autocast():
        assert (torch.ones(2, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with accelerator.autocast(AutocastKwargs(enabled=False)):
        assert (torch.ones(2, 4) @ torch.ones(4, 4)).dtype == torch.float32
    plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    assert plain is model and "_original_forward" not in model.__dict__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain(torch.ones(2, 4)).dtype == torch.bfloat16  # the fp32 wrapper is gone


def test_without_mixed_precision_autocast_does_nothing() -> None:
    accelerator = Accelerator()
    with accelerator.autocast():
        assert (torch.ones(2, 4) @ torch.ones(4, 4)).dtype == torch.float32
    model = accelerator.prepare(nn.Linear(4, 4))
    assert "forward" not in model.__dict__


def test_clipping_matches_torch() -> None:
    accelerator = Accelerator()
    model = accelerator.prepare(nn.Linear(4, 4))
    twin = nn.Linear(4, 4)
    twin.load_state_dict(model.state_dict())
    for net in (model, twin):
        (net(torch.ones(3, 4)) * 10).sum().backward()
    norm = accelerator.clip_grad_norm_(model.parameters(), 0.5)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5))
    accelerator.clip_grad_value_(model.parameters(), 0.01)
    assert model.weight.grad.abs().max().item() <= 0.01
    accelerator.unscale_gradients()  # nothing to unscale without fp16: a no-op
    accelerator.unscale_gradients(optimizer=[])


def test_compile_through_the_dynamo_plugin_and_unwrap() -> None:
    accelerator = Accelerator(dynamo_plugin=TorchDynamoPlugin(backend="eager"))
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    compiled = accelerator.prepare(model)
    assert compiled._orig_mod is model
    assert torch.equal(compiled(torch.ones(1, 4)), model(torch.ones(1, 4)))
    assert accelerator.unwrap_model(compiled) is compiled
    assert accelerator.unwrap_model(compiled, keep_torch_compile=False) is model
    assert list(accelerator.get_state_dict(compiled)) == ["0.weight", "0.bias"]  # no `_orig_mod.` prefix
    assert next(iter(accelerator.get_state_dict(compiled, unwrap=False))) == "_orig_mod.0.weight"


def test_regional_compilation_compiles_each_repeated_block() -> None:
    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    accelerator = Accelerator(dynamo_plugin=TorchDynamoPlugin(backend="eager", use_regional_compilation=True))
    model = Blocks()
    prepared = accelerator.prepare(model)
    assert prepared is model and all(layer._compiled_call_impl is not None for layer in model.layers)
    assert prepared(torch.ones(2, 4)).shape == (2, 4)


def test_free_memory_releases_the_prepared_objects() -> None:
    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=2)
    model, optimizer, scheduler = _parts()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    with accelerator.accumulate(model):
        accelerator.backward(model(torch.ones(1, 4)).sum())
    alive = [weakref.ref(model), weakref.ref(optimizer), weakref.ref(scheduler)]
    model, optimizer, scheduler = accelerator.free_memory(model, optimizer, scheduler)
    assert [ref() for ref in alive] == [None, None, None]
    assert accelerator._models == accelerator._optimizers == accelerator._schedulers == []
    assert accelerator.step == 0
    other = accelerator.prepare(nn.Linear(2, 2))
    ref = weakref.ref(other)
    del other
    accelerator.clear()
    gc.collect()
    assert ref() is None


def test_accumulation_plugin_syncs_each_batch_only_with_several_processes() -> None:
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=2, sync_each_batch=True)
    )
    model = accelerator.prepare(nn.Linear(2, 2))
    with accelerator.accumulate(model):
        assert not accelerator.sync_gradients


def test_trigger_on_one_process() -> None:
    accelerator = Accelerator()
    assert not accelerator.check_trigger()
    accelerator.set_trigger()
    assert accelerator.check_trigger()
    assert not accelerator.check_trigger()  # lowered again


def test_process_helpers_on_one_process(capsys: pytest.CaptureFixture[str]) -> None:
    accelerator = Accelerator()
    accelerator.print("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"
    ran = []
    accelerator.on_main_process(lambda: ran.append("main"))()
    accelerator.on_local_main_process(lambda: ran.append("local"))()
    accelerator.on_last_process(lambda: ran.append("last"))()
    accelerator.on_process(lambda: ran.append("zero"), process_index=0)()
    accelerator.on_local_process(local_process_index=0)(lambda: ran.append("local zero"))()
    assert ran == ["main", "local", "last", "zero", "local zero"]
    with accelerator.split_between_processes([1, 2, 3]) as share:
        assert share == [1, 2, 3]
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        accelerator.wait_for_everyone()
    with accelerator.join_uneven_inputs([nn.Linear(1, 1)], even_batches=False):
        pass


def test_collectives_on_one_process() -> None:
    accelerator = Accelerator()
    data = {"x": torch.arange(3)}
    assert accelerator.gather(data) is data
    assert accelerator.gather_for_metrics(data) is data
    assert accelerator.gather_for_metrics(["a", "b"]) == ["a", "b"]
    assert accelerator.gather_for_metrics(torch.ones(2), use_gather_object=True).shape == (2,)
    assert torch.equal(accelerator.reduce(torch.ones(2)), torch.ones(2))
    assert torch.equal(accelerator.reduce(torch.ones(2), "mean", scale=2.0), torch.full((2,), 2.0))
    assert accelerator.pad_across_processes(data) is data


def test_verify_device_map() -> None:
    accelerator = Accelerator()
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert not accelerator.verify_device_map(model)
    model.hf_device_map = {"0": "cpu", "1": "disk"}
    assert accelerator.verify_device_map(model)
    assert accelerator.prepare(model) is model  # one process: a dispatched model is left where it is


def test_profile_writes_a_trace(tmp_path: object) -> None:
    from hasten.utils import ProfileKwargs

    accelerator = Accelerator(kwargs_handlers=[ProfileKwargs(output_trace_dir=str(tmp_path))])
    with accelerator.profile() as profiler:
        torch.ones(8, 8) @ torch.ones(8, 8)
    assert profiler.key_averages() is not None
    assert (tmp_path / "profile_0.json").stat().st_size > 0  # type: ignore[operator]
    with accelerator.profile(ProfileKwargs()) as profiler:  # no folder: nothing written
        torch.ones(2)
    assert len(list(tmp_path.iterdir())) == 1  # type: ignore[attr-defined]


def test_log_with_names_the_trackers(tmp_path: object) -> None:
    assert Accelerator(log_with="tensorboard", project_dir=str(tmp_path)).log_with == ["tensorboard"]
    assert Accelerator().log_with == []
    with pytest.raises(ValueError, match="tensorboard"):  # it writes to a folder: it needs logging_dir
        Accelerator(log_with="tensorboard")


def test_gradients_of_an_accumulated_step_equal_one_big_batch() -> None:
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = accelerator.prepare(nn.Linear(3, 1))
    twin = nn.Linear(3, 1)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 3)
    for half in (x[:2], x[2:]):
        with accelerator.accumulate(model):
            accelerator.backward(functional.mse_loss(model(half), torch.zeros(2, 1)))
    functional.mse_loss(twin(x), torch.zeros(4, 1)).backward()
    assert torch.allclose(model.weight.grad, twin.weight.grad, atol=1e-6)


def test_with_statement_exceptions_leave_no_sync_state_behind() -> None:
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = accelerator.prepare(nn.Linear(2, 2))
    with contextlib.suppress(KeyError), accelerator.accumulate(model):
        raise KeyError("inside")
    with accelerator.accumulate(model):
        assert accelerator.sync_gradients


def test_accumulation_syncs_at_the_end_of_a_prepared_loader() -> None:
    accelerator = Accelerator(gradient_accumulation_steps=4)
    model, optimizer, _ = _parts()
    data = torch.utils.data.TensorDataset(torch.ones(10, 4))
    loader, model, optimizer = accelerator.prepare(
        torch.utils.data.DataLoader(data, batch_size=1), model, optimizer
    )
    assert accelerator._dataloaders == [loader] and accelerator.prepare(loader) is loader
    pattern = []
    for _ in range(2):
        for (x,) in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(x).sum())
                pattern.append(accelerator.sync_gradients)
    assert pattern == [False, False, False, True, False, False, False, True, False, True] * 2
    assert [int(x.sum()) for (x,) in accelerator.skip_first_batches(loader, 8)] == [4, 4]


def test_equivalence_with_a_prepared_loader_on_one_process() -> None:
    assert same_run(raw_run(4, whole_batches=True), library_run("hasten", 4, prepare_loader=True))
