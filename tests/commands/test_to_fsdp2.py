"""`hasten to-fsdp2`: FSDP1 launch configs rewritten for FSDP2, lossy changes named, format kept."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import yaml

from hasten.commands.to_fsdp2 import (
    convert_config_to_fsdp2,
    load_config,
    to_fsdp2_command,
    to_fsdp2_command_parser,
)
from tests.commands.run import hasten

FSDP1 = {
    "distributed_type": "FSDP",
    "num_processes": 2,
    "fsdp_config": {
        "fsdp_sharding_strategy": "SHARD_GRAD_OP",
        "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_forward_prefetch": False,
        "fsdp_sync_module_states": True,
        "fsdp_use_orig_params": True,
        "fsdp_offload_params": False,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "Block",
        "fsdp_activation_checkpointing": True,
    },
}
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_reshard_after_forward": False,
    "fsdp_offload_params": False,
    "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_transformer_layer_cls_to_wrap": "Block",
    "fsdp_activation_checkpointing": True,
}


def test_the_command_converts_a_file_and_names_what_it_drops(tmp_path: Path) -> None:
    source, target = tmp_path / "fsdp1.yaml", tmp_path / "fsdp2.yaml"
    source.write_text(yaml.safe_dump(FSDP1))
    result = hasten(tmp_path, "to-fsdp2", "--config_file", str(source), "--output_file", str(target))
    assert result.returncode == 0, result.stderr
    converted = yaml.safe_load(target.read_text())
    assert converted["fsdp_config"] == FSDP2 and converted["num_processes"] == 2
    for key in ("fsdp_backward_prefetch", "fsdp_sync_module_states", "fsdp_use_orig_params"):
        assert f"{key}: " in result.stderr and "does not exist in FSDP2; dropped" in result.stderr
    assert "fsdp_forward_prefetch: False has no FSDP2 equivalent yet; dropped" in result.stderr
    assert yaml.safe_load(source.read_text()) == FSDP1  # the original is untouched without --overwrite


@pytest.mark.parametrize(
    ("strategy", "reshard", "loss"),
    [
        ("FULL_SHARD", True, None),
        (2, False, None),  # SHARD_GRAD_OP by number
        ("HYBRID_SHARD", True, "ParallelismConfig(dp_replicate_size=...)"),
        ("NO_SHARD", False, "FSDP2 always shards"),
    ],
)
def test_sharding_strategies_become_reshard_after_forward(
    strategy: object, reshard: bool, loss: str | None
) -> None:
    config = {"fsdp_config": {"fsdp_sharding_strategy": strategy}}
    if loss is None:
        converted = convert_config_to_fsdp2(config)
    else:
        with pytest.warns(
            UserWarning, match=rf"becomes fsdp_reshard_after_forward: {reshard}; .*{re.escape(loss)}"
        ):
            converted = convert_config_to_fsdp2(config)
    assert converted["fsdp_config"] == {"fsdp_reshard_after_forward": reshard, "fsdp_version": 2}


def test_what_needs_no_conversion_is_left_alone() -> None:
    assert convert_config_to_fsdp2({"distributed_type": "MULTI_CPU"}) == {"distributed_type": "MULTI_CPU"}
    already = {"fsdp_config": {"fsdp_version": 2, "fsdp_reshard_after_forward": True}}
    with pytest.warns(UserWarning, match="already has fsdp_version: 2; nothing converted"):
        assert convert_config_to_fsdp2(already) == already
    as_text = convert_config_to_fsdp2({"fsdp_config": {"fsdp_reshard_after_forward": "false"}})
    assert as_text["fsdp_config"]["fsdp_reshard_after_forward"] is False
    with pytest.raises(ValueError, match=r"fsdp_sharding_strategy: 'HALF_SHARD' is not a sharding strategy"):
        convert_config_to_fsdp2({"fsdp_config": {"fsdp_sharding_strategy": "HALF_SHARD"}})


def _args(*argv: str) -> argparse.Namespace:
    return to_fsdp2_command_parser().parse_args(list(argv))


def test_overwrite_keeps_json_and_bad_requests_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "c.json"
    source.write_text(json.dumps({"fsdp_config": {"fsdp_sharding_strategy": "FULL_SHARD"}}))
    assert to_fsdp2_command(_args("--config_file", str(source), "--overwrite")) == 0
    assert json.loads(source.read_text()) == {
        "fsdp_config": {"fsdp_reshard_after_forward": True, "fsdp_version": 2}
    }
    assert f"FSDP2 config written to {source}" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=r"Config file .*missing\.yaml not found"):
        to_fsdp2_command(_args("--config_file", str(tmp_path / "missing.yaml"), "--overwrite"))
    with pytest.raises(
        ValueError, match="pass --output_file to write the converted config there, or --overwrite"
    ):
        to_fsdp2_command(_args("--config_file", str(source)))
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite to replace it"):
        to_fsdp2_command(_args("--config_file", str(source), "--output_file", str(source)))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty; there is nothing to convert"):
        load_config(str(empty))
