"""DeepSpeedPlugin: fields from arguments and ACCELERATE_DEEPSPEED_*, configs from dicts, files and JSON text,
"auto" filling, mismatch errors, and DeepSpeed's own config object built from the result."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from hasten.utils.dataclasses import DeepSpeedPlugin, HfDeepSpeedConfig
from hasten.utils.environment import patch_environment
from hasten.utils.errors import ConfigurationError


def test_defaults_build_a_zero2_config() -> None:
    plugin = DeepSpeedPlugin()
    assert (plugin.zero_stage, plugin.gradient_accumulation_steps, plugin.gradient_clipping) == (
        2,
        "auto",
        "auto",
    )
    config = plugin.deepspeed_config
    assert config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "none", "nvme_path": None}
    assert config["train_batch_size"] == "auto" and config["steps_per_print"] == float("inf")
    assert plugin.zero3_init_flag is False and not plugin.selected


def test_environment_fills_unset_fields_and_arguments_win() -> None:
    with patch_environment(
        ACCELERATE_DEEPSPEED_ZERO_STAGE="3",
        ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4",
        ACCELERATE_GRADIENT_CLIPPING="0.5",
        ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu",
        ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="true",
    ):
        plugin = DeepSpeedPlugin()
        explicit = DeepSpeedPlugin(zero_stage=1, gradient_accumulation_steps=2)
    assert (plugin.zero_stage, plugin.gradient_accumulation_steps, plugin.gradient_clipping) == (3, 4, 0.5)
    assert plugin.deepspeed_config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert (
        plugin.zero3_init_flag is True and plugin.hf_ds_config.is_zero3() and plugin.hf_ds_config.is_offload()
    )
    assert (explicit.zero_stage, explicit.gradient_accumulation_steps) == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zero_stage": 5}, r"zero_stage=5 is not a ZeRO stage; expected one of \[0, 1, 2, 3\]"),
        (
            {"offload_param_device": "gpu"},
            r"offload_param_device='gpu' is not valid; expected one of \['none', 'cpu', 'nvme'\]",
        ),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0 must be at least 1"),
        ({"msamp_opt_level": "O3"}, "msamp_opt_level='O3' is not valid"),
        ({"zero3_init_flag": True}, "zero3_init_flag=True needs ZeRO stage 3, but the stage is 2"),
        ({"offload_param_nvme_path": 5}, "offload_param_nvme_path=5 must be a path"),
        ({"enable_msamp": True, "zero_stage": 3}, "enable_msamp=True does not work with zero_stage=3"),
    ],
)
def test_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DeepSpeedPlugin(**kwargs)  # type: ignore[arg-type]


def test_bad_zero_stage_from_the_environment_names_the_variable() -> None:
    with (
        patch_environment(ACCELERATE_DEEPSPEED_ZERO_STAGE="4"),
        pytest.raises(
            ConfigurationError,
            match="environment variable ACCELERATE_DEEPSPEED_ZERO_STAGE=4 is not a ZeRO stage",
        ),
    ):
        DeepSpeedPlugin()


def test_zero3_init_from_the_environment_without_stage3_warns_and_stays_off() -> None:
    with (
        patch_environment(ACCELERATE_DEEPSPEED_ZERO3_INIT="true"),
        pytest.warns(UserWarning, match="ZERO3_INIT"),
    ):
        assert DeepSpeedPlugin(zero_stage=2).zero3_init_flag is False


def test_msamp_is_added_to_the_config() -> None:
    with patch_environment(ACCELERATE_FP8_BACKEND="MSAMP"):
        plugin = DeepSpeedPlugin(zero_stage=1)
    assert plugin.deepspeed_config["msamp"] == {"enabled": True, "opt_level": "O1"}


CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "cpu"}},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
}


def test_config_dict_is_copied_and_auto_values_filled_from_fields() -> None:
    plugin = DeepSpeedPlugin(hf_ds_config=CONFIG, zero_stage=3, gradient_accumulation_steps=2)
    assert CONFIG["zero_optimization"]["stage"] == "auto"  # the caller's dict is untouched
    config = plugin.deepspeed_config
    assert (config["zero_optimization"]["stage"], config["gradient_accumulation_steps"]) == (3, 2)
    assert (plugin.gradient_clipping, plugin.offload_optimizer_device) == (
        1.0,
        "cpu",
    )  # taken from the config
    assert plugin.is_auto("optimizer.params.lr") and plugin.get_value("zero_optimization.stage") == 3


def test_config_from_file_json_text_and_base64(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(CONFIG))
    with patch_environment(ACCELERATE_DEEPSPEED_CONFIG_FILE=str(path)):
        from_env = DeepSpeedPlugin()
    from_text = DeepSpeedPlugin(hf_ds_config=json.dumps(CONFIG))
    from_base64 = DeepSpeedPlugin(hf_ds_config=base64.urlsafe_b64encode(json.dumps(CONFIG).encode()).decode())
    for plugin in (from_env, from_text, from_base64):
        assert plugin.deepspeed_config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
        assert plugin.zero_stage == 2  # "auto" filled from the default field


def test_explicit_field_contradicting_the_config_raises() -> None:
    with pytest.raises(ConfigurationError) as error:
        DeepSpeedPlugin(hf_ds_config=CONFIG, gradient_clipping=0.3, offload_optimizer_device="none")
    message = str(error.value)
    assert "gradient_clipping=0.3 but the config has gradient_clipping=1.0" in message
    assert (
        "offload_optimizer_device='none' but the config has zero_optimization.offload_optimizer.device='cpu'"
        in message
    )


def test_environment_values_yield_to_the_config() -> None:
    with patch_environment(ACCELERATE_GRADIENT_CLIPPING="0.3"):
        assert DeepSpeedPlugin(hf_ds_config=CONFIG).gradient_clipping == 1.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("missing/ds_config.json", "hf_ds_config='missing/ds_config.json': no such file"),
        ("{not json", "is not valid JSON"),
        ("@@@", "is neither an existing file nor JSON text nor base64-encoded JSON"),
        (3, "hf_ds_config=3 is not a DeepSpeed config"),
        ("[1, 2]", "is neither"),
        ({"train_batch_size": 8}, "The DeepSpeed config has no 'zero_optimization' section"),
    ],
)
def test_bad_configs(config: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DeepSpeedPlugin(hf_ds_config=config)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"stage": 7},
            r"DeepSpeed config zero_optimization.stage=7 is not a ZeRO stage; expected one of \[0, 1, 2, 3\]",
        ),
        (
            {"stage": 2, "offload_optimizer": {"device": "gpu"}},
            r"zero_optimization.offload_optimizer.device='gpu' is not valid; "
            r"expected one of \['none', 'cpu', 'nvme'\]",
        ),
        (
            {"stage": 3, "stage3_gather_16bit_weights_on_model_save": "maybe"},
            r"stage3_gather_16bit_weights_on_model_save='maybe' is not a boolean",
        ),
    ],
)
def test_config_values_get_the_checks_arguments_get(config: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DeepSpeedPlugin(hf_ds_config={"zero_optimization": config})
    with pytest.raises(
        ConfigurationError, match=r"DeepSpeed config gradient_accumulation_steps=0 must be at least 1"
    ):
        DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 0})


def test_config_values_are_converted_like_arguments(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": "3", "offload_param": {"device": "CPU"}}}))
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), zero_stage=3)  # "3" in the file agrees with 3
    assert (plugin.zero_stage, plugin.offload_param_device) == (3, "cpu")
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 3 and plugin.hf_ds_config.is_zero3()


def test_config_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text("stage: 2")
    with pytest.raises(ConfigurationError, match="the file is not valid JSON"):
        DeepSpeedPlugin(hf_ds_config=str(path))


def test_config_file_holding_a_list(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigurationError, match="holds a list, not a JSON object"):
        DeepSpeedPlugin(hf_ds_config=str(path))


def test_launcher_fields_clashing_with_a_config_file() -> None:
    with (
        patch_environment(ACCELERATE_CONFIG_DS_FIELDS="zero_stage,mixed_precision"),
        pytest.raises(
            ConfigurationError, match=r"The launch config sets \['mixed_precision', 'zero_stage'\] as well"
        ),
    ):
        DeepSpeedPlugin(hf_ds_config=CONFIG)


def test_training_setup_fills_the_remaining_auto_values() -> None:
    plugin = DeepSpeedPlugin(hf_ds_config=CONFIG, gradient_accumulation_steps=1)
    plugin.deepspeed_config_process(
        must_match=True,
        train_micro_batch_size_per_gpu=4,
        **{"optimizer.params.lr": 1e-3, "gradient_clipping": 1.0},
    )
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    assert plugin.deepspeed_config["optimizer"]["params"]["lr"] == 1e-3


def test_training_setup_mismatch_and_missing_values() -> None:
    plugin = DeepSpeedPlugin(hf_ds_config=CONFIG, gradient_accumulation_steps=1)
    with pytest.raises(ConfigurationError, match=r"- ds gradient_clipping=1.0 vs arg gradient_clipping=2.0"):
        plugin.deepspeed_config_process(
            train_micro_batch_size_per_gpu=4, gradient_clipping=2.0, **{"optimizer.params.lr": 1.0}
        )
    with pytest.raises(
        ConfigurationError,
        match=r"sets 'optimizer.params.lr' to 'auto' but the training set-up gives no value",
    ):
        DeepSpeedPlugin(hf_ds_config=CONFIG, gradient_accumulation_steps=1).deepspeed_config_process(
            train_micro_batch_size_per_gpu=4
        )


def test_mixed_precision() -> None:
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision("bf16")
    assert plugin.deepspeed_config["bf16"] == {"enabled": True} and plugin.deepspeed_config["fp16"] == {
        "enabled": False
    }
    clash = DeepSpeedPlugin(hf_ds_config={**CONFIG, "fp16": {"enabled": True}})
    with pytest.raises(
        ConfigurationError, match="mixed_precision='bf16', but the DeepSpeed config enables fp16"
    ):
        clash.set_mixed_precision("bf16")


def test_select_is_reserved_to_the_state() -> None:
    plugin = DeepSpeedPlugin()
    with pytest.raises(ConfigurationError, match="select_deepspeed_plugin"):
        plugin.select()
    plugin.select(_from_accelerator_state=True)
    assert plugin.selected
    plugin._unselect()
    assert not plugin.selected


def test_hf_deepspeed_config_queries() -> None:
    config = HfDeepSpeedConfig(
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}, "fp16": {"enabled": False}}
    )
    assert config.is_zero3() and config.is_offload() and not config.is_zero2()
    assert (
        config.is_false("fp16.enabled")
        and not config.is_true("fp16.enabled")
        and not config.is_true("bf16.enabled")
    )
    config.del_config_sub_tree("zero_optimization.offload_param")
    assert config.get_value("zero_optimization.offload_param.device") is None
    config.del_config_sub_tree("nothing.here")
    with pytest.raises(ConfigurationError, match=r"has no entry 'nothing.here' to delete"):
        config.del_config_sub_tree("nothing.here", must_exist=True)


def test_deepspeed_builds_its_own_config_object_from_the_plugin() -> None:
    """DeepSpeed's DeepSpeedConfig parses what the plugin produced (no GPU needed for that)."""
    with patch_environment(PYTORCH_NVML_BASED_CUDA_CHECK="1"):  # deepspeed sets it on import
        pytest.importorskip("deepspeed")
        from deepspeed.runtime.config import DeepSpeedConfig

    plugin = DeepSpeedPlugin(zero_stage=3, gradient_clipping=0.5, gradient_accumulation_steps=2)
    plugin.deepspeed_config_process(must_match=True, train_micro_batch_size_per_gpu=4, train_batch_size=8)
    parsed = DeepSpeedConfig(plugin.deepspeed_config, mpu=None)
    assert (parsed.zero_optimization_stage, parsed.gradient_clipping) == (3, 0.5)
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (4, 2)
