"""`hasten launch` for real: torchrun behind it, 1/2/4 processes, two "machines" on one host,
crashes and restarts, and settings resolved from config files and flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hasten.commands.cli import build_parser
from hasten.commands.launch import _check, _from_config
from hasten.utils.environment import patch_environment
from hasten.utils.launch import launch_environment, prepare_multi_gpu_env, torchrun_command
from tests.ranks import free_port

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from hasten import PartialState
    from hasten.utils import gather

    state = PartialState()
    ranks = gather(torch.tensor([state.process_index])).tolist()
    seen = {key: os.environ[key] for key in sorted(os.environ) if key.startswith(("ACCELERATE_", "FSDP_"))}
    if state.is_main_process:
        print(json.dumps({"world": state.num_processes, "ranks": ranks, "args": sys.argv[1:], "env": seen}))
    """
)


def _clean_env(home: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ACCELERATE_", "PYTEST_", "FSDP_"))
    }
    return {**env, "HF_HOME": str(home), "OMP_NUM_THREADS": "1"}


def _launch(
    tmp_path: Path, *options: str, script: str = SCRIPT, timeout: int = 240
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "job.py"
    path.write_text(script)
    return subprocess.run(
        [sys.executable, "-m", "hasten", "launch", *options, str(path), "--lr", "0.1"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_clean_env(tmp_path),
    )


def _report(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_launch_runs_the_script_on_n_processes(tmp_path: Path, processes: int) -> None:
    report = _report(
        _launch(
            tmp_path,
            "--cpu",
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(free_port()),
            "--mixed_precision",
            "bf16",
            "--gradient_accumulation_steps",
            "4",
        )
    )
    assert report["world"] == processes and report["ranks"] == list(range(processes))
    assert report["args"] == ["--lr", "0.1"]
    assert report["env"] == {
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "ACCELERATE_USE_CPU": "true",
    }


def test_two_machines_on_one_host_form_one_job(tmp_path: Path) -> None:
    port = str(free_port())
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    common = [
        sys.executable,
        "-m",
        "hasten",
        "launch",
        "--cpu",
        "--num_processes",
        "4",
        "--num_machines",
        "2",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        port,
    ]
    machines = [
        subprocess.Popen(
            [*common, "--machine_rank", str(rank), str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_clean_env(tmp_path),
        )
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=240) for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], (
        outputs[0][1][-2000:] + outputs[1][1][-2000:]
    )
    report = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert report["world"] == 4 and report["ranks"] == [0, 1, 2, 3]
    assert outputs[1][0].strip() == ""  # rank 0 lives on machine 0


CRASH = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from hasten import PartialState
    from hasten.utils import gather
    state = PartialState()
    gather(torch.ones(1))  # the group is complete and working before anyone fails
    marker = sys.argv[-1]
    if not os.path.exists(marker):
        if state.process_index == 1:
            open(marker, "w").close()
            raise RuntimeError("rank 1 failed on purpose")
        time.sleep(60)  # rank 0 is still working when rank 1 fails; torchrun stops it
    if state.is_main_process:
        print("restart count", os.environ.get("TORCHELASTIC_RESTART_COUNT"))
    """
)


def test_a_crash_fails_the_launch_visibly_and_max_restarts_recovers(tmp_path: Path) -> None:
    failed = _launch(
        tmp_path,
        "--cpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        script=CRASH.replace("sys.argv[-1]", repr(str(tmp_path / "never"))).replace(
            'open(marker, "w").close()', "pass"
        ),
    )
    assert failed.returncode != 0 and "rank 1 failed on purpose" in failed.stderr
    recovered = _launch(
        tmp_path,
        "--cpu",
        "--num_processes",
        "2",
        "--max_restarts",
        "1",
        "--monitor_interval",
        "0.1",
        "--main_process_port",
        str(free_port()),
        script=CRASH.replace("sys.argv[-1]", repr(str(tmp_path / "marker"))),
    )
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    assert "restart count 1" in recovered.stdout


def _args(*argv: str) -> object:
    return build_parser().parse_args(["launch", *argv, "job.py"])


ACCELERATE_CONFIGS = {
    "fsdp.yaml": {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "mixed_precision": "bf16",
        "num_machines": 1,
        "num_processes": 2,
        "use_cpu": True,
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": "Block",
            "fsdp_offload_params": False,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_reshard_after_forward": True,
        },
    },
    "deepspeed.json": {
        "distributed_type": "DEEPSPEED",
        "num_processes": 4,
        "mixed_precision": "fp16",
        "deepspeed_config": {
            "zero_stage": 2,
            "gradient_accumulation_steps": 8,
            "offload_optimizer_device": "cpu",
            "zero3_init_flag": False,
        },
    },
    "dynamo.yaml": {
        "distributed_type": "MULTI_CPU",
        "num_processes": 2,
        "dynamo_config": {
            "dynamo_backend": "INDUCTOR",
            "dynamo_mode": "max-autotune",
            "dynamo_use_fullgraph": True,
        },
    },
    "old.yaml": {
        "distributed_type": "FSDP",
        "fp16": True,
        "fsdp_config": {"fsdp_backward_prefetch_policy": "BACKWARD_PRE"},
    },
}
EXPECTED = {
    "fsdp.yaml": {
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "ACCELERATE_USE_CPU": "true",
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block",
        "FSDP_OFFLOAD_PARAMS": "false",
        "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
        "FSDP_RESHARD_AFTER_FORWARD": "true",
    },
    "deepspeed.json": {
        "ACCELERATE_MIXED_PRECISION": "fp16",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "8",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
    },
    "dynamo.yaml": {
        "ACCELERATE_MIXED_PRECISION": "no",
        "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR",
        "ACCELERATE_DYNAMO_MODE": "max-autotune",
        "ACCELERATE_DYNAMO_USE_FULLGRAPH": "true",
    },
    "old.yaml": {
        "ACCELERATE_MIXED_PRECISION": "fp16",
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_BACKWARD_PREFETCH": "BACKWARD_PRE",
    },
}


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_files_set_the_same_environment(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    content = ACCELERATE_CONFIGS[name]
    path.write_text(json.dumps(content) if name.endswith(".json") else yaml.safe_dump(content))
    args = _args("--config_file", str(path))
    _from_config(args)
    _check(args)
    assert launch_environment(args) == EXPECTED[name]


def test_flags_win_over_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(ACCELERATE_CONFIGS["fsdp.yaml"]))
    args = _args(
        "--config_file",
        str(path),
        "--mixed_precision",
        "no",
        "--fsdp_offload_params",
        "true",
        "--num_processes",
        "4",
        "--num_machines",
        "2",
        "--machine_rank",
        "1",
        "--main_process_ip",
        "10.0.0.1",
    )
    _from_config(args)
    _check(args)
    env = launch_environment(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no" and env["FSDP_OFFLOAD_PARAMS"] == "true"
    prepare_multi_gpu_env(args)
    command = torchrun_command(args)
    assert "--nproc_per_node=2" in command and "--nnodes=2" in command and "--node_rank=1" in command
    assert "--master_addr=10.0.0.1" in command and command[-1] == "job.py"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--use_fsdp", "--use_deepspeed"], "--use_fsdp and --use_deepspeed"),
        (["--num_processes", "3", "--num_machines", "2", "--main_process_ip", "x"], "must divide evenly"),
        (
            ["--num_machines", "2", "--num_processes", "2", "--machine_rank", "2", "--main_process_ip", "x"],
            "--machine_rank=2 must be between 0",
        ),
        (["--num_machines", "2", "--num_processes", "2"], "needs --main_process_ip"),
        (["--cpu", "--mixed_precision", "fp16"], "CPUs autocast to bf16 only"),
    ],
)
def test_conflicting_settings_are_named(tmp_path: Path, argv: list[str], message: str) -> None:
    args = _args(*argv)
    with patch_environment(HF_HOME=str(tmp_path)):  # no default config file
        _from_config(args)
    with pytest.raises(ValueError, match=message):
        _check(args)


def test_unknown_options_and_bad_choices_are_errors(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hasten", "launch", "--num_procs", "2", "x.py"],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path),
    )
    assert result.returncode == 2 and "unrecognized arguments: --num_procs" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "hasten", "launch", "--mixed_precision", "fp64", "x.py"],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path),
    )
    assert result.returncode == 2 and "invalid choice: 'fp64'" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "hasten", "launch", str(tmp_path / "missing.py")],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path),
    )
    assert result.returncode == 2 and "missing.py' does not exist" in result.stderr
