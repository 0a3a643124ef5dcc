"""Regional compilation: the repeated blocks of a model compiled one by one, three ways."""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

from hasten.utils.compilation import (
    compile_regions,
    compile_regions_deepspeed,
    compile_regions_fsdp2,
    has_compiled_regions,
    has_repeated_blocks,
    is_compiled_module,
    is_repeated_blocks,
)
from hasten.utils.parallel import extract_model_from_parallel


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x)) + x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.body = nn.Module()
        self.body.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.body.blocks:
            x = block(x)
        return self.head(x)


def test_repeated_blocks() -> None:
    net = Net()
    assert is_repeated_blocks(net.body.blocks) and has_repeated_blocks(net) and has_repeated_blocks(net.body)
    assert not is_repeated_blocks(net.body) and not has_repeated_blocks(net.head)
    assert not is_repeated_blocks(nn.ModuleList())
    assert not is_repeated_blocks(nn.ModuleList([Block(), nn.Linear(8, 8)]))
    assert is_repeated_blocks(nn.ModuleList([Block()]))


def test_compile_regions_returns_a_compiled_copy_and_leaves_the_model() -> None:
    torch._dynamo.reset()
    net = Net()
    x = torch.randn(5, 4)
    expected = net(x)
    compiled = compile_regions(net, backend="eager")
    assert compiled is not net and compiled.__dict__["_orig_mod"] is net
    assert all(is_compiled_module(block) for block in compiled.body.blocks)  # type: ignore[union-attr]
    assert is_compiled_module(compiled.embed) and is_compiled_module(compiled.head)
    assert (
        not has_compiled_regions(net) and has_compiled_regions(compiled) and not is_compiled_module(compiled)
    )
    assert compiled.head._orig_mod.weight is net.head.weight  # type: ignore[union-attr]  # parameters shared
    with torch.no_grad():  # (dynamo reads .grad of non-leaf inputs while tracing, which warns)
        torch.testing.assert_close(compiled(x), expected)
    assert extract_model_from_parallel(compiled, keep_torch_compile=False) is net
    assert extract_model_from_parallel(compiled) is compiled


def test_compile_regions_of_a_bare_module_list_and_a_leaf() -> None:
    torch._dynamo.reset()
    blocks = nn.ModuleList(Block() for _ in range(2))
    compiled_blocks = compile_regions(blocks, backend="eager")
    assert isinstance(compiled_blocks, nn.ModuleList) and all(is_compiled_module(b) for b in compiled_blocks)
    leaf = nn.Linear(3, 3)
    compiled_leaf = compile_regions(leaf, backend="eager")
    assert (
        is_compiled_module(compiled_leaf) and extract_model_from_parallel(compiled_leaf, False, False) is leaf
    )


def test_in_place_variants_keep_the_module_call_path() -> None:
    torch._dynamo.reset()
    for variant in (compile_regions_fsdp2, compile_regions_deepspeed):
        net = Net()
        x = torch.randn(2, 4)
        expected = net(x)
        result = variant(net, backend="eager")
        assert result is (net if variant is compile_regions_fsdp2 else None)
        assert all(block._compiled_call_impl is not None for block in net.body.blocks)
        assert net.head._compiled_call_impl is not None and net._compiled_call_impl is None
        assert not is_compiled_module(net) and not has_compiled_regions(net)
        calls: list[str] = []
        net.body.blocks[0].register_forward_pre_hook(lambda module, args, calls=calls: calls.append("hook"))
        with torch.no_grad():
            torch.testing.assert_close(net(x), expected)
        assert calls == ["hook"]  # nn.Module.__call__ still runs, so hooks added later fire
