"""prepare_pippy: pipeline-parallel inference over torch.distributed.pipelining on 2 real gloo ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tests.ranks import RankPool


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(4)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(x)
        for layer in self.layers:
            hidden = torch.relu(layer(hidden))
        out = self.head(hidden)
        return out * scale if scale is not None else out


def _inputs(rows: int) -> torch.Tensor:
    return torch.randn(rows, 6, generator=torch.Generator().manual_seed(rows))


def _pipelined(split_points: Any, gather_output: bool) -> dict[str, Any]:
    from hasten.inference import prepare_pippy
    from hasten.utils.parallel import extract_model_from_parallel

    torch.manual_seed(0)
    model = Stack().eval()
    with torch.no_grad():
        reference = {rows: model(_inputs(rows)) for rows in (4, 3)}
    prepare_pippy(model, split_points=split_points, example_args=(_inputs(4),), gather_output=gather_output)
    outputs = {rows: model(_inputs(rows)) for rows in (4, 3)}  # 3 rows: padded to 4, trimmed back
    errors = {}
    for name, call in {
        "too big": lambda: model(_inputs(6)),
        "other shape": lambda: model(torch.randn(4, 7)),
    }.items():
        try:
            call()
        except ValueError as error:
            errors[name] = str(error)
    unwrapped = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    with torch.no_grad():
        plain = unwrapped(_inputs(4))
    return {
        "outputs": outputs,
        "reference": reference,
        "split_points": model.hf_split_points,
        "errors": errors,
        "unwrapped": torch.equal(plain, reference[4]),
    }


@pytest.mark.parametrize(("split_points", "gather_output"), [("auto", False), (["layers.2"], True)])
def test_pipelined_forward_matches_the_model(ranks2: RankPool, split_points: Any, gather_output: bool) -> None:
    results = ranks2.run(_pipelined, split_points, gather_output)
    for rank, result in enumerate(results):
        assert result["split_points"] == (["layers.2"] if split_points != "auto" else result["split_points"])
        assert len(result["split_points"]) == 1
        for rows, output in result["outputs"].items():
            if rank == 1 or gather_output:
                assert torch.allclose(output, result["reference"][rows], atol=1e-6)
            else:
                assert output is None  # only the last stage has the output
        assert "rank 0 got a batch of 6 rows; the pipeline was traced for 4" in result["errors"]["too big"]
        assert "got inputs of shapes [(4, 7)]; the pipeline was traced for [(4, 6)]" in result["errors"]["other shape"]
        assert result["unwrapped"]


def _bad_preparations() -> list[str]:
    from hasten.inference import prepare_pippy

    messages = []
    for kwargs in (
        {"split_points": ["layers.1", "layers.2"], "example_args": (_inputs(4),)},
        {"split_points": ["nowhere"], "example_args": (_inputs(4),)},
        {"example_args": (_inputs(3),)},
        {"example_args": ()},
    ):
        try:
            prepare_pippy(Stack(), **kwargs)
        except ValueError as error:
            messages.append(str(error))
    return messages


def test_bad_preparations_are_named(ranks2: RankPool) -> None:
    for messages in ranks2.run(_bad_preparations):
        assert "split_points=['layers.1', 'layers.2'] must name 1 modules" in messages[0]
        assert "split_points=['nowhere'] must name 1 modules" in messages[1]
        assert "the example batch has 3 rows, which must be a multiple of num_chunks=2" in messages[2]
        assert "the example batch has None rows" in messages[3]
