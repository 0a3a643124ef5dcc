"""Environment fallbacks for config fields: argument, else variable, else fallback, parsed once; the parsers'
errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hasten.utils.dataclasses._env import (
    comma_list,
    declared_defaults,
    env_field,
    is_set_in_env,
    non_negative_int,
    one_of,
    or_auto,
    positive_int,
    read_env,
    resolve_fields,
    to_bool,
    to_float,
)
from hasten.utils.environment import patch_environment
from hasten.utils.errors import ConfigurationError


@dataclass
class Example:
    steps: int | None = env_field("HASTEN_TEST_STEPS", 3, positive_int)
    mode: str | None = env_field("HASTEN_TEST_MODE", "fast", one_of(["fast", "slow"]))
    plain: int = 7

    def __post_init__(self) -> None:
        resolve_fields(self)


def test_fallback_when_nothing_is_set() -> None:
    example = Example()
    assert (example.steps, example.mode) == (3, "fast")
    assert declared_defaults(Example) == {"steps": 3, "mode": "fast", "plain": 7}


def test_environment_is_read_when_the_argument_is_not_passed() -> None:
    with patch_environment(HASTEN_TEST_STEPS="5", HASTEN_TEST_MODE="SLOW"):
        example = Example()
        assert is_set_in_env(example, "steps")
    assert (example.steps, example.mode) == (5, "slow")


def test_argument_wins_over_the_environment() -> None:
    with patch_environment(HASTEN_TEST_STEPS="5"):
        assert Example(steps=2).steps == 2


def test_empty_variable_counts_as_unset() -> None:
    with patch_environment(HASTEN_TEST_STEPS=" "):
        assert Example().steps == 3
        assert read_env("HASTEN_TEST_STEPS") is None


def test_bad_environment_value_names_the_variable() -> None:
    with patch_environment(HASTEN_TEST_STEPS="many"), pytest.raises(ConfigurationError) as error:
        Example()
    assert "environment variable HASTEN_TEST_STEPS='many' is not an integer" in str(error.value)


def test_bad_argument_names_the_argument_and_the_choices() -> None:
    with pytest.raises(
        ConfigurationError, match=r"mode='medium' is not valid; expected one of \['fast', 'slow'\]"
    ):
        Example(mode="medium")


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("yes", True), ("0", False), ("Off", False)])
def test_to_bool(value: object, expected: bool) -> None:
    assert to_bool(value, "flag") is expected


@pytest.mark.parametrize("value", ["maybe", 1, None])
def test_to_bool_rejects(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"flag=.* is not a boolean; pass True or False"):
        to_bool(value, "flag")


def test_integers() -> None:
    assert positive_int("4", "n") == 4
    assert non_negative_int(0, "n") == 0
    with pytest.raises(ConfigurationError, match="n=0 must be at least 1"):
        positive_int(0, "n")
    with pytest.raises(ConfigurationError, match="n=True is not an integer"):
        positive_int(True, "n")


def test_floats_and_auto() -> None:
    assert to_float("1.5", "clip") == 1.5
    assert or_auto(to_float)("AUTO", "clip") == "auto"
    with pytest.raises(ConfigurationError, match="clip='x' is not a number"):
        or_auto(to_float)("x", "clip")


def test_comma_list() -> None:
    assert comma_list("Block, Head,", "names") == ["Block", "Head"]
    assert comma_list(("A",), "names") == ["A"]
    with pytest.raises(ConfigurationError, match="names=3 must be a list of names"):
        comma_list(3, "names")
