"""``hasten launch``: run a script on N processes (and M machines) through torchrun's rendezvous.

Settings come from, in order of precedence: the command-line flags, the config file
(``--config_file`` or the default one written by ``hasten config`` / ``accelerate config``),
then defaults. They reach the script as the ``ACCELERATE_*`` / ``FSDP_*`` environment variables
that hasten's (and Accelerate's) state and plugins read. One process runs the script directly;
more are started by ``python -m torch.distributed.run``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hasten.utils.config_file import default_config_file, load_config_file
from hasten.utils.dataclasses.enums import DynamoBackend, PrecisionType

FSDP_STRATEGIES = [
    "FULL_SHARD",
    "SHARD_GRAD_OP",
    "NO_SHARD",
    "HYBRID_SHARD",
    "HYBRID_SHARD_ZERO2",
    "1",
    "2",
    "3",
    "4",
    "5",
]
FSDP_WRAP_POLICIES = ["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"]
FSDP_PREFETCH = ["BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"]
FSDP_STATE_DICTS = ["FULL_STATE_DICT", "LOCAL_STATE_DICT", "SHARDED_STATE_DICT"]

# flag -> environment variable, for flags passed through as they are (booleans lower-cased).
FSDP_VARIABLES = {
    "fsdp_version": "FSDP_VERSION",
    "fsdp_sharding_strategy": "FSDP_SHARDING_STRATEGY",
    "fsdp_reshard_after_forward": "FSDP_RESHARD_AFTER_FORWARD",
    "fsdp_offload_params": "FSDP_OFFLOAD_PARAMS",
    "fsdp_min_num_params": "FSDP_MIN_NUM_PARAMS",
    "fsdp_auto_wrap_policy": "FSDP_AUTO_WRAP_POLICY",
    "fsdp_transformer_layer_cls_to_wrap": "FSDP_TRANSFORMER_CLS_TO_WRAP",
    "fsdp_backward_prefetch": "FSDP_BACKWARD_PREFETCH",
    "fsdp_state_dict_type": "FSDP_STATE_DICT_TYPE",
    "fsdp_forward_prefetch": "FSDP_FORWARD_PREFETCH",
    "fsdp_use_orig_params": "FSDP_USE_ORIG_PARAMS",
    "fsdp_cpu_ram_efficient_loading": "FSDP_CPU_RAM_EFFICIENT_LOADING",
    "fsdp_sync_module_states": "FSDP_SYNC_MODULE_STATES",
    "fsdp_activation_checkpointing": "FSDP_ACTIVATION_CHECKPOINTING",
}
DEEPSPEED_VARIABLES = {
    "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "deepspeed_config_file": "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
    "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
    "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
    "deepspeed_moe_layer_cls_names": "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES",
}
DYNAMO_VARIABLES = {
    "dynamo_mode": "ACCELERATE_DYNAMO_MODE",
    "dynamo_use_fullgraph": "ACCELERATE_DYNAMO_USE_FULLGRAPH",
    "dynamo_use_dynamic": "ACCELERATE_DYNAMO_USE_DYNAMIC",
    "dynamo_use_regional_compilation": "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION",
}
CONFIG_SECTIONS = ("fsdp_config", "deepspeed_config", "dynamo_config")


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Every ``hasten launch`` option (Accelerate's names); all default to ``None`` = "not given"."""
    general = parser.add_argument_group("processes and machines")
    general.add_argument(
        "--config_file", help="config file to read (default: the one `hasten config` writes)"
    )
    general.add_argument(
        "--cpu", action="store_const", const=True, help="run on the CPU even if accelerators exist"
    )
    general.add_argument("--num_processes", type=int, help="processes in total, over all machines")
    general.add_argument("--num_machines", type=int, help="machines taking part")
    general.add_argument("--machine_rank", type=int, help="this machine's rank, 0 to num_machines - 1")
    general.add_argument("--main_process_ip", help="address of the machine of rank 0")
    general.add_argument("--main_process_port", type=int, help="port of the rendezvous on rank 0's machine")
    general.add_argument(
        "--rdzv_backend", choices=["static", "c10d", "etcd", "etcd-v2"], help="torchrun rendezvous"
    )
    general.add_argument("--same_network", action="store_const", const=True, help="machines share a network")
    general.add_argument("--mixed_precision", choices=PrecisionType.list(), help="autocast precision")
    general.add_argument("--gradient_accumulation_steps", type=int, help="steps per optimizer update")
    general.add_argument("--debug", action="store_const", const=True, help="check collectives across ranks")
    general.add_argument(
        "--max_restarts", type=int, help="restarts of a failed worker group before giving up"
    )
    general.add_argument("--monitor_interval", type=float, help="seconds between torchrun's health checks")
    general.add_argument(
        "--tee", help="torchrun --tee: copy std streams of workers (0 none, 1 out, 2 err, 3 both)"
    )
    general.add_argument("--log_dir", help="torchrun --log_dir: where workers' logs go")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("-m", "--module", action="store_true", help="the script is a module name (python -m)")
    how.add_argument("--no_python", action="store_true", help="the script is an executable, not Python")
    dynamo = parser.add_argument_group("torch.compile")
    dynamo.add_argument(
        "--dynamo_backend", type=str.upper, choices=DynamoBackend.list(), help="compile backend"
    )
    dynamo.add_argument("--dynamo_mode", choices=["default", "reduce-overhead", "max-autotune"])
    for name in ("dynamo_use_fullgraph", "dynamo_use_dynamic", "dynamo_use_regional_compilation"):
        dynamo.add_argument(f"--{name}", type=_flag, nargs="?", const=True)
    fsdp = parser.add_argument_group("FSDP")
    fsdp.add_argument("--use_fsdp", action="store_const", const=True, help="shard the model with FSDP")
    fsdp.add_argument("--fsdp_version", type=int, choices=[1, 2])
    fsdp.add_argument("--fsdp_sharding_strategy", type=str.upper, choices=FSDP_STRATEGIES)
    fsdp.add_argument("--fsdp_auto_wrap_policy", type=str.upper, choices=FSDP_WRAP_POLICIES)
    fsdp.add_argument("--fsdp_backward_prefetch", type=str.upper, choices=FSDP_PREFETCH)
    fsdp.add_argument("--fsdp_state_dict_type", type=str.upper, choices=FSDP_STATE_DICTS)
    fsdp.add_argument("--fsdp_transformer_layer_cls_to_wrap", help="comma-separated class names to wrap")
    fsdp.add_argument("--fsdp_min_num_params", type=int)
    for name in (
        "fsdp_reshard_after_forward",
        "fsdp_offload_params",
        "fsdp_forward_prefetch",
        "fsdp_use_orig_params",
        "fsdp_cpu_ram_efficient_loading",
        "fsdp_sync_module_states",
        "fsdp_activation_checkpointing",
    ):
        fsdp.add_argument(f"--{name}", type=_flag, nargs="?", const=True)
    deepspeed = parser.add_argument_group("DeepSpeed")
    deepspeed.add_argument("--use_deepspeed", action="store_const", const=True, help="train with DeepSpeed")
    deepspeed.add_argument("--deepspeed_config_file", help="DeepSpeed JSON config")
    deepspeed.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3])
    deepspeed.add_argument("--offload_optimizer_device", choices=["none", "cpu", "nvme"])
    deepspeed.add_argument("--offload_param_device", choices=["none", "cpu", "nvme"])
    deepspeed.add_argument("--gradient_clipping", type=float)
    deepspeed.add_argument("--deepspeed_moe_layer_cls_names")
    for name in ("zero3_init_flag", "zero3_save_16bit_model"):
        deepspeed.add_argument(f"--{name}", type=_flag, nargs="?", const=True)
    parser.add_argument("training_script", help="the script (or module, or executable) to run")
    parser.add_argument("training_script_args", nargs=argparse.REMAINDER, help="its arguments")


def _from_config(args: argparse.Namespace) -> None:
    """Fill every option left unset from the config file (flags win), then from defaults."""
    path = args.config_file
    if path is None and default_config_file().exists():
        path = default_config_file()
    config: dict[str, Any] = load_config_file(path) if path is not None else {}
    flat = {key: value for key, value in config.items() if key not in CONFIG_SECTIONS}
    for section in CONFIG_SECTIONS:
        if isinstance(config.get(section), dict):
            flat.update(config[section])
    if config.get("use_cpu"):
        flat.setdefault("cpu", True)
    distributed = str(config.get("distributed_type", "")).upper()
    flat.setdefault("use_fsdp", distributed == "FSDP" or None)
    flat.setdefault("use_deepspeed", distributed == "DEEPSPEED" or None)
    for key, value in flat.items():
        if getattr(args, key, None) is None and hasattr(args, key) and value is not None:
            setattr(args, key, value)
    defaults = {
        "num_processes": 1,
        "num_machines": 1,
        "machine_rank": 0,
        "rdzv_backend": "static",
        "mixed_precision": "no",
        "max_restarts": 0,
        "monitor_interval": 0.1,
        "main_process_port": 29500,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _check(args: argparse.Namespace) -> None:
    if args.use_fsdp and args.use_deepspeed:
        raise ValueError(
            "--use_fsdp and --use_deepspeed (or the config file's distributed_type) conflict: choose one"
        )
    if args.num_processes < 1 or args.num_machines < 1:
        raise ValueError(
            f"--num_processes={args.num_processes} and --num_machines={args.num_machines} must be >= 1"
        )
    if args.num_processes % args.num_machines:
        raise ValueError(
            f"--num_processes={args.num_processes} is the total over all machines and must divide evenly by "
            f"--num_machines={args.num_machines}"
        )
    if not 0 <= args.machine_rank < args.num_machines:
        raise ValueError(f"--machine_rank={args.machine_rank} must be between 0 and --num_machines - 1")
    if args.num_machines > 1 and not args.main_process_ip:
        raise ValueError("--num_machines > 1 needs --main_process_ip, the address of the machine of rank 0")
    if args.cpu and args.mixed_precision == "fp16":
        raise ValueError(
            "--cpu with --mixed_precision fp16: CPUs autocast to bf16 only; use --mixed_precision bf16"
        )


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def launch_environment(args: argparse.Namespace) -> dict[str, str]:
    """The variables the launched processes get (on top of the current environment)."""
    env = {"ACCELERATE_MIXED_PRECISION": str(args.mixed_precision)}
    if args.cpu:
        env["ACCELERATE_USE_CPU"] = "True"
    if args.debug:
        env["ACCELERATE_DEBUG_MODE"] = "true"
    if args.gradient_accumulation_steps is not None:
        env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(args.gradient_accumulation_steps)
    if args.dynamo_backend is not None:
        env["ACCELERATE_DYNAMO_BACKEND"] = str(args.dynamo_backend).upper()
        env.update(
            {
                var: _text(getattr(args, key))
                for key, var in DYNAMO_VARIABLES.items()
                if getattr(args, key) is not None
            }
        )
    if args.use_fsdp:
        env["ACCELERATE_USE_FSDP"] = "true"
        env.update(
            {
                var: _text(getattr(args, key))
                for key, var in FSDP_VARIABLES.items()
                if getattr(args, key) is not None
            }
        )
    if args.use_deepspeed:
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        env.update(
            {
                var: _text(getattr(args, key))
                for key, var in DEEPSPEED_VARIABLES.items()
                if getattr(args, key) is not None
            }
        )
    return env


def _program(args: argparse.Namespace) -> list[str]:
    if args.no_python:
        return [args.training_script, *args.training_script_args]
    if args.module:
        return [sys.executable, "-m", args.training_script, *args.training_script_args]
    return [sys.executable, args.training_script, *args.training_script_args]


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """``python -m torch.distributed.run ...`` for these settings."""
    per_machine = args.num_processes // args.num_machines
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={per_machine}",
        f"--nnodes={args.num_machines}",
        f"--max_restarts={args.max_restarts}",
        f"--monitor_interval={args.monitor_interval}",
    ]
    address = args.main_process_ip or "127.0.0.1"
    if args.rdzv_backend == "static":
        command += [
            f"--node_rank={args.machine_rank}",
            f"--master_addr={address}",
            f"--master_port={args.main_process_port}",
            "--rdzv_backend=static",
        ]
    else:
        command += [
            f"--rdzv_backend={args.rdzv_backend}",
            f"--rdzv_endpoint={address}:{args.main_process_port}",
            "--rdzv_id=hasten",
        ]
    if args.tee is not None:
        command.append(f"--tee={args.tee}")
    if args.log_dir is not None:
        command.append(f"--log_dir={args.log_dir}")
    if args.no_python:
        command.append("--no_python")
    elif args.module:
        command.append("--module")
    return [*command, args.training_script, *args.training_script_args]


def launch_command(args: argparse.Namespace) -> int:
    """Resolve the settings, then run the script; returns the exit code of the job."""
    _from_config(args)
    _check(args)
    if not args.no_python and not args.module and not Path(args.training_script).exists():
        raise ValueError(
            f"training script {args.training_script!r} does not exist (pass -m for a module name)"
        )
    env = {**os.environ, **launch_environment(args)}
    if args.num_processes == 1 and args.num_machines == 1:
        return subprocess.run(_program(args), env=env, check=False).returncode
    return subprocess.run(torchrun_command(args), env=env, check=False).returncode
