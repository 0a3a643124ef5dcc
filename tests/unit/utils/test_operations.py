"""hasten.utils.operations on a single process: values come back unchanged, without a process group."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist

from hasten.state import PartialState
from hasten.utils.errors import CannotPadNestedTensorWarning, ConfigurationError
from hasten.utils.operations import (
    broadcast,
    broadcast_object_list,
    copy_tensor_to_devices,
    gather,
    gather_object,
    pad_across_processes,
    pad_input_tensors,
    reduce,
)


def _batch() -> dict[str, Any]:
    return {"a": torch.arange(4.0), "b": [torch.ones(2, 2, dtype=torch.bfloat16), torch.tensor(3)]}


def test_collectives_on_one_process_return_the_input_without_a_group() -> None:
    batch = _batch()
    assert gather(batch) is batch
    assert broadcast(batch, from_process=0) is batch
    assert pad_across_processes(batch, dim=0) is batch
    assert gather_object(["x", 1]) == ["x", 1]
    objects = [{"k": 1}]
    assert broadcast_object_list(objects) is objects
    assert not dist.is_initialized() and PartialState().num_processes == 1


def test_reduce_on_one_process_copies_and_scales() -> None:
    batch = _batch()
    out = reduce(batch)
    assert out["a"].tolist() == [0.0, 1.0, 2.0, 3.0] and out["a"] is not batch["a"]
    assert out["b"][1].item() == 3 and out["b"][0].dtype == torch.bfloat16
    assert reduce(torch.tensor([1.0, 2.0]), reduction="sum", scale=0.5).tolist() == [0.5, 1.0]
    assert reduce(torch.tensor([1, 2]), reduction="mean").tolist() == [1, 2]  # one process: nothing to divide


def test_reduce_rejects_an_unknown_reduction() -> None:
    with pytest.raises(ConfigurationError) as caught:
        reduce(torch.ones(1), reduction="avg")  # type: ignore[arg-type]
    assert "reduction='avg' is not a reduction; use one of ['mean', 'sum', 'max', 'none']" in str(
        caught.value
    )


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_pad_across_processes_checks_its_input_even_alone() -> None:
    with pytest.raises(TypeError, match=r"pad_across_processes: tensor\['x'\] is a str"):
        pad_across_processes({"x": "text"})
    nested = torch.nested.nested_tensor(
        [torch.ones(2), torch.ones(3)],
    )
    with pytest.warns(CannotPadNestedTensorWarning, match="cannot pad a nested tensor"):
        out = pad_across_processes([nested])
    assert out[0] is nested


def test_pad_input_tensors_pads_to_a_multiple_of_the_processes() -> None:
    data = {"x": torch.arange(6).view(3, 2) + 1, "y": [torch.ones(3)]}
    out = pad_input_tensors(data, batch_size=3, num_processes=4)
    assert (
        out["x"].shape == (4, 2)
        and out["x"][3].tolist() == [0, 0]
        and out["x"][:3].tolist() == data["x"].tolist()
    )
    assert out["y"][0].shape == (4,)
    assert pad_input_tensors(torch.ones(6), 6, 4).shape == (8,)
    same = torch.ones(8)
    assert pad_input_tensors(same, 8, 4) is same
    assert pad_input_tensors(torch.ones(2, 5), 5, 2, dim=1).shape == (2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pad_input_tensors(torch.tensor(1.0), 1, 2).ndim == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 3, "num_processes": 0}, "num_processes=0 must be a positive int"),
        ({"batch_size": -1, "num_processes": 2}, "batch_size=-1 must be an int >= 0"),
        ({"batch_size": 2, "num_processes": True}, "num_processes=True must be a positive int"),
    ],
)
def test_pad_input_tensors_rejects_bad_counts(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        pad_input_tensors(torch.ones(3), **kwargs)


def test_gather_and_friends_name_non_tensor_leaves_only_when_distributed() -> None:
    # Alone, gather returns its input untouched (as Accelerate does); across processes it checks.
    data = {"x": "text"}
    assert gather(data) is data
    with pytest.raises(TypeError, match=r"reduce: tensor\['x'\] is a str"):
        reduce(data)


def test_copy_tensor_to_devices_alone() -> None:
    tensor = torch.arange(3)
    assert copy_tensor_to_devices(tensor) is tensor
    with pytest.raises(ValueError, match="tensor is None on the only process; pass the tensor to share"):
        copy_tensor_to_devices(None)
    with pytest.raises(
        TypeError, match=r"must be a torch.Tensor on one process and None on the others, got list"
    ):
        copy_tensor_to_devices([1, 2])  # type: ignore[arg-type]
