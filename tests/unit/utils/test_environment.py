"""The one environment parser and the helpers that scope environment changes."""

from __future__ import annotations

import functools
import os
import unittest
from pathlib import Path

import pytest
import torch

from hasten.utils import environment, numa
from hasten.utils.environment import (
    are_libraries_initialized,
    clear_environment,
    convert_dict_to_env_variables,
    get_int_from_env,
    override_numa_affinity,
    parse_choice_from_env,
    parse_flag_from_env,
    patch_environment,
    purge_accelerate_environment,
    set_numa_affinity,
    str_to_bool,
)
from tests.accelerators import simulate_gpus


@pytest.mark.parametrize("text", ["y", "YES", "t", "True", "on", "1", " true "])
def test_str_to_bool_true(text: str) -> None:
    assert str_to_bool(text) == 1
    assert str_to_bool(text, to_bool=True) is True


@pytest.mark.parametrize("text", ["n", "No", "f", "FALSE", "off", "0"])
def test_str_to_bool_false(text: str) -> None:
    assert str_to_bool(text) == 0
    assert str_to_bool(text, to_bool=True) is False


def test_str_to_bool_rejects_other_text_and_lists_the_spellings() -> None:
    with pytest.raises(ValueError, match=r"Cannot read 'maybe' as a boolean; use one of .*'yes'.*'no'"):
        str_to_bool("maybe")


def test_parse_flag_from_env() -> None:
    assert parse_flag_from_env("HASTEN_TEST_FLAG") is False
    assert parse_flag_from_env("HASTEN_TEST_FLAG", default=True) is True
    with patch_environment(HASTEN_TEST_FLAG="yes"):
        assert parse_flag_from_env("HASTEN_TEST_FLAG") is True
    with patch_environment(HASTEN_TEST_FLAG=""):
        assert parse_flag_from_env("HASTEN_TEST_FLAG", default=True) is True
    with (
        patch_environment(HASTEN_TEST_FLAG="sometimes"),
        pytest.raises(ValueError, match=r"Environment variable HASTEN_TEST_FLAG='sometimes': Cannot read"),
    ):
        parse_flag_from_env("HASTEN_TEST_FLAG")


def test_parse_choice_from_env() -> None:
    assert parse_choice_from_env("HASTEN_TEST_CHOICE") == "no"
    assert parse_choice_from_env("HASTEN_TEST_CHOICE", "bf16") == "bf16"
    with patch_environment(HASTEN_TEST_CHOICE="fp16"):
        assert parse_choice_from_env("HASTEN_TEST_CHOICE") == "fp16"


def test_get_int_from_env_takes_the_first_non_negative() -> None:
    with patch_environment(HASTEN_A="-1", HASTEN_B="7", HASTEN_C="9"):
        assert get_int_from_env(["HASTEN_MISSING", "HASTEN_A", "HASTEN_B", "HASTEN_C"], 3) == 7
    assert get_int_from_env(["HASTEN_MISSING"], 3) == 3
    with (
        patch_environment(HASTEN_A="four"),
        pytest.raises(ValueError, match=r"HASTEN_A='four' must be an integer"),
    ):
        get_int_from_env(["HASTEN_A"], 0)


def test_patch_environment_restores_exactly_even_on_error() -> None:
    os.environ["HASTEN_KEEP"] = "old"
    try:
        with pytest.raises(RuntimeError), patch_environment(hasten_keep="new", hasten_new=3):
            assert os.environ["HASTEN_KEEP"] == "new"
            assert os.environ["HASTEN_NEW"] == "3"  # keys upper-cased, values str()
            raise RuntimeError("boom")
        assert os.environ["HASTEN_KEEP"] == "old"
        assert "HASTEN_NEW" not in os.environ
    finally:
        del os.environ["HASTEN_KEEP"]


def test_clear_environment_restores_and_keeps_identity() -> None:
    environ = os.environ
    before = dict(os.environ)
    with clear_environment():
        assert os.environ is environ and len(os.environ) == 0
        os.environ["HASTEN_INSIDE"] = "1"
    assert dict(os.environ) == before


def test_purge_accelerate_environment_on_a_function() -> None:
    @purge_accelerate_environment
    def sets_variables() -> str:
        os.environ["ACCELERATE_HASTEN_TEST"] = "1"
        os.environ["ACCELERATE_USE_CPU"] = "yes"
        return "done"

    with patch_environment(ACCELERATE_USE_CPU="no"):
        assert sets_variables() == "done"
        assert "ACCELERATE_HASTEN_TEST" not in os.environ
        assert os.environ["ACCELERATE_USE_CPU"] == "no"


def test_purge_accelerate_environment_on_a_class() -> None:
    @purge_accelerate_environment
    class Case:
        def test_one(self) -> None:
            os.environ["ACCELERATE_HASTEN_TEST"] = "1"

        def helper(self) -> None:
            os.environ["ACCELERATE_HASTEN_HELPER"] = "1"

    Case().test_one()
    assert "ACCELERATE_HASTEN_TEST" not in os.environ
    try:
        Case().helper()  # only test* methods are wrapped
        assert os.environ["ACCELERATE_HASTEN_HELPER"] == "1"
    finally:
        os.environ.pop("ACCELERATE_HASTEN_HELPER", None)


def test_purge_accelerate_environment_rejects_other_things() -> None:
    with pytest.raises(TypeError, match=r"decorates a function or a class, not 3"):
        purge_accelerate_environment(3)


def test_convert_dict_to_env_variables() -> None:
    assert convert_dict_to_env_variables({"A": "1", "B": 2}) == ["A=1\n", "B=2\n"]


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"A=B": "1"}, "'=' in the key"),
        ({"A": "1\nB=2"}, r"\['\\n'\]"),
        ({"": "x"}, "an empty key or value"),
        ({"A": ""}, "an empty key or value"),
        ({"A\n": "x"}, r"\['\\n'\]"),
        ({"A": "x\rY=1"}, r"\['\\r'\]"),
        ({"A": "\0"}, r"\['\\x00'\]"),
        ({"A": "<mything"}, r"\['<'\]"),
        ({"A": "two words"}, r"\[' '\]"),
        ({"A": "x;rm"}, r"\[';'\]"),
    ],
)
def test_convert_dict_to_env_variables_warns_about_and_skips_bad_entries(
    env: dict[str, str], problem: str
) -> None:
    with pytest.warns(
        UserWarning,
        match=r"^WARNING: Skipping .* as it contains forbidden characters or missing "
        rf"values \(.*{problem}",
    ):
        lines = convert_dict_to_env_variables({"GOOD": "1", **env, "ALSO_GOOD": "2"})
    assert lines == ["GOOD=1\n", "ALSO_GOOD=2\n"]


def test_purge_accelerate_environment_on_unittest_classes_and_their_subclasses() -> None:
    @purge_accelerate_environment
    class Base(unittest.TestCase):
        def test_base(self) -> None:
            os.environ["ACCELERATE_HASTEN_BASE"] = "1"

    class Child(Base):
        def test_child(self) -> None:
            os.environ["ACCELERATE_HASTEN_CHILD"] = "1"

    class GrandChild(Child):
        def test_grandchild(self) -> None:
            os.environ["ACCELERATE_HASTEN_GRANDCHILD"] = "1"

    for case, name in [
        (Base, "test_base"),
        (Child, "test_child"),
        (GrandChild, "test_grandchild"),
        (GrandChild, "test_base"),
    ]:
        result = unittest.TestResult()
        case(name).run(result)
        assert result.wasSuccessful(), result.errors
    assert not [key for key in os.environ if key.startswith("ACCELERATE_HASTEN_")]


def test_purge_accelerate_environment_on_pytest_classes_keeps_their_own_init_subclass() -> None:
    seen = []

    @purge_accelerate_environment
    class Base:
        def __init_subclass__(cls, **kwargs: object) -> None:
            super().__init_subclass__(**kwargs)
            seen.append(cls.__name__)

        def test_base(self) -> None:
            os.environ["ACCELERATE_HASTEN_BASE"] = "1"

    class Child(Base):
        def test_child(self) -> None:
            os.environ["ACCELERATE_HASTEN_CHILD"] = "1"

    Child().test_child()
    Child().test_base()
    assert seen == ["Child"]
    assert not [key for key in os.environ if key.startswith("ACCELERATE_HASTEN_")]


def test_purge_accelerate_environment_on_a_wrapped_function() -> None:
    def outer(function):  # type: ignore[no-untyped-def]
        @functools.wraps(function)
        def wrapper(*args: object) -> object:
            return function(*args)

        return wrapper

    @purge_accelerate_environment
    @outer
    def sets(value: str) -> str:
        os.environ["ACCELERATE_HASTEN_WRAPPED"] = value
        return value

    assert sets("1") == "1"
    assert "ACCELERATE_HASTEN_WRAPPED" not in os.environ
    assert purge_accelerate_environment(sets) is sets  # not wrapped twice


def test_are_libraries_initialized() -> None:
    assert are_libraries_initialized("torch", "hasten_no_such_library") == ["torch"]


def test_numa_affinity_is_a_quiet_no_op_without_accelerators(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(environment, "_numa_done", set())
    before = os.sched_getaffinity(0)
    with caplog.at_level("DEBUG", logger="hasten.utils.environment"):
        override_numa_affinity(0)
        set_numa_affinity(0, verbose=True)
    assert os.sched_getaffinity(0) == before
    assert "No NUMA information for local process 0" in caplog.text


def _node_cpus(sysfs: Path, cpus: set[int]) -> None:
    device = sysfs / "bus/pci/devices/0000:3b:00.0"
    device.mkdir(parents=True, exist_ok=True)
    (device / "numa_node").write_text("0\n")
    (sysfs / "devices/system/node/node0").mkdir(parents=True, exist_ok=True)
    (sysfs / "devices/system/node/node0/cpulist").write_text(",".join(map(str, sorted(cpus))))


def test_numa_affinity_pins_to_the_node_of_the_accelerator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    simulate_gpus(monkeypatch, 1)  # one GPU on NUMA node 0, simulated
    monkeypatch.setattr(numa, "SYSFS", tmp_path)
    monkeypatch.setattr(environment, "_numa_done", set())
    before = os.sched_getaffinity(0)
    first, last = {min(before)}, {max(before)}
    try:
        _node_cpus(tmp_path, first)
        with caplog.at_level("INFO", logger="hasten.utils.environment"):
            set_numa_affinity(0, verbose=True)
        assert os.sched_getaffinity(0) == first
        assert f"Process 0 pinned to CPUs {sorted(first)}" in caplog.text
        _node_cpus(tmp_path, last)
        set_numa_affinity(0)  # only the first time for each local process
        assert os.sched_getaffinity(0) == first
        override_numa_affinity(0)  # every time
        assert os.sched_getaffinity(0) == last
    finally:
        os.sched_setaffinity(0, before)
