"""hasten.utils.launch: the commands and environments `hasten launch` runs, built from its own parsed
settings; rendezvous ports; DeepSpeed's multi-machine command; SageMaker estimator arguments; and
PrepareForLaunch forming real process groups."""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from hasten.commands.cli import build_parser
from hasten.commands.config.config_args import SageMakerConfig
from hasten.commands.launch import _check, _from_config
from hasten.parallelism_config import ParallelismConfig
from hasten.utils.environment import patch_environment
from hasten.utils.launch import (
    PrepareForLaunch,
    env_var_path_add,
    prepare_deepspeed_cmd_env,
    prepare_extend_env_parallelism_config,
    prepare_multi_gpu_env,
    prepare_sagemager_args_inputs,
    prepare_simple_launcher_cmd_env,
    prepare_tpu,
    setup_fp8_env,
    torchrun_command,
)


def _args(tmp_path: Path, *argv: str, script: str = "job.py") -> argparse.Namespace:
    args = build_parser().parse_args(["launch", *argv, script, "--lr", "1"])
    with patch_environment(HF_HOME=str(tmp_path)):  # no default config file
        _from_config(args)
    _check(args)
    return args


def test_one_process_runs_the_script_directly(tmp_path: Path) -> None:
    command, env = prepare_simple_launcher_cmd_env(
        _args(tmp_path, "--mixed_precision", "bf16", "--gpu_ids", "1", "--num_cpu_threads_per_process", "3")
    )
    assert command == [sys.executable, "job.py", "--lr", "1"]
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and env["OMP_NUM_THREADS"] == "3"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"  # this machine's accelerator type is CUDA's (or none)
    assert env["PATH"] == os.environ["PATH"]  # on top of the current environment
    assert prepare_simple_launcher_cmd_env(_args(tmp_path, "-m"))[0][:3] == [sys.executable, "-m", "job.py"]
    assert prepare_simple_launcher_cmd_env(_args(tmp_path, "--no_python"))[0] == ["job.py", "--lr", "1"]


def test_an_accelerate_namespace_with_mpirun_or_module_and_no_python_is_refused(tmp_path: Path) -> None:
    args = _args(tmp_path)
    args.mpirun_hostfile = "hosts"
    with pytest.raises(
        ValueError, match="mpirun_hostfile='hosts': hasten launches several processes with torchrun"
    ):
        prepare_simple_launcher_cmd_env(args)
    args = _args(tmp_path)
    args.module = args.no_python = True  # an Accelerate namespace can hold both
    with pytest.raises(ValueError, match="--module and --no_python cannot be used together"):
        prepare_multi_gpu_env(args)


def _listening() -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def test_torchrun_rendezvous_and_ports(tmp_path: Path) -> None:
    args = _args(tmp_path, "--num_processes", "4", "--main_process_port", "0")
    env = prepare_multi_gpu_env(args)
    assert args.main_process_port != 0 and env["ACCELERATE_MIXED_PRECISION"] == "no"
    command = torchrun_command(args)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=4" in command and f"--master_port={args.main_process_port}" in command
    with _listening() as taken:
        port = taken.getsockname()[1]
        args = _args(tmp_path, "--num_processes", "2", "--main_process_port", str(port))
        with pytest.warns(UserWarning, match=f"port {port} is in use; .* takes the free port"):
            prepare_multi_gpu_env(args)
        assert args.main_process_port != port
        main_of_two = (
            f"--num_processes 4 --num_machines 2 --main_process_ip 127.0.0.1 --main_process_port {port}"
        )
        args = _args(tmp_path, *main_of_two.split(), "--rdzv_backend", "c10d")
        with pytest.raises(ConnectionError, match=f"port {port} is in use on this machine, the main one"):
            prepare_multi_gpu_env(args)
    second = "--num_processes 4 --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1"
    args = _args(tmp_path, *second.split(), "--rdzv_backend", "c10d")
    prepare_multi_gpu_env(args)  # not the main machine: its port is not checked here
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("2", "2", 1)
    assert "--rdzv_endpoint=10.0.0.1:29500" in torchrun_command(args)


def test_deepspeed_on_one_machine_is_torchrun_and_on_several_its_own_launcher(tmp_path: Path) -> None:
    command, env = prepare_deepspeed_cmd_env(_args(tmp_path, "--use_deepspeed", "--zero_stage", "2"))
    assert command is None  # torchrun, like any other multi-process job
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert env["PYTHONPATH"].split(os.pathsep)[-1] == os.path.abspath(".")
    several = shlex.split(
        "--use_deepspeed --num_processes 8 --num_machines 2 --main_process_ip 10.0.0.1 "
        "--main_process_port 29600 --deepspeed_hostfile hosts"
    )
    command, _ = prepare_deepspeed_cmd_env(_args(tmp_path, *several))
    assert command == shlex.split(
        "deepspeed --hostfile hosts --no_local_rank --launcher pdsh --num_gpus 4 --master_addr 10.0.0.1 "
        "--master_port 29600 job.py --lr 1"
    )
    args = _args(
        tmp_path, *several, "--deepspeed_multinode_launcher", "nossh", "--deepspeed_inclusion_filter", "a"
    )
    assert prepare_deepspeed_cmd_env(args)[0][3:8] == ["--node_rank", "0", "--no_ssh", "--include", "a"]
    args = _args(tmp_path, *several, "--deepspeed_multinode_launcher", "standard")
    assert prepare_deepspeed_cmd_env(args)[0] is None  # standard: torchrun on each machine
    no_hosts = [value for value in several if value not in ("--deepspeed_hostfile", "hosts")]
    with pytest.raises(
        ValueError, match=r"--deepspeed_multinode_launcher=pdsh .* needs --deepspeed_hostfile"
    ):
        prepare_deepspeed_cmd_env(_args(tmp_path, *no_hosts))
    args = _args(tmp_path, *several)
    args.deepspeed_multinode_launcher = "ssh"  # an Accelerate namespace is not checked by choices
    with pytest.raises(ValueError, match="'ssh' is not a DeepSpeed launcher; expected one of"):
        prepare_deepspeed_cmd_env(args)


def test_parallelism_settings_reach_parallelism_config(tmp_path: Path) -> None:
    settings = (
        "--use_parallelism_config --parallelism_config_dp_shard_size 2 --parallelism_config_tp_size 2 "
        "--parallelism_config_cp_comm_strategy alltoall"
    )
    args = _args(tmp_path, *settings.split())
    env = prepare_simple_launcher_cmd_env(args)[1]
    assert env["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true"
    assert env["PARALLELISM_CONFIG_DP_SHARD_SIZE"] == "2" and "PARALLELISM_CONFIG_CP_SIZE" not in env
    written = {key: value for key, value in env.items() if key.startswith("PARALLELISM_CONFIG_")}
    with patch_environment(**written):
        config = ParallelismConfig()
    assert (config.dp_shard_size, config.tp_size, config.total_size) == (2, 2, 4)
    assert prepare_extend_env_parallelism_config(args, {}) == {
        "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
        **written,
    }


def test_a_config_files_parallelism_section_turns_it_on(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("distributed_type: FSDP\nparallelism_config:\n  parallelism_config_tp_size: 2\n")
    args = _args(tmp_path, "--config_file", str(path))
    assert args.use_parallelism_config is True and args.parallelism_config_tp_size == 2


def test_fp8_tpu_and_path_helpers(tmp_path: Path) -> None:
    fp8 = argparse.Namespace(
        fp8_backend="TE", fp8_margin=None, fp8_override_linear_precision=(False, True, False)
    )
    assert setup_fp8_env(fp8, {}) == {
        "ACCELERATE_FP8_BACKEND": "TE",
        "ACCELERATE_FP8_OVERRIDE_FPROP": "False",
        "ACCELERATE_FP8_OVERRIDE_DGRAD": "True",
        "ACCELERATE_FP8_OVERRIDE_WGRAD": "False",
    }
    args = _args(tmp_path, "--mixed_precision", "fp8")
    args.fp8_backend = "TE"
    assert prepare_simple_launcher_cmd_env(args)[1]["ACCELERATE_FP8_BACKEND"] == "TE"
    tpu = argparse.Namespace(mixed_precision="bf16", debug=True, tpu_vm=["vm"], tpu_name="pod")
    tpu, env = prepare_tpu(tpu, {}, pod=True)
    assert env == {"ACCELERATE_DEBUG_MODE": "true"}  # no TPU here: no XLA bf16 variable
    assert (tpu.vm, tpu.tpu) == (["vm"], "pod")
    with patch_environment(HASTEN_TEST_PATH=os.pathsep.join(["/a", "", "/b"])):
        assert env_var_path_add("HASTEN_TEST_PATH", "/c") == os.pathsep.join(["/a", "/b", "/c"])


def _sagemaker(tmp_path: Path, **changes: Any) -> SageMakerConfig:
    fields: dict[str, Any] = {
        "compute_environment": "AMAZON_SAGEMAKER",
        "distributed_type": "DATA_PARALLEL",
        "mixed_precision": "bf16",
        "use_cpu": False,
        "debug": False,
        "ec2_instance_type": "ml.p3.2xlarge",
        "iam_role_name": "role",
        "profile": "team",
        "region": "eu-west-1",
    }
    return SageMakerConfig(**{**fields, **changes})


AWS = ("AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture
def no_aws() -> Any:
    """No AWS variables during the test, and the ones it sets removed afterwards."""
    with patch_environment(**dict.fromkeys(AWS, "unset")):
        for name in AWS:
            del os.environ[name]
        yield


def test_sagemaker_estimator_arguments(tmp_path: Path, no_aws: None) -> None:
    inputs = tmp_path / "inputs.tsv"
    inputs.write_text("channel\tpath\ntrain\ts3://bucket/train\n")
    config = _sagemaker(tmp_path, sagemaker_inputs_file=str(inputs), additional_args={"max_run": 60})
    args = _args(tmp_path, "--mixed_precision", "bf16", script="src/train.py")
    args.training_script_args = ["--lr", "0.5", "--epochs", "3", "--name", "run", "--fast", "True"]
    estimator, channels = prepare_sagemager_args_inputs(config, args)
    assert os.environ["AWS_DEFAULT_REGION"] == "eu-west-1" and os.environ["AWS_PROFILE"] == "team"
    assert (estimator["entry_point"], estimator["source_dir"]) == ("train.py", "src")
    assert estimator["hyperparameters"] == {"lr": 0.5, "epochs": 3, "name": "run", "fast": True}
    assert estimator["distribution"] == {"smdistributed": {"dataparallel": {"enabled": True}}}
    assert estimator["environment"]["ACCELERATE_MIXED_PRECISION"] == "bf16" and estimator["max_run"] == 60
    assert channels == {"train": "s3://bucket/train"} and estimator["metric_definitions"] is None
    args.training_script_args = ["--fast"]
    with pytest.raises(ValueError, match="script argument --fast has no value"):
        prepare_sagemager_args_inputs(config, args)
    with pytest.raises(ValueError, match=r"must be a Python file for SageMaker, not 'train\.sh'"):
        prepare_sagemager_args_inputs(config, _args(tmp_path, script="train.sh"))
    with pytest.raises(OSError, match="SageMaker needs credentials"):
        prepare_sagemager_args_inputs(_sagemaker(tmp_path, profile=None), args)


def _rank_and_world(folder: str) -> None:
    import torch.distributed as dist

    Path(folder, f"{dist.get_rank()}").write_text(f"{dist.get_world_size()} {os.environ['FORK_LAUNCHED']}")


def test_prepare_for_launch_forms_the_debug_group_through_a_file(tmp_path: Path) -> None:
    import torch.multiprocessing as torch_mp

    with patch_environment(WORLD_SIZE="2", ACCELERATE_DEBUG_RDV_FILE=str(tmp_path / "rendezvous")):
        launcher = PrepareForLaunch(_rank_and_world, debug=True)
        torch_mp.start_processes(launcher, args=(str(tmp_path),), nprocs=2, start_method="fork")
    assert sorted(p.read_text() for p in tmp_path.iterdir() if p.name in ("0", "1")) == ["2 1", "2 1"]
    with pytest.raises(ValueError, match="distributed_type"):
        PrepareForLaunch(_rank_and_world, distributed_type="MULTI_TPU")
