"""PartialState, AcceleratorState and GradientState in a single process (no launcher variables)."""

from __future__ import annotations

import contextlib
import datetime
import io
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hasten.state import (
    AcceleratorState,
    GradientState,
    PartialState,
    ThreadLocalSharedDict,
    do_nothing,
    is_initialized,
)
from hasten.utils import device as device_module
from hasten.utils.dataclasses.enums import DistributedType
from hasten.utils.dataclasses.plugins.dynamo import TorchDynamoPlugin
from hasten.utils.dataclasses.plugins.fsdp import FullyShardedDataParallelPlugin
from hasten.utils.environment import patch_environment
from hasten.utils.errors import ConfigurationError
from tests.ranks import free_port


def test_single_process_without_launcher() -> None:
    state = PartialState()
    assert state.initialized
    assert (state.num_processes, state.process_index, state.local_process_index) == (1, 0, 0)
    assert state.distributed_type is DistributedType.NO and state.backend is None
    assert state.device == torch.device("cpu") == state.default_device
    assert state.is_main_process and state.is_local_main_process and state.is_last_process
    assert not state.use_distributed and not state.debug
    assert not dist.is_initialized()
    state.wait_for_everyone()
    with state.main_process_first(), state.local_main_process_first():
        pass
    assert "Distributed environment: NO" in repr(state)


def test_every_instance_shares_one_record() -> None:
    first = PartialState()
    second = PartialState(cpu=True)  # later arguments do not re-create the state
    assert first._state is second._state


def test_reset_forgets_and_old_instances_say_so() -> None:
    state = PartialState()
    PartialState._reset_state()
    with pytest.raises(RuntimeError, match=r"The process state was reset; create `PartialState\(\)` again"):
        state.num_processes
    assert PartialState().num_processes == 1


def test_debug_flag_from_environment() -> None:
    with patch_environment(ACCELERATE_DEBUG_MODE="1"):
        assert PartialState().debug


def test_decorators_run_everything_on_one_process() -> None:
    state = PartialState()
    assert state.on_main_process(lambda: "main")() == "main"
    assert state.on_local_main_process(lambda: "local")() == "local"
    assert state.on_last_process(lambda: "last")() == "last"
    assert state.on_process(lambda: "one", process_index=1)() == "one"  # no group: everything runs
    assert state.on_process(process_index=0)(lambda: "zero")() == "zero"
    assert state.on_local_process(local_process_index=0)(lambda: "l0")() == "l0"


def test_decorator_misuse_is_explained() -> None:
    state = PartialState()
    with pytest.raises(TypeError, match=r"on_process needs process_index=<rank>"):
        state.on_process(lambda: None)
    with pytest.raises(TypeError, match=r"on_local_process needs local_process_index=<rank>"):
        state.on_local_process(lambda: None)
    with pytest.raises(TypeError, match=r"Pass the function to decorate"):
        state.on_main_process()


def test_print_on_the_main_process() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        PartialState().print("hello", 1)
    assert out.getvalue() == "hello 1\n"


def test_split_between_processes_on_one_process_is_the_identity() -> None:
    data = {"a": [1, 2, 3]}
    with PartialState().split_between_processes(data, apply_padding=True) as share:
        assert share is data


def test_inconsistent_launch_is_a_value_error_before_any_network_call() -> None:
    with (
        patch_environment(RANK="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
        pytest.raises(ValueError, match=r"RANK=2 is not a valid rank in a world of 2 processes"),
    ):
        PartialState()
    assert not dist.is_initialized()


def test_nccl_without_cuda_is_refused_before_any_network_call() -> None:
    with (
        patch_environment(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
        pytest.raises(
            ConfigurationError,
            match=r"backend='nccl' needs a cuda device, but this process computes on 'cpu'",
        ),
    ):
        PartialState(backend="nccl")


def test_bad_timeout_is_refused() -> None:
    with (
        patch_environment(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
        pytest.raises(
            ConfigurationError, match=r"timeout='soon' must be a datetime.timedelta or a positive number"
        ),
    ):
        PartialState(timeout="soon")


def test_a_launch_of_one_process_forms_a_group_of_one() -> None:
    with patch_environment(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())):
        state = PartialState(timeout=10)
        assert dist.is_initialized() and state.backend == "gloo"
        assert state.distributed_type is DistributedType.MULTI_CPU
        assert state.num_processes == 1 and not state.use_distributed
        with pytest.raises(ConfigurationError, match=r"backend='mpi', but the state holds 'gloo'"):
            PartialState(backend="mpi")
        state.destroy_process_group()
    assert not dist.is_initialized()


def test_accelerator_state_precision_from_argument_and_environment() -> None:
    state = AcceleratorState(mixed_precision="BF16")
    assert state.mixed_precision == "bf16" and state.num_processes == 1
    assert state.distributed_type is DistributedType.NO
    AcceleratorState._reset_state()
    with patch_environment(ACCELERATE_MIXED_PRECISION="fp16"):
        assert AcceleratorState().mixed_precision == "fp16"


def test_accelerator_state_cannot_change_precision() -> None:
    AcceleratorState(mixed_precision="bf16")
    assert AcceleratorState(mixed_precision="bf16").mixed_precision == "bf16"
    with pytest.raises(ValueError, match=r"mixed_precision='fp16', but the state holds 'bf16'"):
        AcceleratorState(mixed_precision="fp16")


def test_accelerator_state_bad_precision() -> None:
    with pytest.raises(
        ValueError,
        match=r"mixed_precision='fp32' is not valid; expected one of \['no', 'fp8', 'fp16', 'bf16'\]",
    ):
        AcceleratorState(mixed_precision="fp32")
    with (
        patch_environment(ACCELERATE_MIXED_PRECISION="half"),
        pytest.raises(ValueError, match=r"ACCELERATE_MIXED_PRECISION='half' is not valid"),
    ):
        AcceleratorState()


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED),
        ("ACCELERATE_USE_FSDP", DistributedType.FSDP),
        ("ACCELERATE_USE_MEGATRON_LM", DistributedType.MEGATRON_LM),
    ],
)
def test_engine_flags_set_the_distributed_type(variable: str, expected: DistributedType) -> None:
    with patch_environment(**{variable: "true"}):
        state = AcceleratorState()
    assert state.distributed_type is expected
    assert PartialState().distributed_type is DistributedType.NO  # the process itself is unchanged


def test_accelerator_state_reset_keeps_or_drops_the_partial_state() -> None:
    AcceleratorState()
    AcceleratorState._reset_state()
    assert PartialState._shared is not None and AcceleratorState._accelerator is None
    AcceleratorState()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert PartialState._shared is None
    with pytest.raises(RuntimeError, match=r"The accelerator state was reset"):
        AcceleratorState.__new__(AcceleratorState).mixed_precision


# --- a later state asking for other settings -----------------------------------------------------

_CHANGE = r"asks for settings this process's live state cannot change:\n- "


def test_a_later_state_with_other_group_arguments_names_each() -> None:
    port = free_port()
    with patch_environment(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)):
        PartialState(timeout=10)
        PartialState(timeout=datetime.timedelta(seconds=10), backend="GLOO")  # the same settings
        PartialState(init_method=f"tcp://127.0.0.1:{port}")  # the address the group was formed at
        with pytest.raises(ConfigurationError, match=_CHANGE + r"timeout=20, but the state holds 10 s\n"):
            PartialState(timeout=20)
        with pytest.raises(
            ConfigurationError,
            match=r"- init_method='tcp://10.0.0.1:1', but the state holds 'tcp://127.0.0.1:",
        ):
            PartialState(init_method="tcp://10.0.0.1:1")
        with pytest.raises(
            ConfigurationError, match=r"- group_name='x', but the process group was formed without it"
        ):
            PartialState(group_name="x")
        with pytest.raises(
            ConfigurationError, match=r"- timeout=1, but the state holds 10 s\n- backend='mpi'"
        ):
            AcceleratorState(timeout=1, backend="mpi")  # every difference, and through AcceleratorState too
        with pytest.raises(ConfigurationError, match=r"timeout='soon' must be a datetime.timedelta"):
            PartialState(timeout="soon")
        PartialState().destroy_process_group()


def test_a_single_process_compares_only_what_it_was_given() -> None:
    PartialState()
    PartialState(timeout=5, backend="gloo")  # no group: nothing these could have changed
    PartialState._reset_state()
    assert PartialState(timeout=5).timeout == datetime.timedelta(seconds=5)
    with pytest.raises(ConfigurationError, match=_CHANGE + r"timeout=6, but the state holds 5 s"):
        PartialState(timeout=6)


def test_adopting_a_group_checks_its_backend_and_timeout(tmp_path: Path) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    with pytest.raises(
        ConfigurationError, match=r"adopts the process group .*\n- timeout=5, but the state holds 30 s"
    ):
        PartialState(timeout=5)
    assert PartialState(timeout=30, backend="gloo").backend == "gloo"


def test_cpu_true_conflicts_with_a_state_on_an_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "accelerator_type", lambda: "mps")  # an accelerator, simulated
    assert PartialState().device == torch.device("mps")
    PartialState(cpu=False)
    with pytest.raises(ConfigurationError, match=_CHANGE + r"cpu=True, but the state computes on 'mps'"):
        PartialState(cpu=True)
    with pytest.raises(ConfigurationError, match=r"cpu=True, but the state computes on 'mps'"):
        AcceleratorState(cpu=True)
    PartialState._reset_state()
    assert PartialState(cpu=True).device == torch.device("cpu")
    PartialState(cpu=True)


def test_a_later_accelerator_state_with_other_plugins_names_each() -> None:
    dynamo = TorchDynamoPlugin(backend="inductor")
    AcceleratorState(mixed_precision="bf16", dynamo_plugin=dynamo)
    AcceleratorState(dynamo_plugin=TorchDynamoPlugin(backend="inductor"), mixed_precision="bf16")  # equal
    with pytest.raises(
        ConfigurationError,
        match=_CHANGE + r"mixed_precision='no', but the state holds 'bf16'\n"
        r"- dynamo_plugin=<TorchDynamoPlugin>, but the state holds a different one\n"
        r"- fsdp_plugin=<FullyShardedDataParallelPlugin>, but the state was created without one",
    ):
        AcceleratorState(
            mixed_precision="no",
            dynamo_plugin=TorchDynamoPlugin(),
            fsdp_plugin=FullyShardedDataParallelPlugin(),
        )
    with pytest.raises(
        ConfigurationError, match=r"deepspeed_plugin=<dict>, but the state was created without one"
    ):
        AcceleratorState(deepspeed_plugin={"a": object()})


class _Plugin:
    def to_kwargs(self) -> dict[str, object]:
        return {"num_steps": 4, "adjust_scheduler": True, "sync_with_dataloader": False}


class _Loader:
    end_of_dataloader = True
    remainder = 3


def test_gradient_state() -> None:
    state = GradientState()
    assert (state.num_steps, state.sync_gradients, state.in_dataloader, state.end_of_dataloader) == (
        1,
        True,
        False,
        False,
    )
    assert state.remainder == -1 and state.sync_with_dataloader and not state.adjust_scheduler
    GradientState(gradient_accumulation_plugin=_Plugin())
    assert (state.num_steps, state.adjust_scheduler, state.sync_with_dataloader) == (4, True, False)
    loader = _Loader()
    state._add_dataloader(loader)
    assert state.in_dataloader and state.end_of_dataloader and state.remainder == 3
    state._remove_dataloader(loader)
    assert state.active_dataloader is None and state.dataloader_references == [None]
    state._set_sync_gradients(False)
    assert not GradientState().sync_gradients
    GradientState._reset_state()
    with pytest.raises(RuntimeError, match=r"The gradient state was reset"):
        state.num_steps


def test_after_a_reset_attributes_raise_attribute_error_so_getattr_defaults_work() -> None:
    partial, accelerator, gradient = PartialState(), AcceleratorState(), GradientState()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    for state, name in [(partial, "device"), (accelerator, "mixed_precision"), (gradient, "num_steps")]:
        with pytest.raises(AttributeError, match="was reset; create"):
            getattr(state, name)
        assert getattr(state, name, "default") == "default"
        assert not hasattr(state, name)


def test_debug_is_settable_for_every_instance() -> None:
    state = PartialState()
    assert not state.debug
    state.debug = True
    assert PartialState().debug and state.num_processes == 1
    PartialState().debug = False
    assert not state.debug


def test_module_helpers_is_initialized_and_do_nothing() -> None:
    assert not is_initialized()
    AcceleratorState()
    assert is_initialized()
    AcceleratorState._reset_state()
    assert not is_initialized()
    assert do_nothing(1, key=2) is None


def test_thread_local_shared_dict_gives_each_thread_its_own_dict() -> None:
    class Holder:
        shared = ThreadLocalSharedDict()

    Holder.shared["main"] = 1
    holder = Holder()
    assert holder.shared is Holder.shared
    seen: dict[str, object] = {}

    def other_thread() -> None:
        seen["before"] = dict(Holder().shared)
        Holder().shared["other"] = 2
        seen["after"] = dict(Holder.shared)

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert seen == {"before": {}, "after": {"other": 2}}
    assert Holder.shared == {"main": 1}
    holder.shared = {"replaced": True}
    assert Holder.shared == {"replaced": True}
    with pytest.raises(TypeError, match="ThreadLocalSharedDict holds a dict, not list"):
        holder.shared = []  # type: ignore[assignment]
