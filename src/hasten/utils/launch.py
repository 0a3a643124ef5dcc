"""How a launch becomes a command and an environment: what ``hasten launch`` runs (Accelerate's
``utils.launch`` names).

Each ``prepare_*`` function takes the launch settings (the ``argparse.Namespace`` of
``hasten launch``, after the config file filled it in) and returns the environment for the
processes, as the current one plus the ``ACCELERATE_*`` / ``FSDP_*`` / ``PARALLELISM_CONFIG_*``
variables the state and plugins read (:func:`launch_environment`):

* :func:`prepare_simple_launcher_cmd_env`: one process, run directly (``python script.py``);
* :func:`prepare_multi_gpu_env`: several processes through torchrun; it also resolves the
  rendezvous on the namespace (``nproc_per_node``, ``nnodes``, ``node_rank``, ``master_addr`` /
  ``master_port`` or ``rdzv_endpoint``), which :func:`torchrun_command` turns into the command;
* :func:`prepare_deepspeed_cmd_env`: the same for DeepSpeed, plus DeepSpeed's own launcher
  (``deepspeed --hostfile ...``) for several machines reached by pdsh, MPI, SLURM or without ssh.

:class:`PrepareForLaunch` wraps a function started by ``torch.multiprocessing`` (the Python
launchers use it). Settings an ``accelerate launch`` namespace has and hasten's may lack are
read with their defaults, so Accelerate's namespaces work too.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hasten.utils.constants import DEEPSPEED_MULTINODE_LAUNCHERS, LAUNCH_VARIABLES
from hasten.utils.dataclasses.enums import DistributedType, PrecisionType
from hasten.utils.device import accelerator_type
from hasten.utils.ports import get_free_port, is_port_in_use
from hasten.utils.tree import merge_dicts

if TYPE_CHECKING:
    from hasten.commands.config.config_args import SageMakerConfig

# The variable that limits which devices a process sees, per accelerator type.
VISIBLE_DEVICES = {
    "xpu": "ZE_AFFINITY_MASK",
    "npu": "ASCEND_RT_VISIBLE_DEVICES",
    "mlu": "MLU_VISIBLE_DEVICES",
}


# The option that switches on each reader's variables (the others are written whenever they are set).
_SECTION = {
    "FullyShardedDataParallelPlugin": "use_fsdp",
    "DeepSpeedPlugin": "use_deepspeed",
    "TorchDynamoPlugin": "dynamo_backend",
    "ParallelismConfig": "use_parallelism_config",
    "TorchContextParallelConfig": "use_parallelism_config",
    "DeepSpeedSequenceParallelConfig": "use_parallelism_config",
}


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def launch_environment(args: argparse.Namespace) -> dict[str, str]:
    """The variables the launched processes get (on top of the current environment).

    Written from :data:`~hasten.utils.constants.LAUNCH_VARIABLES`: each option that is set, the
    FSDP, DeepSpeed, dynamo and parallelism ones only when that engine (or a compile backend, or
    ``use_parallelism_config``) is chosen.
    """
    env = {}
    for entry in LAUNCH_VARIABLES:
        value = getattr(args, entry.option, None)
        section = _SECTION.get(entry.reader)
        if value is not None and (section is None or getattr(args, section, None)):
            env[entry.variable] = _text(value)
    return env


def _program(args: argparse.Namespace) -> list[str]:
    """The script's command: an executable, ``python -m module`` or ``python script.py``."""
    if getattr(args, "no_python", False) and getattr(args, "module", False):
        raise ValueError("--module and --no_python cannot be used together")
    if getattr(args, "no_python", False):
        return [args.training_script, *args.training_script_args]
    module = ["-m"] if getattr(args, "module", False) else []
    return [sys.executable, *module, args.training_script, *args.training_script_args]


def _common_environment(args: argparse.Namespace) -> dict[str, str]:
    """The current environment plus the launch's variables, visible devices and thread count."""
    env = {**os.environ, **launch_environment(args)}
    gpu_ids = getattr(args, "gpu_ids", None)
    if gpu_ids is not None and gpu_ids != "all":
        env[VISIBLE_DEVICES.get(accelerator_type(), "CUDA_VISIBLE_DEVICES")] = str(gpu_ids)
    threads = getattr(args, "num_cpu_threads_per_process", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if str(getattr(args, "mixed_precision", "no")).lower() == PrecisionType.FP8.value:
        setup_fp8_env(args, env)
    if getattr(args, "use_parallelism_config", False):
        prepare_extend_env_parallelism_config(args, env)
    return env


def setup_fp8_env(args: argparse.Namespace, current_env: dict[str, str]) -> dict[str, str]:
    """Write each ``fp8_*`` setting that is set as ``ACCELERATE_FP8_*`` into ``current_env`` (and return
    it); ``fp8_override_linear_precision`` (three booleans) becomes the FPROP / DGRAD / WGRAD variables."""
    for name, value in vars(args).items():
        if not name.startswith("fp8_") or value is None:
            continue
        if name == "fp8_override_linear_precision":
            for part, flag in zip(("FPROP", "DGRAD", "WGRAD"), value):
                current_env[f"ACCELERATE_FP8_OVERRIDE_{part}"] = str(flag)
        else:
            current_env[f"ACCELERATE_{name.upper()}"] = str(value)
    return current_env


def prepare_extend_env_parallelism_config(
    args: argparse.Namespace, current_env: dict[str, Any]
) -> dict[str, str]:
    """Write the ``parallelism_config_*`` settings as the ``PARALLELISM_CONFIG_*`` variables
    ``ParallelismConfig`` reads (and ``ACCELERATE_USE_PARALLELISM_CONFIG``); returns ``current_env``."""
    current_env["ACCELERATE_USE_PARALLELISM_CONFIG"] = "true"
    for name, value in vars(args).items():
        if name.startswith("parallelism_config_") and value is not None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            current_env[name.upper()] = text
    return current_env


def prepare_simple_launcher_cmd_env(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The command and environment for one process, run directly.

    Raises:
        ValueError: ``--module`` with ``--no_python``, or an ``mpirun`` host file (hasten starts
            several processes with torchrun).
    """
    if getattr(args, "mpirun_hostfile", None) is not None:
        raise ValueError(
            f"mpirun_hostfile={args.mpirun_hostfile!r}: hasten launches several processes with torchrun, not "
            "mpirun; drop the mpirun settings and pass --num_processes / --num_machines."
        )
    command = _program(args)
    env = _common_environment(args)
    if args.num_processes > 1 or args.num_machines > 1:
        env["MASTER_ADDR"] = args.main_process_ip or "127.0.0.1"
        env["MASTER_PORT"] = str(args.main_process_port or 29500)
    return command, env


def _rendezvous(args: argparse.Namespace) -> None:
    """Resolve torchrun's rendezvous settings on ``args`` (a port of 0 or in use on a single machine
    becomes a free one).

    Raises:
        ConnectionError: the port is in use on the main machine of a multi-machine job.
    """
    if args.main_process_port == 0:
        args.main_process_port = get_free_port()
    elif args.main_process_port is None:
        args.main_process_port = 29500
    main_machine = args.num_machines <= 1 or int(args.machine_rank) == 0
    if main_machine and is_port_in_use(args.main_process_port):
        if args.num_machines > 1:
            raise ConnectionError(
                f"port {args.main_process_port} is in use on this machine, the main one of the job; pass "
                "another "
                "--main_process_port (the same on every machine)."
            )
        chosen = get_free_port()
        warnings.warn(
            f"port {args.main_process_port} is in use; this single-machine launch takes the free port "
            f"{chosen} "
            "instead (pass --main_process_port to choose, or 0 for any free port).",
            UserWarning,
            stacklevel=3,
        )
        args.main_process_port = chosen
    args.nproc_per_node = str(args.num_processes // args.num_machines)
    args.nnodes = str(args.num_machines)
    args.node_rank = int(args.machine_rank)
    address = args.main_process_ip or "127.0.0.1"
    if args.num_machines > 1 and not getattr(args, "same_network", False):
        args.rdzv_endpoint = f"{address}:{args.main_process_port}"
    args.master_addr, args.master_port = address, str(args.main_process_port)


def prepare_multi_gpu_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment for several processes started by torchrun; resolves the rendezvous on ``args``
    (see the module docstring).

    Raises:
        ValueError: ``--module`` with ``--no_python``.
        ConnectionError: the rendezvous port is taken on the main machine of a multi-machine job.
    """
    _program(args)  # refuses --module with --no_python before anything starts
    _rendezvous(args)
    return _common_environment(args)


def env_var_path_add(env_var_name: str, path_to_add: str) -> str:
    """The value of the path list ``env_var_name`` (e.g. ``PYTHONPATH``) with ``path_to_add`` appended;
    the caller sets it."""
    paths = [path for path in os.environ.get(env_var_name, "").split(os.pathsep) if path]
    return os.pathsep.join([*paths, str(path_to_add)])


def _deepspeed_command(args: argparse.Namespace) -> list[str]:
    """``deepspeed --hostfile ...``: DeepSpeed's launcher for machines it reaches itself.

    Raises:
        ValueError: no host file, or ``nossh`` with a DeepSpeed older than 0.14.5.
    """
    from hasten.utils.versions import compare_versions

    launcher = args.deepspeed_multinode_launcher
    if not getattr(args, "deepspeed_hostfile", None):
        raise ValueError(
            f"--deepspeed_multinode_launcher={launcher} starts the processes on each machine itself and "
            "needs "
            "--deepspeed_hostfile (one line per machine: 'host slots=N')."
        )
    command = ["deepspeed", "--hostfile", str(args.deepspeed_hostfile)]
    if launcher == "nossh":
        if compare_versions("deepspeed", "<", "0.14.5"):
            raise ValueError(
                "--deepspeed_multinode_launcher=nossh needs DeepSpeed >= 0.14.5; upgrade DeepSpeed"
            )
        command += ["--node_rank", str(args.machine_rank), "--no_ssh"]
    else:
        command += ["--no_local_rank", "--launcher", str(launcher)]
    if getattr(args, "deepspeed_exclusion_filter", None) is not None:
        command += ["--exclude", str(args.deepspeed_exclusion_filter)]
    elif getattr(args, "deepspeed_inclusion_filter", None) is not None:
        command += ["--include", str(args.deepspeed_inclusion_filter)]
    else:
        command += ["--num_gpus", str(args.num_processes // args.num_machines)]
    if args.main_process_ip:
        command += ["--master_addr", str(args.main_process_ip)]
    command += ["--master_port", str(args.main_process_port)]
    if getattr(args, "module", False):
        command.append("--module")
    elif getattr(args, "no_python", False):
        command.append("--no_python")
    return [*command, args.training_script, *args.training_script_args]


def prepare_deepspeed_cmd_env(args: argparse.Namespace) -> tuple[list[str] | None, dict[str, str]]:
    """The command (``None``: torchrun's, from :func:`torchrun_command`) and environment for DeepSpeed.

    Several machines with a launcher other than ``standard`` use ``deepspeed --hostfile``; otherwise
    torchrun starts the processes, as without DeepSpeed.

    Raises:
        ValueError: an unknown multi-machine launcher, or what :func:`_deepspeed_command` refuses.
    """
    _program(args)
    launcher = getattr(args, "deepspeed_multinode_launcher", None) or DEEPSPEED_MULTINODE_LAUNCHERS[0]
    if launcher not in DEEPSPEED_MULTINODE_LAUNCHERS:
        raise ValueError(
            f"--deepspeed_multinode_launcher={launcher!r} is not a DeepSpeed launcher; expected one of "
            f"{DEEPSPEED_MULTINODE_LAUNCHERS}."
        )
    args.deepspeed_multinode_launcher = launcher
    _rendezvous(args)
    command = _deepspeed_command(args) if args.num_machines > 1 and launcher != "standard" else None
    env = _common_environment(args)
    env["ACCELERATE_USE_DEEPSPEED"] = "true"
    env["PYTHONPATH"] = env_var_path_add("PYTHONPATH", os.path.abspath("."))
    fields = getattr(args, "deepspeed_fields_from_accelerate_config", None)
    if fields:
        env["ACCELERATE_CONFIG_DS_FIELDS"] = str(fields).lower()
    return command, env


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """``python -m torch.distributed.run ...`` for the rendezvous a ``prepare_*`` function resolved."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={args.nproc_per_node}",
        f"--nnodes={args.nnodes}",
        f"--max_restarts={getattr(args, 'max_restarts', 0) or 0}",
        f"--monitor_interval={getattr(args, 'monitor_interval', 0.1) or 0.1}",
    ]
    backend = getattr(args, "rdzv_backend", None) or "static"
    if backend == "static":
        command += [
            f"--node_rank={args.node_rank}",
            f"--master_addr={args.master_addr}",
            f"--master_port={args.master_port}",
            "--rdzv_backend=static",
        ]
    else:
        endpoint = getattr(args, "rdzv_endpoint", None) or f"{args.master_addr}:{args.master_port}"
        command += [f"--rdzv_backend={backend}", f"--rdzv_endpoint={endpoint}", "--rdzv_id=hasten"]
    for option in ("tee", "log_dir"):
        if getattr(args, option, None) is not None:
            command.append(f"--{option}={getattr(args, option)}")
    if getattr(args, "no_python", False):
        command.append("--no_python")
    elif getattr(args, "module", False):
        command.append("--module")
    return [*command, args.training_script, *args.training_script_args]


def prepare_tpu(
    args: argparse.Namespace, current_env: dict[str, str], pod: bool = False
) -> tuple[argparse.Namespace, dict[str, str]]:
    """The TPU variables (bf16 through XLA, debug mode) added to ``current_env``; for a pod, the VM
    and TPU names copied to the names ``torch_xla``'s pod launcher reads."""
    from hasten.utils.imports import is_torch_xla_available

    if getattr(args, "mixed_precision", None) == "bf16" and is_torch_xla_available(check_is_tpu=True):
        current_env["XLA_DOWNCAST_BF16" if getattr(args, "downcast_bf16", False) else "XLA_USE_BF16"] = "1"
    if getattr(args, "debug", False):
        current_env["ACCELERATE_DEBUG_MODE"] = "true"
    if pod:
        args.vm = getattr(args, "tpu_vm", None)
        args.tpu = getattr(args, "tpu_name", None)
    return args, current_env


class PrepareForLaunch:
    """``launcher`` made ready to run as process ``index`` of a group started by
    ``torch.multiprocessing`` (``start_processes`` calls it with the index first).

    Args:
        launcher: the function to run.
        distributed_type: a ``DistributedType``; the ``MULTI_*`` types set ``LOCAL_RANK`` and ``RANK``
            (from ``NPROC`` and ``NODE_RANK``) for ``torch.distributed``.
        debug: form a gloo group through the file ``ACCELERATE_DEBUG_RDV_FILE`` of ``WORLD_SIZE`` ranks.
    """

    def __init__(
        self, launcher: Callable[..., Any], distributed_type: Any = "NO", debug: bool = False
    ) -> None:
        self.launcher = launcher
        self.distributed_type = DistributedType.parse(distributed_type, "distributed_type")
        self.debug = debug

    def __call__(self, index: int, *args: Any) -> None:
        if self.debug:
            import torch.distributed as dist

            world_size = int(os.environ["WORLD_SIZE"])
            store = dist.FileStore(os.environ["ACCELERATE_DEBUG_RDV_FILE"], world_size)
            dist.init_process_group("gloo", rank=index, store=store, world_size=world_size)
        elif self.distributed_type.value.startswith("MULTI_"):
            os.environ["LOCAL_RANK"] = str(index)
            processes = int(os.environ.get("NPROC", 1))
            os.environ["RANK"] = str(processes * int(os.environ.get("NODE_RANK", 0)) + index)
        os.environ["FORK_LAUNCHED"] = "1"
        self.launcher(*args)


def _hyperparameters(arguments: list[str]) -> dict[str, Any]:
    """The script's ``--name value`` arguments as SageMaker hyperparameters (numbers and booleans typed).

    Raises:
        ValueError: a flag without a value (SageMaker passes every hyperparameter as ``--name value``).
    """
    result: dict[str, Any] = {}
    for index, argument in enumerate(arguments):
        if not argument.startswith("-"):
            continue
        following = arguments[index + 1] if index + 1 < len(arguments) else None
        if following is None or following.startswith("-"):
            raise ValueError(
                f"script argument {argument} has no value; SageMaker passes hyperparameters as '--name "
                "value', "
                "so give store_true flags an explicit value (e.g. '--flag True')."
            )
        value: Any = following
        if following in ("True", "False"):
            value = following == "True"
        else:
            try:
                number = float(following)
                value = int(number) if number.is_integer() and "." not in following else number
            except ValueError:
                pass
        result[argument.lstrip("-").replace("-", "_")] = value
    return result


def _tab_separated(path: str) -> list[list[str]]:
    """The rows of a tab-separated file after its header line."""
    return [line.rstrip("\n").split("\t") for line in Path(path).read_text().splitlines()[1:] if line.strip()]


def prepare_sagemager_args_inputs(
    sagemaker_config: SageMakerConfig, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, str] | None]:
    """The arguments of a SageMaker ``HuggingFace`` estimator for this launch, and its input channels.

    Sets ``AWS_DEFAULT_REGION`` (and the profile or keys) in this process, for the SageMaker SDK.

    Raises:
        OSError: neither an AWS profile nor access keys.
        ValueError: the script is not a ``.py`` file, or a script flag has no value.
    """
    os.environ["AWS_DEFAULT_REGION"] = sagemaker_config.region
    if sagemaker_config.profile is not None:
        os.environ["AWS_PROFILE"] = sagemaker_config.profile
    elif getattr(args, "aws_access_key_id", None) and getattr(args, "aws_secret_access_key", None):
        os.environ["AWS_ACCESS_KEY_ID"] = args.aws_access_key_id
        os.environ["AWS_SECRET_ACCESS_KEY"] = args.aws_secret_access_key
    else:
        raise OSError("SageMaker needs credentials: set `profile` in the config, or pass the AWS access keys")
    script = Path(args.training_script)
    if script.suffix != ".py":
        raise ValueError(f"the training script must be a Python file for SageMaker, not {script.name!r}")
    environment = {
        **launch_environment(args),
        "ACCELERATE_USE_SAGEMAKER": "true",
        "ACCELERATE_SAGEMAKER_DISTRIBUTED_TYPE": sagemaker_config.distributed_type.value,
    }
    distributed = sagemaker_config.distributed_type.value == "DATA_PARALLEL"
    inputs = (
        {row[0]: row[1].strip() for row in _tab_separated(sagemaker_config.sagemaker_inputs_file)}
        if sagemaker_config.sagemaker_inputs_file
        else None
    )
    metrics = (
        [
            {"Name": row[0], "Regex": row[1].strip()}
            for row in _tab_separated(sagemaker_config.sagemaker_metrics_file)
        ]
        if sagemaker_config.sagemaker_metrics_file
        else None
    )
    estimator = {
        "image_uri": sagemaker_config.image_uri,
        "entry_point": script.name,
        "source_dir": str(script.parent) if str(script.parent) else ".",
        "role": sagemaker_config.iam_role_name,
        "transformers_version": sagemaker_config.transformers_version,
        "pytorch_version": sagemaker_config.pytorch_version,
        "py_version": sagemaker_config.py_version,
        "base_job_name": sagemaker_config.base_job_name,
        "instance_count": sagemaker_config.num_machines,
        "instance_type": sagemaker_config.ec2_instance_type,
        "debugger_hook_config": False,
        "distribution": {"smdistributed": {"dataparallel": {"enabled": True}}} if distributed else None,
        "hyperparameters": _hyperparameters(list(args.training_script_args)),
        "environment": environment,
        "metric_definitions": metrics,
    }
    if sagemaker_config.additional_args is not None:
        estimator = merge_dicts(sagemaker_config.additional_args, estimator)
    return estimator, inputs
