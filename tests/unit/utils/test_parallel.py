"""save / load / extract_model_from_parallel on one process (utils/parallel.py)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file
from torch import nn

from hasten.utils.parallel import extract_model_from_parallel, load, save, wait_for_everyone
from hasten.utils.precision import convert_outputs_to_fp32


class Evil:
    def __reduce__(self) -> tuple:
        return (print, ("pickle executed",))


def test_save_and_load_round_trip_without_pickle(tmp_path: Path) -> None:
    state = {"w": torch.randn(3), "rng": np.random.get_state(), "step": 3}
    save(state, tmp_path / "state.bin")
    loaded = load(tmp_path / "state.bin")
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3
    assert np.array_equal(loaded["rng"][1], state["rng"][1])
    assert not list(tmp_path.glob("*.tmp*")) and [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_load_refuses_code_in_pickles(tmp_path: Path) -> None:
    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load(tmp_path / "evil.bin")


def test_safe_serialization_writes_safetensors_once_per_storage(tmp_path: Path) -> None:
    weight = torch.randn(4, 4)
    with pytest.warns(UserWarning, match=r"Removed shared tensor \{'b'\} while saving.*b -> a"):
        save(
            {"a": weight, "b": weight, "c": torch.ones(2)},
            tmp_path / "model.safetensors",
            safe_serialization=True,
        )
    assert set(load_file(tmp_path / "model.safetensors")) == {"a", "c"}
    buffer = io.BytesIO()
    save({"c": torch.ones(2)}, buffer, safe_serialization=True)
    assert torch.equal(safetensors_load(buffer.getvalue())["c"], torch.ones(2))
    with pytest.raises(TypeError, match=r"needs a dict of tensors \(a state_dict\), not list"):
        save([1], tmp_path / "x.safetensors", safe_serialization=True)


def test_extract_unwraps_data_parallel_compile_and_fp32_wrapper() -> None:
    inner = nn.Linear(2, 2)
    assert extract_model_from_parallel(nn.DataParallel(inner)) is inner
    compiled = torch.compile(nn.DataParallel(inner))  # wrapping is lazy: nothing compiles here
    kept = extract_model_from_parallel(compiled)
    assert kept is compiled and kept._orig_mod is inner
    assert extract_model_from_parallel(compiled, keep_torch_compile=False) is inner
    model = nn.Linear(2, 2)
    model._original_forward = model.forward
    model.forward = convert_outputs_to_fp32(model.forward)
    unwrapped = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    assert "_original_forward" not in unwrapped.__dict__
    assert unwrapped(torch.ones(1, 2)).dtype == torch.float32


def test_recursive_unwraps_inner_wrappers() -> None:
    outer = nn.Sequential(nn.DataParallel(nn.Linear(2, 2)))
    assert isinstance(extract_model_from_parallel(outer, recursive=True)[0], nn.Linear)


def test_wait_for_everyone_is_a_no_op_alone() -> None:
    wait_for_everyone()
