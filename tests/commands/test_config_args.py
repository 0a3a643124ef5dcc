"""ClusterConfig / SageMakerConfig / load_config_from_file: config files (YAML and JSON, Accelerate's own
included) read into typed objects and written back; unknown keys and missing files named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hasten.commands.config.config_args import ClusterConfig, SageMakerConfig, load_config_from_file
from hasten.utils.dataclasses.enums import ComputeEnvironment, DistributedType, SageMakerDistributedType
from hasten.utils.environment import patch_environment
from hasten.utils.errors import ConfigurationError


def test_a_cluster_config_round_trips_through_yaml_and_json(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "distributed_type": "FSDP",
                "num_processes": 4,
                "fp16": True,  # an older file
                "dynamo_backend": "INDUCTOR",  # older still
                "fsdp_config": {"fsdp_version": 2},
            }
        )
    )
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.compute_environment is ComputeEnvironment.LOCAL_MACHINE
    assert config.distributed_type is DistributedType.FSDP
    assert (config.mixed_precision, config.num_processes, config.use_cpu) == ("fp16", 4, False)
    assert config.dynamo_config == {"dynamo_backend": "INDUCTOR"} and config.deepspeed_config == {}
    written = config.to_dict()
    assert (
        written["distributed_type"] == "FSDP" and "deepspeed_config" not in written
    )  # empty sections left out
    assert config.distributed_type is DistributedType.FSDP  # to_dict did not change the object
    config.to_json_file(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == written
    config.to_yaml_file(tmp_path / "again.yaml")
    again = ClusterConfig.from_yaml_file(tmp_path / "again.yaml")
    assert again == config and ClusterConfig.from_json_file(tmp_path / "c.json") == config


def test_the_default_file_and_accelerates_basic_config(tmp_path: Path) -> None:
    from accelerate.utils import write_basic_config

    with patch_environment(HF_HOME=str(tmp_path)):
        with pytest.raises(
            FileNotFoundError, match=r"no config file at .*write one with `hasten config default`"
        ):
            load_config_from_file(None)
        write_basic_config(save_location=str(tmp_path / "accelerate" / "default_config.yaml"))
        config = load_config_from_file(None)
    assert isinstance(config, ClusterConfig) and config.num_processes == 1


def test_a_sagemaker_config(tmp_path: Path) -> None:
    path = tmp_path / "sm.json"
    path.write_text(
        json.dumps(
            {
                "compute_environment": "AMAZON_SAGEMAKER",
                "distributed_type": "DATA_PARALLEL",
                "ec2_instance_type": "ml.p3.2xlarge",
                "iam_role_name": "role",
            }
        )
    )
    config = load_config_from_file(str(path))
    assert isinstance(config, SageMakerConfig)
    assert config.distributed_type is SageMakerDistributedType.DATA_PARALLEL
    assert (config.region, config.base_job_name, config.py_version) == (
        "us-east-1",
        "accelerate-sagemaker-1",
        "py38",
    )


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"The passed configuration file `.*nope\.yaml` does not exist"
    ):
        load_config_from_file(str(tmp_path / "nope.yaml"))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"distributed_type": "NO", "num_process": 2}))
    with pytest.raises(ValueError, match=r"unknown keys: 'num_process' \(did you mean 'num_processes'\?\)"):
        load_config_from_file(str(path))
    path.write_text(yaml.safe_dump({"num_processes": 2}))
    with pytest.raises(ValueError, match="A `distributed_type` must be specified"):
        load_config_from_file(str(path))
    path.write_text(yaml.safe_dump({"distributed_type": "MULTI_TPU"}))
    with pytest.raises(ConfigurationError, match="distributed_type"):
        load_config_from_file(str(path))
