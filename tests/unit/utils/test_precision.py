"""hasten.utils.precision: half-precision outputs back to float32, with a wrapper that pickles."""

from __future__ import annotations

import io
import pickle
from collections import namedtuple

import torch

from hasten.utils.precision import ConvertOutputsToFp32, convert_outputs_to_fp32, convert_to_fp32

Output = namedtuple("Output", ["logits", "steps"])


class HalfModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> Output:
        """Half-precision logits and an integer side output."""
        return Output(self.linear(x).to(torch.bfloat16), torch.tensor([1]))


def test_convert_to_fp32_converts_only_half_tensors() -> None:
    data = {
        "h": torch.ones(2, dtype=torch.float16),
        "b": [torch.ones(1, dtype=torch.bfloat16)],
        "d": torch.ones(1, dtype=torch.float64),
        "i": torch.ones(1, dtype=torch.int64),
        "s": "text",
    }
    out = convert_to_fp32(data)
    assert out["h"].dtype == torch.float32 and out["b"][0].dtype == torch.float32
    assert out["d"] is data["d"] and out["i"] is data["i"] and out["s"] == "text"


def test_wrapped_forward_returns_fp32_and_keeps_its_identity() -> None:
    model = HalfModel()
    original = model.forward
    model.forward = convert_outputs_to_fp32(model.forward)  # type: ignore[method-assign]
    out = model(torch.ones(1, 3))
    assert type(out) is Output and out.logits.dtype == torch.float32 and out.steps.dtype == torch.int64
    assert isinstance(model.forward, ConvertOutputsToFp32) and model.forward.__wrapped__ == original
    assert model.forward.__doc__ == original.__doc__ and "ConvertOutputsToFp32" in repr(model.forward)


def test_a_model_carrying_the_wrapper_pickles_and_still_converts() -> None:
    model = HalfModel()
    model.forward = convert_outputs_to_fp32(model.forward)  # type: ignore[method-assign]
    expected = model(torch.ones(1, 3)).logits
    clone = pickle.loads(pickle.dumps(model))
    assert clone(torch.ones(1, 3)).logits.dtype == torch.float32
    torch.testing.assert_close(clone(torch.ones(1, 3)).logits, expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded(torch.ones(1, 3)).logits.dtype == torch.float32
