"""`hasten merge-weights`: a DCP checkpoint folder merged into one safetensors (or .bin) file."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hasten.commands.cli import main
from tests.commands.run import hasten


def _checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    weights = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no process group: DCP says it saves as one process
        dcp.save({"model": weights}, checkpoint_id=folder)
    return weights


def test_merge_weights_writes_one_safetensors_file(tmp_path: Path) -> None:
    weights = _checkpoint(tmp_path / "pytorch_model_fsdp_0")
    result = hasten(tmp_path, "merge-weights", str(tmp_path / "pytorch_model_fsdp_0"), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert f"Merged weights written to {tmp_path / 'out' / 'model.safetensors'}" in result.stdout
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged.keys() == weights.keys() and all(torch.equal(merged[k], weights[k]) for k in weights)


def test_merge_weights_options_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _checkpoint(tmp_path / "ckpt" / "pytorch_model_fsdp_0")
    assert main(["merge-weights", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert "couldn't find a valid metadata file" in capsys.readouterr().err
    argv = ["merge-weights", str(tmp_path / "ckpt" / "pytorch_model_fsdp_0"), str(tmp_path / "out")]
    assert main([*argv, "--unsafe_serialization", "--remove_checkpoint_dir"]) == 0
    assert set(torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)) == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
    }
    assert not (tmp_path / "ckpt" / "pytorch_model_fsdp_0").exists()
