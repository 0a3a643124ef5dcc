"""Megatron-LM settings: parallel degrees, recomputation, optimizer and schedule, read from ``MEGATRON_LM_*``.

Megatron-LM itself (``megatron-core`` with its CUDA kernels) cannot be installed on a
CPU-only machine, so hasten checks and converts these settings into
``megatron_lm_default_args``, the argument dict Megatron's initialisation takes, but
never runs Megatron in its tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hasten.utils.dataclasses._env import (
    env_field,
    non_negative_int,
    one_of,
    positive_int,
    resolve_fields,
    to_bool,
    to_float,
)
from hasten.utils.errors import ConfigurationError

_P = "MEGATRON_LM_"
_SCHEDULES = ["constant", "linear", "cosine"]


def _flag(name: str, fallback: bool) -> Any:
    return env_field(_P + name, fallback, to_bool)


def _int(name: str, fallback: int | None, parse: Callable[[Any, str], int] = positive_int) -> Any:
    return env_field(_P + name, fallback, parse)


def _dropout(value: Any, name: str) -> float:
    number = to_float(value, name)
    if not 0.0 <= number <= 1.0:
        raise ConfigurationError(f"{name}={value!r} is a probability; it must be between 0.0 and 1.0.")
    return number


@dataclass
class MegatronLMPlugin:
    """Megatron-LM tensor, pipeline, sequence and data parallelism, and its training options.

    Every field left unset that ``accelerate launch`` can set is read from its
    ``MEGATRON_LM_*`` variable. Megatron-LM is not installable on CPU-only machines; the
    plugin validates and converts the settings (``megatron_lm_default_args``) and the
    engine runs where Megatron is installed.
    """

    tp_degree: int | None = _int("TP_DEGREE", 1)
    pp_degree: int | None = _int("PP_DEGREE", 1)
    use_custom_fsdp: bool | None = _flag("USE_CUSTOM_FSDP", False)
    overlap_cpu_optimizer_d2h_h2d: bool | None = _flag("OVERLAP_CPU_OPTIMIZER_D2H_H2D", False)
    no_load_optim: bool | None = _flag("NO_LOAD_OPTIM", False)
    eod_mask_loss: bool | None = _flag("EOD_MASK_LOSS", False)
    no_save_optim: bool | None = _flag("NO_SAVE_OPTIM", False)
    optimizer_cpu_offload: bool | None = _flag("OPTIMIZER_CPU_OFFLOAD", False)
    use_precision_aware_optimizer: bool | None = _flag("USE_PRECISION_AWARE_OPTIMIZER", False)
    decoder_last_pipeline_num_layers: int | None = _int(
        "DECODER_LAST_PIPELINE_NUM_LAYERS", None, non_negative_int
    )
    recompute_granularity: str | None = env_field(
        _P + "RECOMPUTE_GRANULARITY", "full", one_of(["full", "selective"])
    )
    recompute_method: str | None = env_field(_P + "RECOMPUTE_METHOD", "uniform", one_of(["uniform", "block"]))
    recompute_num_layers: int | None = _int("RECOMPUTE_NUM_LAYERS", 1)
    attention_backend: bool | None = _flag("ATTENTION_BACKEND", True)
    expert_model_parallel_size: int | None = _int("EXPERT_MODEL_PARALLEL_SIZE", 1)
    context_parallel_size: int | None = _int("CONTEXT_PARALLEL_SIZE", 2)
    attention_dropout: float | None = env_field(_P + "ATTENTION_DROPOUT", 0.0, _dropout)
    hidden_dropout: float | None = env_field(_P + "HIDDEN_DROPOUT", 0.0, _dropout)
    attention_softmax_in_fp32: bool | None = _flag("ATTENTION_SOFTMAX_IN_FP32", True)
    expert_tensor_parallel_size: int | None = _int("EXPERT_TENSOR_PARALLEL_SIZE", 1)
    calculate_per_token_loss: bool | None = _flag("CALCULATE_PER_TOKEN_LOSS", True)
    use_rotary_position_embeddings: bool | None = _flag("USE_ROTARY_POSITION_EMBEDDINGS", True)
    num_micro_batches: int | None = _int("NUM_MICRO_BATCHES", 1)
    gradient_clipping: float | None = env_field(_P + "GRADIENT_CLIPPING", 1.0, to_float)
    sequence_parallelism: bool | None = _flag("SEQUENCE_PARALLELISM", False)
    recompute_activations: bool | None = _flag("RECOMPUTE_ACTIVATIONS", False)
    use_distributed_optimizer: bool | None = _flag("USE_DISTRIBUTED_OPTIMIZER", False)
    pipeline_model_parallel_split_rank: int | None = None
    num_layers_per_virtual_pipeline_stage: int | None = None
    is_train_batch_min: bool = True
    train_iters: int | None = None
    train_samples: int | None = None
    weight_decay_incr_style: str = "constant"
    start_weight_decay: float | None = None
    end_weight_decay: float | None = None
    lr_decay_style: str = "linear"
    lr_decay_iters: int | None = None
    lr_decay_samples: int | None = None
    lr_warmup_iters: int | None = None
    lr_warmup_samples: int | None = None
    lr_warmup_fraction: float | None = None
    min_lr: float = 0
    consumed_samples: list[int] | None = None
    no_wd_decay_cond: Callable[..., Any] | None = None
    scale_lr_cond: Callable[..., Any] | None = None
    lr_mult: float = 1.0
    megatron_dataset_flag: bool = False
    seq_length: int | None = None
    encoder_seq_length: int | None = None
    decoder_seq_length: int | None = None
    tensorboard_dir: str | None = None
    set_all_logging_options: bool = False
    eval_iters: int = 100
    eval_interval: int = 1000
    return_logits: bool = False
    custom_train_step_class: Any | None = None
    custom_train_step_kwargs: dict[str, Any] | None = None
    custom_model_provider_function: Callable[..., Any] | None = None
    custom_prepare_model_function: Callable[..., Any] | None = None
    custom_megatron_datasets_provider_function: Callable[..., Any] | None = None
    custom_get_batch_function: Callable[..., Any] | None = None
    custom_loss_function: Callable[..., Any] | None = None
    other_megatron_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        resolve_fields(self)
        self._validate()
        self.DDP_impl = "local" if self.pp_degree > 1 or self.use_distributed_optimizer else "torch"  # type: ignore[operator]
        if self.consumed_samples is not None:
            self.consumed_samples = list(self.consumed_samples) + [0] * (3 - len(self.consumed_samples))
        names = {
            "tensor_model_parallel_size": "tp_degree",
            "pipeline_model_parallel_size": "pp_degree",
            "sequence_parallel": "sequence_parallelism",
            "clip_grad": "gradient_clipping",
        }
        passthrough = [
            "pipeline_model_parallel_split_rank",
            "num_layers_per_virtual_pipeline_stage",
            "use_distributed_optimizer",
            "num_micro_batches",
            "consumed_samples",
            "no_wd_decay_cond",
            "scale_lr_cond",
            "lr_mult",
            "megatron_dataset_flag",
            "eval_iters",
            "eval_interval",
            "use_custom_fsdp",
            "no_load_optim",
            "eod_mask_loss",
            "no_save_optim",
            "optimizer_cpu_offload",
            "overlap_cpu_optimizer_d2h_h2d",
            "use_precision_aware_optimizer",
            "decoder_last_pipeline_num_layers",
            "recompute_granularity",
            "recompute_method",
            "recompute_num_layers",
            "attention_backend",
            "expert_model_parallel_size",
            "context_parallel_size",
            "attention_dropout",
            "hidden_dropout",
            "attention_softmax_in_fp32",
            "expert_tensor_parallel_size",
            "calculate_per_token_loss",
            "use_rotary_position_embeddings",
        ]
        args = {key: getattr(self, field) for key, field in names.items()}
        args.update({name: getattr(self, name) for name in passthrough})
        args["DDP_impl"] = self.DDP_impl
        self.megatron_lm_default_args: dict[str, Any] = args
        if self.tensorboard_dir is not None:
            args["tensorboard_dir"] = self.tensorboard_dir
        if self.other_megatron_args is not None:
            args.update(self.other_megatron_args)

    def _validate(self) -> None:
        self.weight_decay_incr_style = one_of(_SCHEDULES)(
            self.weight_decay_incr_style, "weight_decay_incr_style"
        )
        self.lr_decay_style = one_of(_SCHEDULES)(self.lr_decay_style, "lr_decay_style")
        if self.consumed_samples is not None and (
            not isinstance(self.consumed_samples, list) or not 1 <= len(self.consumed_samples) <= 3
        ):
            raise ConfigurationError(
                f"consumed_samples={self.consumed_samples!r} must be a list of 1 to 3 counts, one per data "
                "loader "
                "(train, eval, test) in the order they are prepared."
            )
        if self.train_iters is not None and self.train_samples is not None:
            raise ConfigurationError(
                f"train_iters={self.train_iters!r} and train_samples={self.train_samples!r}: pass only one "
                "of them."
            )
        for name in ("other_megatron_args", "custom_train_step_kwargs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ConfigurationError(f"{name}={value!r} must be a dict of Megatron-LM arguments.")
        for field in dataclasses.fields(self):
            if field.name.startswith("custom_") and field.name.endswith("function"):
                value = getattr(self, field.name)
                if value is not None and not callable(value):
                    raise ConfigurationError(f"{field.name}={value!r} must be a function.")

    def set_mixed_precision(self, mixed_precision: str) -> None:
        """Record fp16 or bf16 training in the Megatron arguments (bf16 uses Megatron's own DDP)."""
        if mixed_precision == "fp16":
            self.megatron_lm_default_args["fp16"] = True
        elif mixed_precision == "bf16":
            self.megatron_lm_default_args["bf16"] = True
            self.DDP_impl = "local"
            self.megatron_lm_default_args["DDP_impl"] = self.DDP_impl

    def set_training_args(self, micro_batch_size: int, dp_degree: int) -> None:
        """Record the batch layout: micro batch per rank, data-parallel degree and the global batch."""
        self.data_parallel_size = positive_int(dp_degree, "dp_degree")
        self.micro_batch_size = positive_int(micro_batch_size, "micro_batch_size")
        self.global_batch_size = (
            self.data_parallel_size * self.micro_batch_size * int(self.num_micro_batches or 1)
        )
        self.megatron_lm_default_args.update(
            data_parallel_size=self.data_parallel_size,
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
        )

    def set_optimizer_type(self, optimizer: torch.optim.Optimizer) -> None:
        """Translate an Adam-family or SGD optimizer's hyper-parameters into Megatron arguments."""
        name = type(optimizer).__name__.lower()
        defaults = optimizer.defaults
        args = self.megatron_lm_default_args
        if "adam" in name:
            args.update(optimizer="adam", adam_beta1=defaults["betas"][0], adam_beta2=defaults["betas"][1])
            args["adam_eps"] = defaults["eps"]
        elif "sgd" in name:
            args.update(optimizer="sgd", sgd_momentum=defaults["momentum"])
        else:
            raise ConfigurationError(
                f"optimizer {type(optimizer).__name__} has no Megatron-LM equivalent; use an Adam-family "
                "optimizer or SGD."
            )
        args.update(lr=defaults["lr"], weight_decay=defaults["weight_decay"])
