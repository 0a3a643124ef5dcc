"""``hasten launch``: run a script on N processes (and M machines) through torchrun's rendezvous.

Settings come from, in order of precedence: the command-line flags, the config file
(``--config_file`` or the default one written by ``hasten config`` / ``accelerate config``),
then defaults. They reach the script as the ``ACCELERATE_*`` / ``FSDP_*`` environment variables
that hasten's (and Accelerate's) state and plugins read. One process runs the script directly;
more are started by ``python -m torch.distributed.run``.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

from hasten.commands.cli import command_parser
from hasten.commands.launch_config import boolean, settings_from_config_file
from hasten.utils.config_file import default_config_file
from hasten.utils.constants import (
    DEEPSPEED_MULTINODE_LAUNCHERS,
    FSDP_AUTO_WRAP_POLICY,
    FSDP_BACKWARD_PREFETCH,
    FSDP_SHARDING_STRATEGY,
    FSDP_STATE_DICT_TYPE,
    TORCH_DYNAMO_MODES,
)
from hasten.utils.dataclasses.enums import DynamoBackend, PrecisionType
from hasten.utils.launch import (
    prepare_deepspeed_cmd_env,
    prepare_multi_gpu_env,
    prepare_simple_launcher_cmd_env,
    torchrun_command,
)

# FSDP strategies by name, or by their number in that list (as Accelerate's launcher accepts them).
_STRATEGIES = [*FSDP_SHARDING_STRATEGY, *(str(n) for n in range(1, len(FSDP_SHARDING_STRATEGY) + 1))]


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
    general.add_argument("--gpu_ids", help="the accelerators to use, e.g. 0,1 (default: all)")
    general.add_argument("--num_cpu_threads_per_process", type=int, help="OMP_NUM_THREADS of each process")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("-m", "--module", action="store_true", help="the script is a module name (python -m)")
    how.add_argument("--no_python", action="store_true", help="the script is an executable, not Python")
    dynamo = parser.add_argument_group("torch.compile")
    dynamo.add_argument(
        "--dynamo_backend", type=str.upper, choices=DynamoBackend.list(), help="compile backend"
    )
    dynamo.add_argument("--dynamo_mode", choices=TORCH_DYNAMO_MODES)
    for name in ("dynamo_use_fullgraph", "dynamo_use_dynamic", "dynamo_use_regional_compilation"):
        dynamo.add_argument(f"--{name}", type=boolean, nargs="?", const=True)
    fsdp = parser.add_argument_group("FSDP")
    fsdp.add_argument("--use_fsdp", action="store_const", const=True, help="shard the model with FSDP")
    fsdp.add_argument("--fsdp_version", type=int, choices=[1, 2])
    fsdp.add_argument("--fsdp_sharding_strategy", type=str.upper, choices=_STRATEGIES)
    fsdp.add_argument("--fsdp_auto_wrap_policy", type=str.upper, choices=FSDP_AUTO_WRAP_POLICY)
    fsdp.add_argument("--fsdp_backward_prefetch", type=str.upper, choices=FSDP_BACKWARD_PREFETCH)
    fsdp.add_argument("--fsdp_state_dict_type", type=str.upper, choices=FSDP_STATE_DICT_TYPE)
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
        "fsdp_activation_checkpointing_offload",
    ):
        fsdp.add_argument(f"--{name}", type=boolean, nargs="?", const=True)
    deepspeed = parser.add_argument_group("DeepSpeed")
    deepspeed.add_argument("--use_deepspeed", action="store_const", const=True, help="train with DeepSpeed")
    deepspeed.add_argument("--deepspeed_config_file", help="DeepSpeed JSON config")
    deepspeed.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3])
    deepspeed.add_argument("--offload_optimizer_device", choices=["none", "cpu", "nvme"])
    deepspeed.add_argument("--offload_param_device", choices=["none", "cpu", "nvme"])
    deepspeed.add_argument("--gradient_clipping", type=float)
    deepspeed.add_argument("--deepspeed_moe_layer_cls_names")
    for name in ("zero3_init_flag", "zero3_save_16bit_model"):
        deepspeed.add_argument(f"--{name}", type=boolean, nargs="?", const=True)
    deepspeed.add_argument("--deepspeed_hostfile", help="machines for DeepSpeed's multi-machine launcher")
    deepspeed.add_argument(
        "--deepspeed_exclusion_filter", help="DeepSpeed --exclude (machines/devices to skip)"
    )
    deepspeed.add_argument(
        "--deepspeed_inclusion_filter", help="DeepSpeed --include (machines/devices to use)"
    )
    deepspeed.add_argument(
        "--deepspeed_multinode_launcher",
        choices=DEEPSPEED_MULTINODE_LAUNCHERS,
        help="how DeepSpeed reaches machines",
    )
    parallelism = parser.add_argument_group("n-D parallelism (ParallelismConfig)")
    parallelism.add_argument("--use_parallelism_config", action="store_const", const=True)
    for name in ("dp_replicate_size", "dp_shard_size", "tp_size", "cp_size", "sp_size", "sp_seq_length"):
        parallelism.add_argument(f"--parallelism_config_{name}", type=int)
    parallelism.add_argument("--parallelism_config_cp_backend", choices=["torch"])
    parallelism.add_argument("--parallelism_config_cp_comm_strategy", choices=["allgather", "alltoall"])
    parallelism.add_argument("--parallelism_config_sp_backend", choices=["deepspeed"])
    parallelism.add_argument(
        "--parallelism_config_sp_seq_length_is_variable", type=boolean, nargs="?", const=True
    )
    parallelism.add_argument("--parallelism_config_sp_attn_implementation")
    parser.add_argument("training_script", help="the script (or module, or executable) to run")
    parser.add_argument("training_script_args", nargs=argparse.REMAINDER, help="its arguments")


def _from_config(args: argparse.Namespace) -> None:
    """Fill every option left unset from the config file (flags win), then from defaults."""
    path = args.config_file
    if path is None and default_config_file().exists():
        path = default_config_file()
    if path is not None:
        parser = argparse.ArgumentParser(add_help=False)
        add_launch_arguments(parser)
        for key, value in settings_from_config_file(path, parser).items():
            if getattr(args, key) is None:
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


def simple_launcher(args: argparse.Namespace) -> int:
    """Run the script as this one process; returns its exit code."""
    command, env = prepare_simple_launcher_cmd_env(args)
    return subprocess.run(command, env=env, check=False).returncode


def multi_gpu_launcher(args: argparse.Namespace) -> int:
    """Run the script on several processes (and machines) through torchrun; returns the job's exit code."""
    env = prepare_multi_gpu_env(args)
    return subprocess.run(torchrun_command(args), env=env, check=False).returncode


def deepspeed_launcher(args: argparse.Namespace) -> int:
    """Run the script with DeepSpeed on several processes: torchrun, or DeepSpeed's own multi-machine
    launcher; returns the job's exit code."""
    command, env = prepare_deepspeed_cmd_env(args)
    return subprocess.run(command or torchrun_command(args), env=env, check=False).returncode


def launch_command(args: argparse.Namespace) -> int:
    """Resolve the settings, then run the script; returns the exit code of the job."""
    _from_config(args)
    _check(args)
    if not args.no_python and not args.module and not Path(args.training_script).exists():
        raise ValueError(
            f"training script {args.training_script!r} does not exist (pass -m for a module name)"
        )
    if args.num_processes == 1 and args.num_machines == 1:
        return simple_launcher(args)
    return deepspeed_launcher(args) if args.use_deepspeed else multi_gpu_launcher(args)


def launch_command_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    """The ``launch`` command's options (a subcommand of ``subparsers``, or a parser of its own)."""
    parser = command_parser(
        subparsers,
        "launch",
        "Run a script on several processes or machines.",
        "run a script on several processes or machines",
        launch_command,
    )
    add_launch_arguments(parser)
    return parser


def main() -> int:
    """Run ``hasten launch`` from ``sys.argv`` (``python -m hasten.commands.launch``)."""
    return launch_command(launch_command_parser().parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
