"""`hasten env`, `hasten config default|update` and `hasten estimate-memory`, run as users run them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml


def _hasten(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "PYTEST_"))}
    return subprocess.run(
        [sys.executable, "-m", "hasten", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "HF_HOME": str(home), "COLUMNS": "200"},
    )


def test_help_lists_every_subcommand(tmp_path: Path) -> None:
    result = _hasten(tmp_path, "--help")
    assert result.returncode == 0
    assert all(name in result.stdout for name in ("env", "config", "launch", "estimate-memory"))
    assert "--fsdp_sharding_strategy" in _hasten(tmp_path, "launch", "--help").stdout


def test_config_default_then_env_then_update(tmp_path: Path) -> None:
    written = _hasten(tmp_path, "config", "default", "--mixed_precision", "bf16")
    assert written.returncode == 0, written.stderr
    path = tmp_path / "accelerate" / "default_config.yaml"
    assert yaml.safe_load(path.read_text())["mixed_precision"] == "bf16"
    assert _hasten(tmp_path, "config", "default").returncode == 1  # never overwrites
    report = _hasten(tmp_path, "env").stdout
    assert f"- PyTorch version: {torch.__version__}" in report and "- Python version:" in report
    assert "- mixed_precision: bf16" in report and "System RAM" in report
    old = tmp_path / "old.json"
    old.write_text(
        json.dumps(
            {
                "distributed_type": "FSDP",
                "fp16": True,
                "fsdp_config": {"fsdp_backward_prefetch_policy": "BACKWARD_PRE"},
            }
        )
    )
    assert _hasten(tmp_path, "config", "update", "--config_file", str(old)).returncode == 0
    updated = json.loads(old.read_text())
    assert updated["mixed_precision"] == "fp16" and "fp16" not in updated and updated["num_machines"] == 1
    assert (
        updated["fsdp_config"] == {"fsdp_backward_prefetch": "BACKWARD_PRE"}
        and updated["distributed_type"] == "FSDP"
    )
    missing = _hasten(tmp_path, "config", "update", "--config_file", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "no config file at" in missing.stderr


def build_small() -> torch.nn.Module:
    """A factory for estimate-memory's `module:factory` form (1M + 1k float32 parameters)."""
    return torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 1, bias=False))


def test_estimate_memory_from_a_factory(tmp_path: Path) -> None:
    result = _hasten(
        tmp_path, "estimate-memory", "tests.commands.test_cli:build_small", "--dtypes", "float32", "int4"
    )
    assert result.returncode == 0, result.stderr
    assert "float32" in result.stdout and "3.82 MB" in result.stdout  # 1,001,001 params x 4 bytes
    assert "15.29 MB" in result.stdout  # training with Adam, 4x
    assert "488.77 KB" in result.stdout  # int4
    bad = _hasten(tmp_path, "estimate-memory", "no_such_module:build")
    assert bad.returncode == 2 and "cannot load 'no_such_module:build'" in bad.stderr


def test_estimate_memory_from_a_transformers_config(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000)
    config.save_pretrained(tmp_path / "gpt2-tiny")
    result = _hasten(tmp_path, "estimate-memory", str(tmp_path / "gpt2-tiny"))
    assert result.returncode == 0, result.stderr
    assert "GPT2Model" in result.stdout and "int8" in result.stdout


def test_estimate_parser_and_gather_data_as_accelerate_names_them(tmp_path: Path) -> None:
    from hasten.commands.estimate import estimate_command_parser, gather_data

    args = estimate_command_parser().parse_args(
        ["tests.commands.test_cli:build_small", "--dtypes", "float32", "int4"]
    )
    rows = gather_data(args)
    parameters = sum(p.numel() for p in build_small().parameters())
    assert [row[0] for row in rows] == ["float32", "int4"]
    assert rows[0][2] == parameters * 4 and rows[0][3] == parameters * 16  # training: 4 x the weights
    assert rows[1][2] == parameters * 0.5 and rows[1][3] == -1  # int4 is not trained
    timm = estimate_command_parser().parse_args(["resnet18", "--library_name", "timm"])
    if importlib.util.find_spec("timm") is not None:
        assert gather_data(timm)[0][2] > 40_000_000  # resnet18, 11.7M parameters in float32
    else:
        with pytest.raises(ImportError, match="needs the optional package 'timm'"):
            gather_data(timm)
