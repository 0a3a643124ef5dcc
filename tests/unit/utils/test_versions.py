"""Version comparisons."""

from __future__ import annotations

import pytest
from packaging.version import Version

from hasten.utils.versions import compare_versions, is_torch_version


def test_is_torch_version_ignores_the_local_build_suffix() -> None:
    import torch

    release = Version(torch.__version__).base_version
    assert is_torch_version("==", release)
    assert is_torch_version(">=", "2.4")
    assert not is_torch_version("<", "2.0")


def test_compare_versions_with_a_package_or_a_version() -> None:
    assert compare_versions("safetensors", ">=", "0.1")
    assert compare_versions("1.2.3", "<", "1.10")
    assert compare_versions(Version("2.0"), "!=", "2.1")


@pytest.mark.parametrize(
    "call", [lambda: is_torch_version("=>", "2.0"), lambda: compare_versions("1.0", "~=", "1.0")]
)
def test_a_bad_operator_lists_the_valid_ones(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(
        ValueError, match=r"is not a comparison operator; use one of '>', '>=', '==', '!=', '<=', '<'"
    ):
        call()


def test_an_unknown_library_is_named() -> None:
    with pytest.raises(
        ValueError, match=r"'hasten_absent' is neither an installed package nor a version string"
    ):
        compare_versions("hasten_absent", ">=", "1.0")
