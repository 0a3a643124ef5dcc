"""Every variable `hasten launch` writes is read by the plugin or state it is for, and launch config files
are checked as the flags are."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy, StateDictType
from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

from hasten.commands.cli import build_parser
from hasten.commands.launch import _from_config
from hasten.parallelism_config import ParallelismConfig
from hasten.state import AcceleratorState, PartialState
from hasten.utils.constants import LAUNCH_VARIABLES, LaunchVariable
from hasten.utils.dataclasses.enums import DistributedType, DynamoBackend
from hasten.utils.dataclasses.plugins.deepspeed import DeepSpeedPlugin
from hasten.utils.dataclasses.plugins.dynamo import TorchDynamoPlugin
from hasten.utils.dataclasses.plugins.fsdp import FullyShardedDataParallelPlugin
from hasten.utils.dataclasses.plugins.gradient import GradientAccumulationPlugin
from hasten.utils.dataclasses.plugins.parallelism import TorchContextParallelConfig
from hasten.utils.dataclasses.plugins.sequence_parallel import DeepSpeedSequenceParallelConfig
from hasten.utils.environment import patch_environment
from hasten.utils.errors import ConfigurationError
from hasten.utils.launch import launch_environment


def _fresh_partial_state() -> PartialState:
    AcceleratorState._reset_state(reset_partial_state=True)
    return PartialState()


def _fresh_accelerator_state() -> AcceleratorState:
    AcceleratorState._reset_state(reset_partial_state=True)
    return AcceleratorState()


READERS: dict[str, Callable[[], Any]] = {
    "PartialState": _fresh_partial_state,
    "AcceleratorState": _fresh_accelerator_state,
    "GradientAccumulationPlugin": GradientAccumulationPlugin,
    "DeepSpeedPlugin": DeepSpeedPlugin,
    "TorchDynamoPlugin": TorchDynamoPlugin,
    "FullyShardedDataParallelPlugin": FullyShardedDataParallelPlugin,
    "ParallelismConfig": ParallelismConfig,
    "TorchContextParallelConfig": TorchContextParallelConfig,
    "DeepSpeedSequenceParallelConfig": DeepSpeedSequenceParallelConfig,
}
# How to see a field's value where it is not the attribute of that name.
READ: dict[str, Callable[[Any], Any]] = {
    "cpu": lambda state: state._state.cpu,
    "fsdp_plugin": lambda state: state.distributed_type,
    "deepspeed_plugin": lambda state: state.distributed_type,
    "cpu_offload": lambda plugin: plugin.cpu_offload.offload_params,
    "hf_ds_config": lambda plugin: plugin.hf_ds_config.get_value("zero_optimization.stage"),
}
FSDP, DS, DYNAMO = ["--use_fsdp"], ["--use_deepspeed"], ["--dynamo_backend", "inductor"]
PARALLEL = ["--use_parallelism_config"]
SIZE_WRAP = [*FSDP, "--fsdp_auto_wrap_policy", "SIZE_BASED_WRAP"]
# (option, reader) -> the flags that set it (with what the reader needs besides), and the value read back.
ROUND_TRIPS: dict[tuple[str, str], tuple[list[str], Any]] = {
    ("mixed_precision", "AcceleratorState"): (["--mixed_precision", "bf16"], "bf16"),
    ("cpu", "PartialState"): (["--cpu"], True),
    ("debug", "PartialState"): (["--debug"], True),
    ("use_fsdp", "AcceleratorState"): (FSDP, DistributedType.FSDP),
    ("use_deepspeed", "AcceleratorState"): (DS, DistributedType.DEEPSPEED),
    ("gradient_accumulation_steps", "GradientAccumulationPlugin"): (
        ["--gradient_accumulation_steps", "4"],
        4,
    ),
    ("gradient_accumulation_steps", "DeepSpeedPlugin"): ([*DS, "--gradient_accumulation_steps", "4"], 4),
    ("dynamo_backend", "TorchDynamoPlugin"): (DYNAMO, DynamoBackend.INDUCTOR),
    ("dynamo_mode", "TorchDynamoPlugin"): (
        [*DYNAMO, "--dynamo_mode", "max-autotune-no-cudagraphs"],
        "max-autotune-no-cudagraphs",
    ),
    ("dynamo_use_fullgraph", "TorchDynamoPlugin"): ([*DYNAMO, "--dynamo_use_fullgraph", "true"], True),
    ("dynamo_use_dynamic", "TorchDynamoPlugin"): ([*DYNAMO, "--dynamo_use_dynamic", "false"], False),
    ("dynamo_use_regional_compilation", "TorchDynamoPlugin"): (
        [*DYNAMO, "--dynamo_use_regional_compilation", "yes"],
        True,
    ),
    ("fsdp_version", "FullyShardedDataParallelPlugin"): ([*FSDP, "--fsdp_version", "2"], 2),
    ("fsdp_sharding_strategy", "FullyShardedDataParallelPlugin"): (
        [*FSDP, "--fsdp_sharding_strategy", "shard_grad_op"],
        ShardingStrategy.SHARD_GRAD_OP,
    ),
    ("fsdp_reshard_after_forward", "FullyShardedDataParallelPlugin"): (
        [*FSDP, "--fsdp_version", "2", "--fsdp_reshard_after_forward", "false"],
        False,
    ),
    ("fsdp_offload_params", "FullyShardedDataParallelPlugin"): (
        [*FSDP, "--fsdp_offload_params", "true"],
        True,
    ),
    ("fsdp_min_num_params", "FullyShardedDataParallelPlugin"): (
        [*SIZE_WRAP, "--fsdp_min_num_params", "7"],
        7,
    ),
    ("fsdp_auto_wrap_policy", "FullyShardedDataParallelPlugin"): (SIZE_WRAP, size_based_auto_wrap_policy),
    ("fsdp_transformer_layer_cls_to_wrap", "FullyShardedDataParallelPlugin"): (
        [
            *FSDP,
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap",
            "A,B",
        ],
        ["A", "B"],
    ),
    ("fsdp_backward_prefetch", "FullyShardedDataParallelPlugin"): (
        [*FSDP, "--fsdp_backward_prefetch", "BACKWARD_POST"],
        BackwardPrefetch.BACKWARD_POST,
    ),
    ("fsdp_state_dict_type", "FullyShardedDataParallelPlugin"): (
        [*FSDP, "--fsdp_state_dict_type", "SHARDED_STATE_DICT"],
        StateDictType.SHARDED_STATE_DICT,
    ),
    ("fsdp_forward_prefetch", "FullyShardedDataParallelPlugin"): (
        [*FSDP, "--fsdp_forward_prefetch", "true"],
        True,
    ),
    ("fsdp_use_orig_params", "FullyShardedDataParallelPlugin"): (
        [*FSDP, "--fsdp_use_orig_params", "1"],
        True,
    ),
    ("fsdp_cpu_ram_efficient_loading", "FullyShardedDataParallelPlugin"): (
        [*FSDP, "--fsdp_cpu_ram_efficient_loading", "true"],
        True,
    ),
    ("fsdp_sync_module_states", "FullyShardedDataParallelPlugin"): (
        [*FSDP, "--fsdp_sync_module_states", "true"],
        True,
    ),
    ("fsdp_activation_checkpointing", "FullyShardedDataParallelPlugin"): (
        [*FSDP, "--fsdp_activation_checkpointing", "on"],
        True,
    ),
    ("fsdp_activation_checkpointing_offload", "FullyShardedDataParallelPlugin"): (
        [
            *FSDP,
            "--fsdp_version",
            "2",
            "--fsdp_activation_checkpointing",
            "--fsdp_activation_checkpointing_offload",
            "y",
        ],
        True,
    ),
    ("zero_stage", "DeepSpeedPlugin"): ([*DS, "--zero_stage", "3"], 3),
    ("deepspeed_config_file", "DeepSpeedPlugin"): ([*DS, "--deepspeed_config_file", "{ds_config}"], 1),
    ("offload_optimizer_device", "DeepSpeedPlugin"): ([*DS, "--offload_optimizer_device", "cpu"], "cpu"),
    ("offload_param_device", "DeepSpeedPlugin"): (
        [*DS, "--zero_stage", "3", "--offload_param_device", "cpu"],
        "cpu",
    ),
    ("zero3_init_flag", "DeepSpeedPlugin"): ([*DS, "--zero_stage", "3", "--zero3_init_flag", "false"], False),
    ("zero3_save_16bit_model", "DeepSpeedPlugin"): ([*DS, "--zero3_save_16bit_model", "true"], True),
    ("gradient_clipping", "DeepSpeedPlugin"): ([*DS, "--gradient_clipping", "0.5"], 0.5),
    ("deepspeed_moe_layer_cls_names", "DeepSpeedPlugin"): (
        [*DS, "--deepspeed_moe_layer_cls_names", "MoE"],
        "MoE",
    ),
    **{
        (f"parallelism_config_{size}", "ParallelismConfig"): (
            [*PARALLEL, f"--parallelism_config_{size}", "2"],
            2,
        )
        for size in ("dp_replicate_size", "dp_shard_size", "tp_size", "cp_size", "sp_size")
    },
    ("parallelism_config_cp_comm_strategy", "TorchContextParallelConfig"): (
        [*PARALLEL, "--parallelism_config_cp_comm_strategy", "alltoall"],
        "alltoall",
    ),
    ("parallelism_config_sp_seq_length", "DeepSpeedSequenceParallelConfig"): (
        [*PARALLEL, "--parallelism_config_sp_seq_length", "512"],
        512,
    ),
    ("parallelism_config_sp_seq_length_is_variable", "DeepSpeedSequenceParallelConfig"): (
        [
            *PARALLEL,
            "--parallelism_config_sp_seq_length",
            "512",
            "--parallelism_config_sp_seq_length_is_variable",
            "false",
        ],
        False,
    ),
    ("parallelism_config_sp_attn_implementation", "DeepSpeedSequenceParallelConfig"): (
        [*PARALLEL, "--parallelism_config_sp_attn_implementation", "sdpa"],
        "sdpa",
    ),
}


def test_every_entry_of_the_table_has_a_round_trip_and_a_flag() -> None:
    assert sorted(ROUND_TRIPS) == sorted((entry.option, entry.reader) for entry in LAUNCH_VARIABLES)
    parser = build_parser()
    launch = next(a for a in parser._actions if a.dest == "command").choices["launch"]  # type: ignore[index]
    flags = {action.dest for action in launch._actions}
    assert {entry.option for entry in LAUNCH_VARIABLES} <= flags


def _read(entry: LaunchVariable, env: dict[str, str]) -> Any:
    with patch_environment(**env):
        reader = READERS[entry.reader]()
        return READ.get(entry.field, lambda obj: getattr(obj, entry.field))(reader)


@pytest.mark.parametrize("entry", LAUNCH_VARIABLES, ids=lambda e: f"{e.variable}->{e.reader}.{e.field}")
def test_the_launcher_writes_what_the_reader_reads(entry: LaunchVariable, tmp_path: Path) -> None:
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    argv, expected = ROUND_TRIPS[(entry.option, entry.reader)]
    args = build_parser().parse_args(["launch", *(a.format(ds_config=config) for a in argv), "job.py"])
    with patch_environment(HF_HOME=str(tmp_path)):  # no default config file
        _from_config(args)
    env = launch_environment(args)  # the launcher's own code path
    assert entry.variable in env
    assert _read(entry, env) == expected
    without = {key: value for key, value in env.items() if key != entry.variable}
    assert _read(entry, without) != expected  # the value came from this variable


# --- launch config files: each value through its flag ------------------------------------------


def _settings(tmp_path: Path, content: dict[str, Any]) -> Any:
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump(content))
    args = build_parser().parse_args(["launch", "--config_file", str(path), "job.py"])
    _from_config(args)
    return args


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"mixed_precision": "fp64"},
            r"mixed_precision='fp64' is not valid; --mixed_precision takes one of \['no'",
        ),
        ({"num_processes": "two"}, r"num_processes='two' is not valid; --num_processes takes an integer"),
        ({"num_processes": 2.5}, r"num_processes=2.5 is not valid; --num_processes takes an integer"),
        (
            {"gradient_clipping": "high"},
            r"gradient_clipping='high' is not valid; --gradient_clipping takes a number",
        ),
        (
            {"fsdp_config": {"fsdp_offload_params": "maybe"}},
            r"fsdp_offload_params='maybe' is not valid; .* true or false",
        ),
        (
            {"fsdp_config": {"fsdp_state_dict_type": "LOCAL"}},
            r"fsdp_state_dict_type='LOCAL' is not valid; .* one of",
        ),
        ({"debug": "sometimes"}, r"debug='sometimes' is not valid; --debug takes true or false"),
        (
            {"main_process_ip": {"host": "x"}},
            r"main_process_ip=\{'host': 'x'\} is not valid; .* a single value",
        ),
        ({"distributed_type": "FSPD"}, r"distributed_type='FSPD' is not valid; expected one of"),
    ],
)
def test_bad_config_values_are_the_flags_errors(
    tmp_path: Path, content: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=r"config file '.*launch.yaml': " + message):
        _settings(tmp_path, content)


def test_config_values_are_converted_as_flags_convert_them(tmp_path: Path) -> None:
    args = _settings(
        tmp_path,
        {
            "distributed_type": "FSDP",
            "num_processes": "2",
            "debug": False,
            "use_cpu": "yes",
            "dynamo_config": {"dynamo_backend": "inductor", "dynamo_mode": "max-autotune-no-cudagraphs"},
            "fsdp_config": {
                "fsdp_transformer_layer_cls_to_wrap": ["Block", "Head"],
                "fsdp_offload_params": "on",
            },
        },
    )
    assert (args.num_processes, args.debug, args.cpu, args.use_fsdp) == (2, None, True, True)
    assert (args.dynamo_backend, args.dynamo_mode) == ("INDUCTOR", "max-autotune-no-cudagraphs")
    assert (args.fsdp_transformer_layer_cls_to_wrap, args.fsdp_offload_params) == ("Block,Head", True)


def test_unknown_keys_warn_with_the_closest_known_one(tmp_path: Path) -> None:
    with pytest.warns(UserWarning) as caught:
        _settings(
            tmp_path,
            {
                "mixed_precison": "bf16",
                "fsdp_config": {"fsdp_ofload_params": True},
                "fsdp_confg": {},
                "xyzzy": 1,
                "gpu_ids": 1,
            },
        )
    messages = sorted(str(warning.message).split(": ", 1)[1] for warning in caught)
    assert messages == [
        "unknown key 'fsdp_confg' ignored; did you mean 'fsdp_config'?",
        "unknown key 'fsdp_ofload_params' ignored; did you mean 'fsdp_offload_params'?",
        "unknown key 'mixed_precison' ignored; did you mean 'mixed_precision'?",
        "unknown key 'xyzzy' ignored.",
    ]


def test_keys_accelerate_writes_pass_quietly(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = _settings(
            tmp_path,
            {
                "compute_environment": "LOCAL_MACHINE",
                "distributed_type": "NO",
                "downcast_bf16": "no",
                "enable_cpu_affinity": False,
                "gpu_ids": "all",
                "machine_rank": 0,
                "main_training_function": "main",
                "rdzv_backend": "static",
                "same_network": True,
                "tpu_env": [],
                "tpu_use_cluster": False,
                "tpu_use_sudo": False,
                "use_cpu": False,
            },
        )
    assert args.same_network is True and args.cpu is None and args.use_fsdp is None


def test_a_bad_config_value_stops_the_launch(tmp_path: Path) -> None:
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump({"mixed_precision": "fp64"}))
    script = tmp_path / "job.py"
    script.write_text("print('ran')")
    result = subprocess.run(
        [sys.executable, "-m", "hasten", "launch", "--config_file", str(path), str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "ran" not in result.stdout
    assert "hasten launch: error: config file" in result.stderr and "mixed_precision='fp64'" in result.stderr
