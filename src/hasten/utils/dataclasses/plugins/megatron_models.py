"""Model-size arguments for Megatron-LM, read from a transformers model's configuration.

Each parser fills ``megatron_lm_plugin.megatron_lm_default_args`` (layers, hidden size, heads,
vocabulary, sequence length, ...) for one family of models; ``add_model_config_to_megatron_parser``
registers a parser under the ``model_type`` it handles, so users can add their own. The sequence
length comes from the plugin when set, else from ``batch_data``, else from the model's maximum.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

Parser = Callable[[Any, Any, Mapping[str, Any] | None], None]
P = TypeVar("P", bound=Parser)

MODEL_CONFIGS_TO_MEGATRON_PARSERS: dict[str, Parser] = {}
"""``model_type`` substring -> the parser for such models."""


def add_model_config_to_megatron_parser(model_type: str) -> Callable[[P], P]:
    """Decorator: register a parser ``(megatron_lm_plugin, model, batch_data) -> None`` for models whose
    ``config.model_type`` contains ``model_type``."""

    def register(parser: P) -> P:
        MODEL_CONFIGS_TO_MEGATRON_PARSERS[model_type] = parser
        return parser

    return register


def _common(plugin: Any, model: Any, name: str, pretraining: bool, **sizes: Any) -> None:
    plugin.megatron_lm_default_args.update(
        model_type_name=name,
        pretraining_flag=pretraining,
        orig_vocab_size=model.config.vocab_size,
        model_return_dict=model.config.return_dict,
        **sizes,
    )


def _length(batch_data: Mapping[str, Any] | None, key: str, fallback: int) -> int:
    return int(batch_data[key].shape[1]) if batch_data is not None else fallback


def _single_seq_length(
    plugin: Any, preferred: str, batch_data: Mapping[str, Any] | None, fallback: int
) -> int:
    """``seq_length`` for encoder-only and decoder-only models: the plugin's ``preferred`` length
    (``encoder_seq_length`` / ``decoder_seq_length``) wins over ``seq_length``."""
    own = getattr(plugin, preferred)
    if plugin.seq_length is not None and own is not None:
        warnings.warn(
            f"Both `seq_length` and `{preferred}` are set. Using `{preferred}`.", UserWarning, stacklevel=3
        )
    if own is not None:
        plugin.seq_length = own
    elif plugin.seq_length is None:
        plugin.seq_length = _length(batch_data, "input_ids", fallback)
    return int(plugin.seq_length)


@add_model_config_to_megatron_parser("megatron-bert")
def parse_bert_config(megatron_lm_plugin: Any, model: Any, batch_data: Mapping[str, Any] | None) -> None:
    """BERT (masked-LM models pretrain, classifiers do not)."""
    config = model.config
    seq_length = _single_seq_length(
        megatron_lm_plugin, "encoder_seq_length", batch_data, config.max_position_embeddings
    )
    _common(
        megatron_lm_plugin,
        model,
        "bert",
        "maskedlm" in type(model).__name__.lower(),
        seq_length=seq_length,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        num_labels=config.num_labels,
    )


@add_model_config_to_megatron_parser("gpt2")
def parse_gpt2_config(megatron_lm_plugin: Any, model: Any, batch_data: Mapping[str, Any] | None) -> None:
    """GPT-2."""
    config = model.config
    seq_length = _single_seq_length(megatron_lm_plugin, "decoder_seq_length", batch_data, config.n_positions)
    _common(
        megatron_lm_plugin,
        model,
        "gpt",
        True,
        seq_length=seq_length,
        return_logits=megatron_lm_plugin.return_logits,
        tokenizer_type="GPT2BPETokenizer",
        num_layers=config.n_layer,
        hidden_size=config.n_embd,
        num_attention_heads=config.n_head,
        max_position_embeddings=config.n_positions,
    )


@add_model_config_to_megatron_parser("t5")
def parse_t5_config(megatron_lm_plugin: Any, model: Any, batch_data: Mapping[str, Any] | None) -> None:
    """T5 (separate encoder and decoder lengths)."""
    config = model.config
    maximum = getattr(config, "n_positions", 1024)
    if megatron_lm_plugin.encoder_seq_length is None:
        megatron_lm_plugin.encoder_seq_length = _length(batch_data, "input_ids", maximum)
    if megatron_lm_plugin.decoder_seq_length is None:
        megatron_lm_plugin.decoder_seq_length = _length(batch_data, "labels", maximum)
    _common(
        megatron_lm_plugin,
        model,
        "t5",
        True,
        encoder_seq_length=megatron_lm_plugin.encoder_seq_length,
        decoder_seq_length=megatron_lm_plugin.decoder_seq_length,
        num_layers=config.num_layers,
        hidden_size=config.d_model,
        num_attention_heads=config.num_heads,
        max_position_embeddings=maximum,
    )


def _decoder_seq_length(plugin: Any, config: Any, batch_data: Mapping[str, Any] | None) -> int:
    if plugin.seq_length is None:
        declared = getattr(config, "max_sequence_length", None)
        if declared is not None:
            plugin.seq_length = declared
        elif plugin.decoder_seq_length is not None:
            plugin.seq_length = plugin.decoder_seq_length
        else:
            plugin.seq_length = _length(batch_data, "input_ids", config.max_position_embeddings)
    return int(plugin.seq_length)


def _llama_like(
    plugin: Any, model: Any, batch_data: Mapping[str, Any] | None, pretraining: bool, tokenizer: str
) -> None:
    config = model.config
    _common(
        plugin,
        model,
        "gpt",
        pretraining,
        seq_length=_decoder_seq_length(plugin, config, batch_data),
        return_logits=plugin.return_logits,
        tokenizer_type=tokenizer,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
    )


@add_model_config_to_megatron_parser("llama")
def parse_llama_config(megatron_lm_plugin: Any, model: Any, batch_data: Mapping[str, Any] | None) -> None:
    """Llama."""
    _llama_like(megatron_lm_plugin, model, batch_data, True, "Llama2Tokenizer")


@add_model_config_to_megatron_parser("glm4_moe")
def parse_glm4_moe_config(megatron_lm_plugin: Any, model: Any, batch_data: Mapping[str, Any] | None) -> None:
    """GLM-4.5 mixture of experts (rotary embeddings on half the head, sigmoid router)."""
    _llama_like(megatron_lm_plugin, model, batch_data, False, "HuggingFaceTokenizer")
    config = model.config
    megatron_lm_plugin.megatron_lm_default_args.update(
        {
            "kv_channels": config.head_dim,
            "position_embedding_type": "rope",
            "original_model_type": config.model_type,
            "qk_layernorm": config.use_qk_norm,
            "add_bias_linear": False,
            "group_query_attention": True,
            "num_query_groups": config.num_key_value_heads,
            "ffn_hidden_size": config.intermediate_size,
            "add_qkv_bias": True,
            "normalization": "RMSNorm",
            "rotary-percent": 0.5,
            "swiglu": True,
            "moe_ffn_hidden_size": config.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": config.moe_intermediate_size,
            "moe_router_pre_softmax": True,
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "moe_router_bias_update_rate": 0,
            "moe_router_load_balancing_type": "seq_aux_loss",
            "moe_token_dispatcher_type": "alltoall",
            "moe_router_topk": config.num_experts_per_tok,
            "moe_router_topk_scaling_factor": config.routed_scaling_factor,
            "moe_layer_freq": [0] * config.first_k_dense_replace
            + [1] * (config.num_hidden_layers - config.first_k_dense_replace),
            "num_experts": config.n_routed_experts,
            "moe_grouped_gemm": True,
            "moe_router_dtype": "fp32",
            "moe_permute_fusion": True,
            "moe_aux_loss_coeff": 0,
            "rotary_base": _rope(config, "rope_theta"),
            "rope_type": "rope",
            "rotary_percent": _rope(config, "partial_rotary_factor"),
            "norm_epsilon": 1e-3,
            "use_flash_attn": True,
            "eos_token_id": config.eos_token_id,
        }
    )


def _rope(config: Any, name: str) -> Any:
    """A rotary-embedding setting: a config attribute in transformers 4, in ``rope_parameters`` in 5."""
    value = getattr(config, name, None)
    if value is not None:
        return value
    parameters = getattr(config, "rope_parameters", None) or {}
    if name not in parameters:
        raise ValueError(
            f"The model configuration ({type(config).__name__}) has no {name!r}, neither as an attribute nor "
            "in rope_parameters; Megatron-LM needs it for rotary embeddings."
        )
    return parameters[name]
