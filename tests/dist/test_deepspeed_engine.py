"""The Accelerator's DeepSpeed engine on 2 gloo ranks (CPU): ZeRO-2 training against DDP by hand with
accumulation, clipping and a torch scheduler; ZeRO-3 likewise (fp32, torch optimizer), and with the
config's optimizer and scheduler (DummyOptim / DummyScheduler), the full state dict gathered on the main
process, two named plugins.

Each ``deepspeed.initialize`` costs seconds here, so the tests are few and each checks a lot.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn import functional

from tests.ranks import RankPool, raised
from tests.training import (
    _optimizer,
    accelerated_epochs,
    dataset,
    model,
    raw_loader,
    raw_run,
    train_prepared,
)

pytest.importorskip("deepspeed")

MICRO = 4  # the batch size of tests.training's loader


def _reset() -> None:
    from hasten import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _config(stage: int, **extra: Any) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        **extra,
    }


def _zero2_run(steps: int) -> dict[str, Any]:
    from hasten import Accelerator
    from hasten.utils import DeepSpeedPlugin

    config = _config(2, train_micro_batch_size_per_gpu="auto")  # from the data loader prepared with the model
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
        gradient_accumulation_steps=steps,
        dynamo_backend="eager",  # compiled through DeepSpeed's engine.compile
    )
    before = raised(lambda: accelerator.backward(torch.ones((), requires_grad=True)))
    net = model()
    optimizer, scheduler = _optimizer(net.parameters())
    bare = net
    evaluation = torch.utils.data.DataLoader(dataset(), batch_size=MICRO)
    engine, optimizer, scheduler, evaluation = accelerator.prepare(net, optimizer, scheduler, evaluation)
    loader = raw_loader(accelerator.num_processes, accelerator.process_index)
    losses, norms = accelerated_epochs(accelerator, engine, optimizer, scheduler, loader)
    config = accelerator.deepspeed_config
    weights = accelerator.get_state_dict(engine)
    facts = {
        "types": [type(o).__name__ for o in (engine, optimizer, scheduler)],
        "wrapped": type(accelerator.deepspeed_engine_wrapped).__name__,
        "unwrapped": accelerator.unwrap_model(engine) is bare,
        "config": {
            k: config[k] for k in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_clipping")
        },
        "accumulation": (config["gradient_accumulation_steps"], accelerator.gradient_accumulation_steps),
        "evaluation batches": len(evaluation),
        "untested optimizer allowed": config["zero_allow_untested_optimizer"],
        "norms": norms,
        "lr": scheduler.get_last_lr(),
        "mixed precision": accelerator.mixed_precision,
        "no_sync": type(accelerator.no_sync(engine)).__name__,
        "clip value": raised(lambda: accelerator.clip_grad_value_(engine.parameters(), 0.1)),
        "backward before prepare": before,
        "custom placement": raised(lambda: accelerator.prepare(model(), device_placement=[True])),
    }
    facts["compiled"] = engine.is_compiled
    accelerator.free_memory()
    facts["released"] = accelerator.deepspeed_engine_wrapped is None
    return {"losses": losses, "weights": weights, **facts}


def _zero2_and_ddp(steps: int) -> dict[str, Any]:
    ours = _zero2_run(steps)
    _reset()
    ddp_losses, ddp_weights = raw_run(steps)
    ours["close to DDP"] = all(
        abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(ours["losses"], ddp_losses)
    )
    ours["close weights"] = all(
        torch.allclose(ours["weights"][k], ddp_weights[k], rtol=1e-3, atol=1e-4) for k in ddp_weights
    )
    ours["weights"] = sorted(ours["weights"])
    return ours


def test_zero2_training_matches_ddp_with_accumulation_and_clipping(ranks2: RankPool) -> None:
    results = ranks2.run(_zero2_and_ddp, 2, timeout=300)
    for result in results:
        assert result["types"] == ["DeepSpeedEngine", "DeepSpeedOptimizerWrapper", "AcceleratedScheduler"]
        assert result["wrapped"] == "DeepSpeedEngineWrapper" and result["unwrapped"]
        # "auto" filled from the set-up: the loader's batch; x accumulation x processes; clipping 1.0
        assert result["config"] == {
            "train_micro_batch_size_per_gpu": MICRO,
            "train_batch_size": MICRO * 2 * 2,
            "gradient_clipping": 1.0,
        }
        assert result["evaluation batches"] == 96 // MICRO // 2  # the loader was sharded too
        assert result["accumulation"] == (2, 2)
        assert result["untested optimizer allowed"] is True
        assert len(result["norms"]) == 12 and all(isinstance(n, float) and n > 0 for n in result["norms"])
        assert result["close to DDP"] and result["close weights"], result
        assert result["weights"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
        assert result["mixed precision"] == "no" and result["no_sync"] == "nullcontext"
        assert result["compiled"] and result["released"]
        assert "clip_grad_value_(clip_value=0.1) cannot run under DeepSpeed" in result["clip value"]
        assert "prepare the model and its optimizer first" in result["backward before prepare"]
        assert "device_placement=[True]: the DeepSpeed engine places" in result["custom placement"]
    assert results[0]["norms"] == results[1]["norms"]  # one global norm
    assert results[0]["losses"] != results[1]["losses"]


def _zero3_and_ddp(steps: int) -> dict[str, Any]:
    """ZeRO-3 with a torch optimizer and scheduler, in fp32, against DDP written by hand."""
    from hasten import Accelerator
    from hasten.utils import DeepSpeedPlugin

    config = _config(3)
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny weights
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), gradient_accumulation_steps=steps
    )
    engine, losses, norms, weights = train_prepared(accelerator)
    local_shapes = {tuple(p.shape) for p in engine.parameters()}
    accumulation = accelerator.deepspeed_config["gradient_accumulation_steps"]
    accelerator.free_memory()
    _reset()
    ddp_losses, ddp_weights = raw_run(steps)
    return {
        "close to DDP": all(
            abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(losses, ddp_losses, strict=True)
        ),
        "close weights": None
        if weights is None
        else all(torch.allclose(weights[k], ddp_weights[k], rtol=1e-3, atol=1e-4) for k in ddp_weights),
        "keys": None if weights is None else sorted(weights),
        "norms": len(norms),
        "local shapes": local_shapes,
        "accumulation": accumulation,
    }


def test_zero3_training_matches_ddp_with_accumulation(ranks2: RankPool) -> None:
    results = ranks2.run(_zero3_and_ddp, 2, timeout=300)
    for rank, result in enumerate(results):
        assert result["close to DDP"], result
        assert result["local shapes"] == {(0,)}  # partitioned: the weights live in DeepSpeed's shards
        assert result["norms"] == 12 and result["accumulation"] == 2
        if rank == 0:
            assert result["close weights"] and result["keys"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
        else:
            assert result["close weights"] is None  # gathered on the main process only


def _zero3_with_config_optimizer() -> dict[str, Any]:
    from hasten import Accelerator
    from hasten.utils import DeepSpeedPlugin, DummyOptim, DummyScheduler, get_active_deepspeed_plugin

    sections = {
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
        },
    }
    gathering = _config(3, **sections)
    gathering["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    gathering["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny weights
    plugins = {
        "train": DeepSpeedPlugin(hf_ds_config=gathering),
        "frozen": DeepSpeedPlugin(hf_ds_config=_config(3)),
    }
    accelerator = Accelerator(deepspeed_plugins=plugins, mixed_precision="bf16")  # DeepSpeed's own bf16
    accelerator.state.select_deepspeed_plugin("frozen")
    frozen = accelerator.prepare(model())  # a model alone: an engine without optimizer, prepared first
    accelerator.state.select_deepspeed_plugin("train")
    net = model()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = DummyOptim(net.parameters(), lr=0.05, weight_decay=0.01)
    scheduler = DummyScheduler(optimizer, warmup_num_steps=3)
    engine, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    lrs = []
    for x, y in raw_loader(accelerator.num_processes, accelerator.process_index):
        accelerator.backward(functional.cross_entropy(engine(x.to(torch.bfloat16)).float(), y))
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    full = accelerator.get_state_dict(engine)
    config = accelerator.deepspeed_config
    local_shapes = sorted(tuple(p.shape) for p in engine.parameters())  # ZeRO-3 partitions: empty locally
    return {
        "types": [type(o).__name__ for o in (engine, optimizer, scheduler)],
        "filled": {
            "lr": config["optimizer"]["params"]["lr"],
            "weight_decay": config["optimizer"]["params"]["weight_decay"],
            "warmup": config["scheduler"]["params"]["warmup_num_steps"],
            "max lr": config["scheduler"]["params"]["warmup_max_lr"],
        },
        "lrs": lrs[:4],
        "full": None if full is None else {k: tuple(v.shape) for k, v in full.items()},
        "dtypes": None if full is None else {str(v.dtype) for v in full.values()},
        "precision": (accelerator.mixed_precision, config["bf16"]["enabled"], accelerator.native_amp),
        "moved": None if full is None else any(not torch.equal(full[k].float(), initial[k]) for k in initial),
        "local shapes": local_shapes,
        "frozen": type(frozen).__name__,
        "active": accelerator.deepspeed_plugin is plugins["train"],
        "backward drives": accelerator.deepspeed_engine_wrapped.engine is engine,
        "not gathered": raised(lambda: accelerator.get_state_dict(frozen)),
        "unknown plugin": raised(lambda: accelerator.state.select_deepspeed_plugin("eval")),
        "active plugin": get_active_deepspeed_plugin(accelerator.state) is plugins["train"],
        "two models": raised(lambda: accelerator.prepare(model(), model())),
        "optimizer alone": raised(lambda: accelerator.prepare(torch.optim.SGD(model().parameters(), lr=0.1))),
        "prepare_optimizer": raised(
            lambda: accelerator.prepare_optimizer(torch.optim.SGD(model().parameters(), lr=0.1))
        ),
        "evaluation": type(accelerator.prepare_model(model(), evaluation_mode=True)).__name__,
    }


def test_zero3_gathers_the_state_dict_on_the_main_process(ranks2: RankPool) -> None:
    results = ranks2.run(_zero3_with_config_optimizer, timeout=300)
    for rank, result in enumerate(results):
        assert result["types"] == [
            "DeepSpeedEngine",
            "DeepSpeedOptimizerWrapper",
            "DeepSpeedSchedulerWrapper",
        ]
        assert result["filled"] == {"lr": 0.05, "weight_decay": 0.01, "warmup": 3, "max lr": 0.05}
        assert result["precision"] == ("bf16", True, False)  # DeepSpeed casts; no autocast around it
        assert result["lrs"][0] < result["lrs"][2] <= 0.05  # warming up, stepped by the engine
        assert all(shape == (0,) for shape in result["local shapes"]), result["local shapes"]
        if rank == 0:
            assert result["full"] == {
                "0.weight": (16, 8),
                "0.bias": (16,),
                "2.weight": (3, 16),
                "2.bias": (3,),
            }
            assert result["moved"] and result["dtypes"] == {"torch.bfloat16"}
        else:
            assert result["full"] is None
        assert result["frozen"] == "DeepSpeedEngine" and result["active"] and result["backward drives"]
        assert "stage3_gather_16bit_weights_on_model_save" in result["not gathered"]
        assert "No DeepSpeed plugin is named 'eval'" in result["unknown plugin"]
        assert result["active plugin"]
        assert (
            "prepare() got 2 models; under DeepSpeed each call initialises one engine" in result["two models"]
        )
        assert "an optimizer or scheduler is prepared together with its model" in result["optimizer alone"]
        assert "prepare_optimizer(SGD) under DeepSpeed" in result["prepare_optimizer"]
        assert result["evaluation"] == "Sequential"  # evaluation_mode: no engine around it
