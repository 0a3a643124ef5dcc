"""`hasten test`: the end-to-end check, launched for real on 2 processes with FSDP2, and a set-up that
cannot start reported as a failure."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.commands.run import hasten


def _hasten_test(tmp_path: Path, fsdp_version: int) -> subprocess.CompletedProcess[str]:
    """`hasten test` on 2 processes with an FSDP config of ``fsdp_version``."""
    config = {
        "distributed_type": "FSDP",
        "num_processes": 2,
        "use_cpu": True,
        "fsdp_config": {"fsdp_version": fsdp_version, "fsdp_state_dict_type": "SHARDED_STATE_DICT"},
    }
    path = tmp_path / f"fsdp{fsdp_version}.yaml"
    path.write_text(yaml.safe_dump(config))
    return hasten(tmp_path, "test", "--config_file", str(path), timeout=240, OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_hasten_test_passes_on_a_working_setup(tmp_path: Path) -> None:
    result = _hasten_test(tmp_path, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hasten test: 2 process(es), MULTI_CPU, backend gloo" in result.stdout
    for check in ("gather", "broadcast", "reduce", "synchronize_rng_states", "one training step with FSDP2"):
        assert f"ok  {check}" in result.stdout
    assert result.stdout.rstrip().endswith("Test is a success! You are ready for your distributed training!")


def test_hasten_test_reports_a_setup_that_cannot_start(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"distributed_type": "MULTI_CPU", "num_processes": 2, "num_machines": 2}))
    result = hasten(tmp_path, "test", "--config_file", str(path))
    assert result.returncode == 2
    assert "--num_machines > 1 needs --main_process_ip" in result.stderr
    assert "hasten test: the check failed (exit status 2)" in result.stderr
