"""DeepSpeed's sequence parallelism (Ulysses / ALST): how long the sequences are and which attention
kernel splits them; unset fields come from the ``PARALLELISM_CONFIG_SP_*`` variables the launcher
sets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hasten.utils.dataclasses._env import env_field, positive_int, resolve_fields, to_bool
from hasten.utils.errors import ConfigurationError

_PREFIX = "PARALLELISM_CONFIG_SP_"
_BUILTIN_ATTENTION = ("flash_attention_2", "flash_attention_3", "sdpa")
_UNSUPPORTED_ATTENTION = ("eager", "flex_attention")


def _length_or_none(value: Any, name: str) -> int | None:
    return None if value == "None" else positive_int(value, name)


def _attention(value: Any, name: str) -> str:
    if value in _UNSUPPORTED_ATTENTION:
        raise ConfigurationError(
            f"{name}={value!r}: 'eager' and 'flex_attention' are not supported with sequence parallelism; "
            f"use one of {list(_BUILTIN_ATTENTION)} or a hub-hosted flash attention kernel."
        )
    if value not in _BUILTIN_ATTENTION and not (
        isinstance(value, str) and "/" in value and "flash-attn" in value
    ):
        raise ConfigurationError(
            f"{name}={value!r} is not an attention implementation sequence parallelism can use: give one of "
            f"{list(_BUILTIN_ATTENTION)} or a hub-hosted flash attention kernel (e.g. "
            "'kernels-community/flash-attn2')."
        )
    return str(value)


@dataclass
class DeepSpeedSequenceParallelConfig:
    """Sequence parallelism for DeepSpeed.

    Args:
        sp_seq_length: the sequence length when every batch has the same one.
        sp_seq_length_is_variable: batches may have different lengths (default true).
        sp_attn_implementation: ``"flash_attention_2"``, ``"flash_attention_3"``, ``"sdpa"`` or a
            hub-hosted flash attention kernel (``"kernels-community/flash-attn2"``).

    Raises:
        ConfigurationError: fixed-length sequences without a length, or an attention implementation
            that cannot be split.
    """

    sp_seq_length: int | None = env_field(_PREFIX + "SEQ_LENGTH", None, _length_or_none)
    sp_seq_length_is_variable: bool | None = env_field(_PREFIX + "SEQ_LENGTH_IS_VARIABLE", True, to_bool)
    sp_attn_implementation: str | None = env_field(_PREFIX + "ATTN_IMPLEMENTATION", None, _attention)

    def __post_init__(self) -> None:
        resolve_fields(self)
        if not self.sp_seq_length_is_variable and self.sp_seq_length is None:
            raise ConfigurationError(
                "sp_seq_length_is_variable=False needs sp_seq_length: pass it, or set "
                f"{_PREFIX}SEQ_LENGTH (or allow variable lengths)."
            )
