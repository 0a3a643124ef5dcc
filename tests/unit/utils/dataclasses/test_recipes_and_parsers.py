"""FP8 recipes (TransformerEngine, MS-AMP, torchao), DeepSpeed sequence parallelism, Megatron-LM's
model-config parsers (against Accelerate's) and torchao FP8 conversion."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from hasten.big_modeling import init_empty_weights
from hasten.utils.ao import (
    convert_model_to_fp8_ao,
    filter_first_and_last_linear_layers,
    filter_linear_layers,
    find_first_last_linear_layers,
    has_ao_layers,
)
from hasten.utils.dataclasses import (
    AORecipeKwargs,
    DeepSpeedSequenceParallelConfig,
    EnumWithContains,
    MegatronLMPlugin,
    MSAMPRecipeKwargs,
    PrecisionType,
    TERecipeKwargs,
    add_model_config_to_megatron_parser,
    parse_bert_config,
    parse_glm4_moe_config,
    parse_gpt2_config,
    parse_llama_config,
    parse_t5_config,
)
from hasten.utils.dataclasses.plugins.megatron_models import MODEL_CONFIGS_TO_MEGATRON_PARSERS
from hasten.utils.environment import patch_environment
from hasten.utils.errors import ConfigurationError


def test_te_recipe_defaults_environment_and_validation() -> None:
    recipe = TERecipeKwargs()
    assert (recipe.fp8_format, recipe.amax_history_len, recipe.margin) == ("HYBRID", 1024, 0)
    assert recipe.override_linear_precision == (False, False, False) and recipe.to_kwargs() == {}
    with patch_environment(ACCELERATE_FP8_FORMAT="E4M3", ACCELERATE_FP8_OVERRIDE_WGRAD="1"):
        recipe = TERecipeKwargs()
    assert recipe.fp8_format == "E4M3" and recipe.override_linear_precision == (False, False, True)
    with pytest.raises(ConfigurationError, match=r"amax_compute_algo='mean'"):
        TERecipeKwargs(amax_compute_algo="mean")


def test_msamp_recipe() -> None:
    assert MSAMPRecipeKwargs().opt_level == "O2"
    with patch_environment(ACCELERATE_FP8_OPT_LEVEL="O1"):
        assert MSAMPRecipeKwargs().opt_level == "O1"
    with pytest.raises(ConfigurationError, match=r"opt_level='O3'"):
        MSAMPRecipeKwargs(opt_level="O3")


def test_ao_recipe_builds_torchaos_config() -> None:
    pytest.importorskip("torchao")
    recipe = AORecipeKwargs()
    assert recipe.config.pad_inner_dim and recipe.config.enable_fsdp_float8_all_gather
    with patch_environment(ACCELERATE_FP8_PAD_INNER_DIM="false"):
        assert not AORecipeKwargs().config.pad_inner_dim
    with pytest.raises(ConfigurationError, match=r"module_filter_func=3 must be a function"):
        AORecipeKwargs(module_filter_func=3)  # type: ignore[arg-type]


def test_sequence_parallel_config() -> None:
    config = DeepSpeedSequenceParallelConfig(sp_attn_implementation="sdpa")
    assert (config.sp_seq_length, config.sp_seq_length_is_variable) == (None, True)
    with patch_environment(
        PARALLELISM_CONFIG_SP_SEQ_LENGTH_IS_VARIABLE="false", PARALLELISM_CONFIG_SP_SEQ_LENGTH="4096"
    ):
        assert DeepSpeedSequenceParallelConfig().sp_seq_length == 4096
    assert DeepSpeedSequenceParallelConfig(sp_attn_implementation="kernels-community/flash-attn2")
    with pytest.raises(ConfigurationError, match=r"sp_seq_length_is_variable=False needs sp_seq_length"):
        DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=False)
    with pytest.raises(ConfigurationError, match=r"'eager' and 'flex_attention' are not supported"):
        DeepSpeedSequenceParallelConfig(sp_attn_implementation="eager")
    with pytest.raises(ConfigurationError, match=r"sp_attn_implementation='fast' is not an attention"):
        DeepSpeedSequenceParallelConfig(sp_attn_implementation="fast")


def test_enum_with_contains() -> None:
    assert type(PrecisionType) is EnumWithContains
    assert "bf16" in PrecisionType and PrecisionType.FP16 in PrecisionType and "fp64" not in PrecisionType


# --- Megatron-LM parsers, against Accelerate's --------------------------------------------------------


def _models() -> list[tuple[Any, Any, dict[str, torch.Tensor] | None]]:
    transformers = pytest.importorskip("transformers")
    small = {"vocab_size": 32}
    with init_empty_weights():
        return [
            (
                parse_bert_config,
                transformers.BertForMaskedLM(
                    transformers.BertConfig(
                        num_hidden_layers=2,
                        hidden_size=16,
                        num_attention_heads=2,
                        intermediate_size=32,
                        **small,
                    )
                ),
                None,
            ),
            (
                parse_gpt2_config,
                transformers.GPT2LMHeadModel(
                    transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, **small)
                ),
                {"input_ids": torch.zeros(1, 12, dtype=torch.long)},
            ),
            (
                parse_t5_config,
                transformers.T5ForConditionalGeneration(
                    transformers.T5Config(num_layers=2, d_model=16, num_heads=2, d_kv=8, d_ff=32, **small)
                ),
                {
                    "input_ids": torch.zeros(1, 7, dtype=torch.long),
                    "labels": torch.zeros(1, 5, dtype=torch.long),
                },
            ),
            (
                parse_llama_config,
                transformers.LlamaForCausalLM(
                    transformers.LlamaConfig(
                        num_hidden_layers=2,
                        hidden_size=16,
                        num_attention_heads=2,
                        intermediate_size=32,
                        **small,
                    )
                ),
                None,
            ),
            (
                parse_glm4_moe_config,
                transformers.Glm4MoeForCausalLM(
                    transformers.Glm4MoeConfig(
                        num_hidden_layers=2,
                        hidden_size=16,
                        num_attention_heads=2,
                        num_key_value_heads=1,
                        head_dim=8,
                        intermediate_size=32,
                        moe_intermediate_size=8,
                        n_routed_experts=4,
                        num_experts_per_tok=2,
                        first_k_dense_replace=1,
                        **small,
                    )
                ),
                {"input_ids": torch.zeros(1, 9, dtype=torch.long)},
            ),
        ]


def test_megatron_parsers_fill_what_accelerates_fill() -> None:
    accelerate_dataclasses = pytest.importorskip("accelerate.utils.dataclasses")
    for parser, model, batch in _models():
        ours, theirs = MegatronLMPlugin(), accelerate_dataclasses.MegatronLMPlugin()
        before_ours, before_theirs = (
            dict(ours.megatron_lm_default_args),
            dict(theirs.megatron_lm_default_args),
        )
        parser(ours, model, batch)
        try:
            getattr(accelerate_dataclasses, parser.__name__)(theirs, model, batch)
        except AttributeError as error:  # Accelerate reads rope settings transformers 5 moved
            assert parser is parse_glm4_moe_config, error
            continue
        added = {k: v for k, v in ours.megatron_lm_default_args.items() if before_ours.get(k) != v}
        their_added = {k: v for k, v in theirs.megatron_lm_default_args.items() if before_theirs.get(k) != v}
        assert added == their_added, parser.__name__
        assert (ours.seq_length, ours.encoder_seq_length, ours.decoder_seq_length) == (
            theirs.seq_length,
            theirs.encoder_seq_length,
            theirs.decoder_seq_length,
        )


def test_glm4_moe_parser_reads_transformers_5_rope_parameters() -> None:
    parser, model, batch = _models()[-1]
    plugin = MegatronLMPlugin()
    parser(plugin, model, batch)
    args = plugin.megatron_lm_default_args
    assert args["seq_length"] == 9 and args["num_experts"] == 4 and args["moe_layer_freq"] == [0, 1]
    assert args["rotary_percent"] == model.config.rope_parameters["partial_rotary_factor"]
    assert args["rotary_base"] == model.config.rope_parameters["rope_theta"]
    model.config.rope_parameters = {}
    with pytest.raises(
        ValueError, match=r"has no 'rope_theta', neither as an attribute nor in rope_parameters"
    ):
        parser(MegatronLMPlugin(), model, batch)


def test_bert_parser_prefers_the_encoder_length() -> None:
    parser, model, _ = _models()[0]
    plugin = MegatronLMPlugin(seq_length=64, encoder_seq_length=32)
    with pytest.warns(UserWarning, match=r"Both `seq_length` and `encoder_seq_length` are set"):
        parser(plugin, model, None)
    assert plugin.megatron_lm_default_args["seq_length"] == 32
    assert plugin.megatron_lm_default_args["pretraining_flag"] is True  # a masked-LM model


def test_custom_parsers_register_by_model_type() -> None:
    @add_model_config_to_megatron_parser("hasten-test-model")
    def parse_mine(megatron_lm_plugin: Any, model: Any, batch_data: Any) -> None:
        megatron_lm_plugin.megatron_lm_default_args["num_layers"] = model.layers

    try:
        assert MODEL_CONFIGS_TO_MEGATRON_PARSERS["hasten-test-model"] is parse_mine
        plugin = MegatronLMPlugin()
        parse_mine(plugin, type("Model", (), {"layers": 3})(), None)
        assert plugin.megatron_lm_default_args["num_layers"] == 3
    finally:
        del MODEL_CONFIGS_TO_MEGATRON_PARSERS["hasten-test-model"]


# --- torchao FP8 conversion -------------------------------------------------------------------------


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 48), nn.Linear(48, 10)
    )


def test_linear_layer_filters() -> None:
    model = _mlp()
    assert find_first_last_linear_layers(model) == ("0", "4")
    assert find_first_last_linear_layers(nn.ReLU()) == (None, None)
    assert filter_linear_layers(model[2], "2", ["0", "4"])
    assert not filter_linear_layers(model[0], "0", ["0", "4"])
    assert not filter_linear_layers(model[4], "4", [])  # 10 outputs: not a multiple of 16
    assert filter_first_and_last_linear_layers(model[2], "2")


def test_convert_model_to_fp8_ao_keeps_the_first_and_last_layers() -> None:
    pytest.importorskip("torchao")
    model = _mlp()
    x = torch.randn(16, 32)
    reference = model(x)
    assert not has_ao_layers(model)
    convert_model_to_fp8_ao(model)
    kinds = [type(module).__name__ for module in model]
    assert kinds == ["Linear", "ReLU", "Float8Linear", "Float8Linear", "Linear"]
    assert has_ao_layers(model)
    torch.testing.assert_close(model(x), reference, atol=0.2, rtol=0.2)  # FP8 matmuls, close to fp32
