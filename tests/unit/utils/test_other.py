"""The helpers Accelerate gathers in `accelerate.utils.other`, each in the module of its concept, and the
`hasten.utils.other` facade that offers them at Accelerate's path."""

from __future__ import annotations

import importlib
import socket
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import hasten.utils.other as other
from hasten.launchers import test_launch
from hasten.state import PartialState
from hasten.utils.attributes import get_pretty_name, recursive_getattr
from hasten.utils.device import check_device_same
from hasten.utils.environment import patch_environment
from hasten.utils.memory_budget import convert_bytes, get_module_leaves
from hasten.utils.modeling import compute_module_sizes
from hasten.utils.parallel import (
    clean_state_dict_for_safetensors,
    get_model_tp_size,
    id_tensor_storage,
    is_peft_model,
    model_has_dtensor,
    save,
)
from hasten.utils.ports import get_free_port, is_port_in_use
from hasten.utils.tqdm import tqdm
from hasten.utils.tree import honor_type, merge_dicts


def test_the_facade_offers_each_helper_from_its_home() -> None:
    for name in other.__all__:
        value = getattr(other, name)
        home = importlib.import_module(value.__module__)
        assert getattr(home, name) is value, name


def test_get_pretty_name() -> None:
    class Local:
        def method(self) -> None: ...

    assert get_pretty_name(Local) == "test_get_pretty_name.<locals>.Local"
    assert get_pretty_name(Local()) == "test_get_pretty_name.<locals>.Local"
    assert get_pretty_name(Local.method) == "test_get_pretty_name.<locals>.Local.method"
    assert get_pretty_name(torch.optim.AdamW) == "AdamW"
    assert get_pretty_name(3) == "int"


def test_recursive_getattr() -> None:
    model = nn.Sequential(nn.Linear(2, 3))
    assert recursive_getattr(model, "0.weight") is model[0].weight
    assert recursive_getattr(SimpleNamespace(a=SimpleNamespace(b=7)), "a.b") == 7
    with pytest.raises(
        AttributeError, match=r"Sequential\.0 has no attribute 'weights' \(looking up '0\.weights'\)"
    ):
        recursive_getattr(model, "0.weights")


def test_ports() -> None:
    port = get_free_port()
    assert 0 < port < 65536 and not is_port_in_use(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert is_port_in_use(server.getsockname()[1])
    with pytest.raises(ValueError, match=r"port=70000 is not a TCP port number"):
        is_port_in_use(70000)


def test_merge_dicts() -> None:
    destination = {"a": 1, "nested": {"x": 1, "y": 2}}
    result = merge_dicts({"b": 2, "nested": {"y": 3, "z": {"deep": True}}}, destination)
    assert result is destination
    assert destination == {"a": 1, "b": 2, "nested": {"x": 1, "y": 3, "z": {"deep": True}}}
    with pytest.raises(TypeError, match=r"destination\['a'\] is a int, source\['a'\] a dict"):
        merge_dicts({"a": {"x": 1}}, {"a": 1})


def test_convert_bytes() -> None:
    assert convert_bytes(512) == "512 bytes"
    assert convert_bytes(1536) == "1.5 KB"
    assert convert_bytes(3 * 2**30) == "3.0 GB"
    assert convert_bytes(5 * 2**50) == "5.0 PB"


def test_get_module_leaves() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 1)))
    leaves = get_module_leaves(compute_module_sizes(model))
    assert leaves == ["0.weight", "0.bias", "1.1.weight", "1.1.bias"]


def test_check_device_same() -> None:
    assert check_device_same(torch.device("cpu"), torch.device("cpu"))
    assert check_device_same(torch.device("cuda"), torch.device("cuda:0"))
    assert not check_device_same(torch.device("cuda"), torch.device("cuda:1"))
    assert not check_device_same(torch.device("cpu"), torch.device("meta"))


def test_id_tensor_storage() -> None:
    weight = torch.zeros(4, 4)
    assert id_tensor_storage(weight) == id_tensor_storage(weight[1:]) == id_tensor_storage(weight.t())
    assert id_tensor_storage(weight) != id_tensor_storage(weight.clone())
    assert id_tensor_storage(weight)[2] == 64


def _tied() -> dict[str, torch.Tensor]:
    fused = torch.arange(12.0).reshape(3, 4)
    return {"embed": fused, "head": fused, "first_row": fused[0], "own": torch.ones(2)}


def test_clean_state_dict_for_safetensors_names_what_it_drops_and_keeps_partial_views() -> None:
    state = _tied()
    with pytest.warns(UserWarning, match=r"^Removed shared tensor \{'head'\} while saving\. .*head -> embed"):
        cleaned = clean_state_dict_for_safetensors(state)
    assert list(cleaned) == ["embed", "first_row", "own"] and list(state) == [
        "embed",
        "head",
        "first_row",
        "own",
    ]
    assert cleaned["first_row"].untyped_storage().data_ptr() != state["embed"].untyped_storage().data_ptr()
    torch.testing.assert_close(cleaned["first_row"], state["embed"][0])


def test_save_with_safetensors_warns_and_writes_a_loadable_file(tmp_path: Path) -> None:
    PartialState()
    with pytest.warns(UserWarning, match=r"Removed shared tensor \{'head'\}"):
        save(_tied(), tmp_path / "model.safetensors", safe_serialization=True)
    loaded = load_file(tmp_path / "model.safetensors")
    assert sorted(loaded) == ["embed", "first_row", "own"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save(
            {"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "plain.safetensors", safe_serialization=True
        )


def test_model_tp_size() -> None:
    assert get_model_tp_size(nn.Linear(1, 1)) is None
    assert get_model_tp_size(SimpleNamespace(tp_size=4)) == 4  # type: ignore[arg-type]  # transformers < 5
    for distributed_config in ({"tp_size": 2}, SimpleNamespace(tp_size=2)):  # transformers 5
        model = SimpleNamespace(tp_size=None, config=SimpleNamespace(distributed_config=distributed_config))
        assert get_model_tp_size(model) == 2  # type: ignore[arg-type]


def test_model_has_dtensor_on_a_one_rank_mesh() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    model = nn.Linear(4, 4)
    assert not model_has_dtensor(model)
    with patch_environment(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(get_free_port())
    ):
        torch.distributed.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (1,))
        model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh))
        assert model_has_dtensor(model)


def test_is_peft_model_with_a_real_lora_model() -> None:
    peft = pytest.importorskip("peft")
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert not is_peft_model(model)
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["0"], r=2))
    assert is_peft_model(lora)


def test_tqdm_draws_on_local_rank_zero_only() -> None:
    assert list(tqdm(range(3))) == [0, 1, 2]
    assert not tqdm(range(3)).disable
    with patch_environment(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1"):
        assert tqdm(range(3)).disable
        assert not tqdm(range(3), main_process_only=False).disable
    with pytest.raises(
        ValueError, match=r"tqdm\(True, \.\.\.\): passing `True` or `False` as the first argument"
    ):
        tqdm(True, range(3))


def test_test_launch_forms_the_state() -> None:
    test_launch()
    assert PartialState().initialized


def test_honor_type_names_what_it_cannot_rebuild() -> None:
    assert honor_type((1, 2), (x * 2 for x in (1, 2))) == (2, 4)

    class Pair:
        def __init__(self, first: int, second: int) -> None: ...

    with pytest.raises(TypeError, match=r"^Unsupported types \(<class .*Pair'>\) passed to `honor_type`"):
        honor_type(Pair(1, 2), iter([1, 2]))


def test_recursively_apply_keeps_accelerates_sentence_first() -> None:
    from hasten.utils.tree import recursively_apply

    def double(tensor: torch.Tensor) -> torch.Tensor:
        return tensor * 2

    with pytest.raises(
        TypeError,
        match=r"^Unsupported types \(<class 'str'>\) passed to `double`\. Only nested list/tuple/dicts of "
        r"objects that are valid for `is_torch_tensor` should be passed\. .*data\['b'\]",
    ):
        recursively_apply(double, {"a": torch.ones(1), "b": "text"}, error_on_other_type=True)
