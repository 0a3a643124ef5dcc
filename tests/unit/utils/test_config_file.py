"""write_basic_config: the same file and keys as Accelerate's, written atomically, never over a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hasten.utils.config_file import default_config_file, write_basic_config
from hasten.utils.environment import patch_environment

KEYS = {
    "compute_environment",
    "debug",
    "distributed_type",
    "downcast_bf16",
    "enable_cpu_affinity",
    "machine_rank",
    "main_training_function",
    "mixed_precision",
    "num_machines",
    "num_processes",
    "rdzv_backend",
    "same_network",
    "tpu_use_cluster",
    "tpu_use_sudo",
    "use_cpu",
}


def test_yaml_on_this_cpu_machine(tmp_path: Path) -> None:
    path = write_basic_config(save_location=tmp_path / "sub" / "config.yaml")
    assert path == tmp_path / "sub" / "config.yaml"
    config = yaml.safe_load(Path(path).read_text())
    assert set(config) == KEYS
    assert config["distributed_type"] == "NO" and config["use_cpu"] is True and config["num_processes"] == 1
    assert config["mixed_precision"] == "no"


def test_json_with_precision(tmp_path: Path) -> None:
    path = write_basic_config(mixed_precision="BF16", save_location=tmp_path / "config.json")
    assert json.loads(Path(path).read_text())["mixed_precision"] == "bf16"


def test_refuses_to_overwrite_and_says_so(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text("keep: me\n")
    with pytest.warns(UserWarning, match=r"already exists at .*config.yaml; it was left unchanged"):
        assert write_basic_config(save_location=target) is False
    assert target.read_text() == "keep: me\n"


def test_a_directory_is_not_a_file_to_write(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"save_location='.*' is a directory; pass the path of the file to write, such as "
        r"'.*default_config.yaml'",
    ):
        write_basic_config(save_location=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_precision(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"mixed_precision='fp32' is not valid; expected one of"):
        write_basic_config(mixed_precision="fp32", save_location=tmp_path / "c.yaml")
    assert not (tmp_path / "c.yaml").exists()


def test_default_location_follows_hf_home(tmp_path: Path) -> None:
    with patch_environment(HF_HOME=str(tmp_path)):
        assert default_config_file() == tmp_path / "accelerate" / "default_config.yaml"
        assert write_basic_config() == tmp_path / "accelerate" / "default_config.yaml"


def test_same_keys_and_values_as_accelerate(tmp_path: Path) -> None:
    accelerate_utils = pytest.importorskip("accelerate.utils")
    accelerate_utils.write_basic_config(save_location=str(tmp_path / "theirs.json"))
    write_basic_config(save_location=tmp_path / "ours.json")
    assert json.loads((tmp_path / "ours.json").read_text()) == json.loads(
        (tmp_path / "theirs.json").read_text()
    )
