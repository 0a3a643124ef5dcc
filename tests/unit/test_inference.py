"""prepare_pippy and its helpers on one process (the pipeline itself runs on 2 ranks in tests/dist)."""

from __future__ import annotations

import torch
from torch import nn

from hasten.inference import find_pippy_batch_size, generate_device_map, pippy_forward, prepare_pippy


def test_one_process_runs_the_model_as_its_only_stage() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    inputs = torch.randn(4, 3)
    expected = model(inputs)
    assert prepare_pippy(model, example_args=(inputs,)) is model
    assert model.hf_split_points == [] and model.pippy_stage is None
    assert torch.equal(model(inputs), expected)
    assert pippy_forward(lambda x: x * 2, 1, False, inputs).equal(inputs * 2)


def test_batch_size_comes_from_the_first_tensor() -> None:
    assert find_pippy_batch_size((3, [torch.ones(5, 2)]), {"mask": torch.ones(7)}) == 5
    assert find_pippy_batch_size((), {"ids": torch.ones(7, 1)}) == 7
    assert find_pippy_batch_size(("text",), None) is None


def test_device_map_gives_each_stage_an_even_share() -> None:
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(8)])
    placed = generate_device_map(model, num_processes=2)
    assert list(placed) == [str(i) for i in range(8)]  # every module listed, not merged
    assert [placed[str(i)] for i in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert generate_device_map(model, max_memory={0: 10**9}, num_processes=2) == dict.fromkeys(placed, 0)
    assert set(generate_device_map(model).values()) <= {0, "cpu"}
