"""String enums: values, membership, parsing with errors that list the choices."""

from __future__ import annotations

import pytest

from hasten.utils.dataclasses.enums import (
    ComputeEnvironment,
    CustomDtype,
    DDPCommunicationHookType,
    DistributedType,
    DynamoBackend,
    FP8BackendType,
    LoggerType,
    PrecisionType,
    RNGType,
    SageMakerDistributedType,
)

ALL = [
    ComputeEnvironment,
    CustomDtype,
    DDPCommunicationHookType,
    DistributedType,
    DynamoBackend,
    FP8BackendType,
    LoggerType,
    PrecisionType,
    RNGType,
    SageMakerDistributedType,
]


def test_membership_by_value() -> None:
    assert "fp16" in PrecisionType
    assert PrecisionType.BF16 in PrecisionType
    assert "fp64" not in PrecisionType
    assert 3 not in PrecisionType
    assert "MULTI_CPU" in DistributedType


@pytest.mark.parametrize("enum", ALL)
def test_members_are_their_values(enum) -> None:  # type: ignore[no-untyped-def]
    for member in enum:
        assert member == member.value
        assert str(member) == member.value
        assert enum(member.value) is member
    assert enum.list() == [member.value for member in enum]


def test_parse_is_case_insensitive_and_lists_choices_on_error() -> None:
    assert PrecisionType.parse("BF16", "mixed_precision") is PrecisionType.BF16
    assert DynamoBackend.parse("inductor", "dynamo_backend") is DynamoBackend.INDUCTOR
    assert PrecisionType.parse(PrecisionType.NO, "x") is PrecisionType.NO
    with pytest.raises(
        ValueError,
        match=r"mixed_precision='fp64' is not valid; expected one of \['no', 'fp8', 'fp16', 'bf16'\]",
    ):
        PrecisionType.parse("fp64", "mixed_precision")
    with pytest.raises(ValueError, match=r"mixed_precision=16 is not valid"):
        PrecisionType.parse(16, "mixed_precision")


def test_same_members_as_accelerate() -> None:
    dataclasses = pytest.importorskip("accelerate.utils.dataclasses")
    for enum in ALL:
        theirs = getattr(dataclasses, enum.__name__)
        assert [(m.name, m.value) for m in enum] == [(m.name, m.value) for m in theirs], enum.__name__
