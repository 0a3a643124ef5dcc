"""hasten.utils.operations on real gloo groups of 2 and 4 ranks.

Each ``_on_rank_*`` function runs on every rank of a pool and returns plain values for the
test to check. Mismatches are caught on the ranks and their messages returned, so a test can
read what every rank raised (and the pool stays usable).
"""

from __future__ import annotations

import os
from collections import OrderedDict, namedtuple
from typing import Any

import pytest
import torch

from hasten.state import PartialState
from hasten.utils.errors import ConfigurationError, DistributedOperationException
from hasten.utils.exchange import ENVELOPE_BYTES
from hasten.utils.gather_plan import gather_plan
from hasten.utils.operations import (
    broadcast,
    broadcast_object_list,
    copy_tensor_to_devices,
    gather,
    gather_object,
    pad_across_processes,
    reduce,
)
from hasten.utils.batches import listify
from tests.ranks import RankPool

Pair = namedtuple("Pair", ["left", "right"])


def _state(debug: bool = False) -> PartialState:
    if debug:
        os.environ["ACCELERATE_DEBUG_MODE"] = "1"  # the pool restores the environment after each task
        PartialState._reset_state()
    return PartialState()


def _raised(function: Any, *args: Any, **kwargs: Any) -> str:
    try:
        function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the test reads the type and message
        return f"{type(error).__name__}: {error}"
    return "nothing raised"


# --- gather -------------------------------------------------------------------------------------


def _mixed(rank: int, rows: int = 2) -> dict[str, Any]:
    return {
        "f32": torch.arange(rows * 3, dtype=torch.float32).view(rows, 3) + 100 * rank,
        "nest": Pair(torch.full((rows,), rank, dtype=torch.bfloat16), [torch.tensor(rank * 1.5)]),
        "ids": OrderedDict(z=torch.arange(rows, dtype=torch.int64) * (rank + 1), a=torch.tensor([rank % 2 == 0])),
        "empty": torch.empty(0, 4, dtype=torch.float16),
    }


def _on_rank_gather_mixed(rows: int) -> Any:
    state = _state()
    out = gather(_mixed(state.process_index, rows))
    return {
        "types": [type(out).__name__, type(out["nest"]).__name__, type(out["ids"]).__name__, list(out["ids"])],
        "dtypes": [str(out["f32"].dtype), str(out["nest"].left.dtype), str(out["ids"]["z"].dtype),
                   str(out["ids"]["a"].dtype)],
        "values": listify(out),
    }


def _expected_mixed(world: int, rows: int) -> Any:
    parts = [_mixed(rank, rows) for rank in range(world)]
    cat = lambda pick: torch.cat([pick(p) if pick(p).ndim else pick(p)[None] for p in parts])  # noqa: E731
    return listify({
        "f32": cat(lambda p: p["f32"]),
        "nest": Pair(cat(lambda p: p["nest"].left), [cat(lambda p: p["nest"].right[0])]),
        "ids": OrderedDict(z=cat(lambda p: p["ids"]["z"]), a=cat(lambda p: p["ids"]["a"])),
        "empty": torch.empty(0, 4, dtype=torch.float16),
    })


@pytest.mark.parametrize("rows", [2, ENVELOPE_BYTES // 12], ids=["inline", "packed-round"])
def test_gather_nested_mixed_dtypes_two_ranks(ranks2: RankPool, rows: int) -> None:
    for result in ranks2.run(_on_rank_gather_mixed, rows):
        assert result["types"] == ["dict", "Pair", "OrderedDict", ["z", "a"]]
        assert result["dtypes"] == ["torch.float32", "torch.bfloat16", "torch.int64", "torch.bool"]
        assert result["values"] == _expected_mixed(2, rows)


def test_gather_nested_mixed_dtypes_four_ranks(ranks4: RankPool) -> None:
    for result in ranks4.run(_on_rank_gather_mixed, 3):
        assert result["values"] == _expected_mixed(4, 3)


def _on_rank_gather_shapes() -> Any:
    rank = _state().process_index
    big = torch.full((ENVELOPE_BYTES,), float(rank))  # too big for the envelope: a second round
    strided = (torch.arange(6.0).view(2, 3) + rank).t()  # not contiguous
    grad = torch.ones(2, requires_grad=True) * rank
    many = [torch.tensor([rank, index]) for index in range(1500)]  # signature longer than the envelope
    return {
        "big": gather(big).view(2, -1)[:, 0].tolist(),
        "strided": gather(strided).tolist(),
        "grad": gather(grad).tolist(),
        "scalar": gather(torch.tensor(rank + 0.5)).tolist(),
        "many": [t.tolist() for t in gather(many)[:2]] + [len(gather(many))],
        "int16": gather(torch.full((ENVELOPE_BYTES,), rank - 7, dtype=torch.int16)).view(2, -1)[:, -1].tolist(),
    }


def test_gather_big_strided_grad_scalar_and_long_structures(ranks2: RankPool) -> None:
    for result in ranks2.run(_on_rank_gather_shapes):
        assert result["big"] == [0.0, 1.0]
        assert result["strided"] == [[0, 3], [1, 4], [2, 5], [1, 4], [2, 5], [3, 6]]
        assert result["grad"] == [0.0, 0.0, 1.0, 1.0]
        assert result["scalar"] == [0.5, 1.5]
        assert result["many"] == [[0, 0, 1, 0], [0, 1, 1, 1], 1500]
        assert result["int16"] == [-7, -6]  # gloo has no int16: the bytes travel instead


def _on_rank_gather_repeated() -> Any:
    """The same signature gathered again reuses its cached plan: every output stays the caller's."""
    rank = _state().process_index

    def batch(step: int) -> tuple[torch.Tensor, ...]:
        return (
            torch.full((1, 3), float(step + rank)),  # rows of one: a reshape could be a view
            torch.tensor(step * 10 + rank),  # 0-d
            torch.full((2,), step + rank, dtype=torch.bfloat16),  # a dtype numpy lacks
            torch.full((2,), float(rank), requires_grad=True) * step,
        )

    first = gather(batch(1))
    second = gather(batch(2))
    mismatch = _raised(gather, (torch.ones(1, 3 + rank), *batch(3)[1:]))  # after the cached calls
    third = gather(batch(3))
    plan = gather_plan(list(batch(4)), 2)
    with plan._lock:  # as if another thread were inside this plan's gather: fresh buffers are used
        fourth = gather(batch(4))
    return {
        "fourth": [t.tolist() for t in fourth],
        "first": [t.tolist() for t in first],
        "second": [t.tolist() for t in second],
        "third": [t.tolist() for t in third],
        "mismatch": mismatch,
    }


def test_gather_repeated_signature_outputs_are_fresh_and_still_checked(ranks2: RankPool) -> None:
    for result in ranks2.run(_on_rank_gather_repeated):
        assert result["first"] == [[[1.0] * 3, [2.0] * 3], [10, 11], [1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]]
        assert result["second"] == [[[2.0] * 3, [3.0] * 3], [20, 21], [2.0, 2.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0]]
        assert result["third"][1] == [30, 31]
        assert result["fourth"][:2] == [[[4.0] * 3, [5.0] * 3], [40, 41]]
        assert "tensor[0]: rank 0 float32[1, 3], rank 1 float32[1, 4]" in result["mismatch"]


def _on_rank_gather_mismatch(case: str) -> str:
    rank = _state().process_index
    if case == "shape":
        return _raised(gather, {"logits": torch.ones(2 + rank, 3), "ok": torch.ones(1)})
    if case == "dtype":
        return _raised(gather, [torch.ones(2, dtype=torch.float32 if rank else torch.float64)])
    if case == "count":
        return _raised(gather, [torch.ones(1)] * (rank + 1))
    return _raised(gather, "not a tensor")


def test_gather_shape_mismatch_is_named_on_every_rank(ranks4: RankPool) -> None:
    for message in ranks4.run(_on_rank_gather_mismatch, "shape"):
        assert message.startswith("DistributedOperationException: gather: the ranks passed tensors of different")
        assert ("tensor['logits']: rank 0 float32[2, 3], rank 1 float32[3, 3], rank 2 float32[4, 3], "
                "rank 3 float32[5, 3]") in message
        assert "tensor['ok']" not in message and "pad_across_processes" in message


def test_gather_dtype_count_and_type_mismatches(ranks2: RankPool) -> None:
    for message in ranks2.run(_on_rank_gather_mismatch, "dtype"):
        assert "tensor[0]: rank 0 float64[2], rank 1 float32[2]" in message
    for message in ranks2.run(_on_rank_gather_mismatch, "count"):
        assert "the ranks passed different numbers of tensors" in message
        assert "rank 0: 1 tensors ['float32[1]']" in message and "rank 1: 2 tensors" in message
    for message in ranks2.run(_on_rank_gather_mismatch, "type"):
        assert message.startswith("TypeError: Unsupported types (<class 'str'>) passed to `gather`.")
        assert "gather: tensor is a str ('not a tensor')" in message


# --- pad_across_processes -----------------------------------------------------------------------


def _on_rank_pad_then_gather(world_dim: int, pad_first: bool) -> Any:
    rank = _state().process_index
    data = {
        "rows": torch.arange(rank + 1, dtype=torch.int64) + 1,  # ragged along dim 0
        "cols": torch.ones(2, rank + 1, dtype=torch.bfloat16),  # ragged along dim 1
        "empty": torch.ones(2, 0 if rank == 0 else 2),
        "scalar": torch.tensor(float(rank)),  # no dim 1: left alone
    }
    padded = pad_across_processes(data, dim=world_dim, pad_index=-1, pad_first=pad_first)
    shapes = {key: list(value.shape) for key, value in padded.items()}
    untouched = [key for key in data if padded[key] is data[key]]
    gatherable = {key: value for key, value in padded.items() if world_dim != 1 or key != "rows"}  # rows has no dim 1
    return {"shapes": shapes, "untouched": untouched, "padded": listify(padded), "gathered": listify(gather(gatherable))}


def test_pad_across_processes_then_gather_along_dim_1(ranks2: RankPool) -> None:
    first, second = ranks2.run(_on_rank_pad_then_gather, 1, False)
    assert first["shapes"] == {"rows": [1], "cols": [2, 2], "empty": [2, 2], "scalar": []}
    assert first["untouched"] == ["rows", "scalar"] and second["untouched"] == ["rows", "cols", "empty", "scalar"]
    assert first["padded"]["cols"] == [[1.0, -1.0], [1.0, -1.0]]
    assert first["padded"]["empty"] == [[-1.0, -1.0], [-1.0, -1.0]]
    assert second["gathered"]["cols"] == [[1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [1.0, 1.0]]


def test_pad_across_processes_pad_first_four_ranks(ranks4: RankPool) -> None:
    results = ranks4.run(_on_rank_pad_then_gather, -1, True)
    assert results[0]["padded"]["rows"] == [-1, -1, -1, 1]
    assert results[2]["padded"]["rows"] == [-1, 1, 2, 3]
    assert results[3]["untouched"] == ["rows", "cols", "empty", "scalar"]
    assert results[1]["gathered"]["rows"] == [-1, -1, -1, 1, -1, -1, 1, 2, -1, 1, 2, 3, 1, 2, 3, 4]
    assert results[0]["shapes"]["scalar"] == []


def _on_rank_pad_mismatch(case: str) -> str:
    rank = _state().process_index
    if case == "ndim":
        return _raised(pad_across_processes, {"x": torch.ones(2, 2) if rank else torch.ones(2, 2, 1)}, dim=1)
    if case == "dim":
        return _raised(pad_across_processes, torch.ones(2, 2), dim=rank)
    return _raised(gather if rank else pad_across_processes, torch.ones(2))


def test_pad_across_processes_mismatches(ranks2: RankPool) -> None:
    for message in ranks2.run(_on_rank_pad_mismatch, "ndim"):
        assert "pad_across_processes: the ranks passed tensors of different numbers of dimensions" in message
        assert "tensor['x']: rank 0 float32[2, 2, 1], rank 1 float32[2, 2]" in message
    for message in ranks2.run(_on_rank_pad_mismatch, "dim"):
        assert "pad_across_processes was called with different arguments: rank 0 (dim=0, pad_first=0), " \
               "rank 1 (dim=1, pad_first=0)" in message
    for message in ranks2.run(_on_rank_pad_mismatch, "op"):
        assert "called different collectives at the same time: rank 0 pad_across_processes(), rank 1 gather()" in message


# --- reduce and broadcast -----------------------------------------------------------------------


def _on_rank_reduce(reduction: str, scale: float) -> Any:
    rank = _state().process_index
    data = {"a": torch.tensor([1.0, 2.0]) * (rank + 1), "b": [torch.tensor(3.0 * rank), torch.ones(2, 2) * rank]}
    if reduction != "mean":
        data["ints"] = torch.tensor([rank, 10 - rank])
    data["half"] = torch.tensor([rank + 0.5], dtype=torch.bfloat16)
    if reduction in ("sum", "max"):
        data["short"] = [torch.tensor([rank * 1000], dtype=torch.int16), torch.tensor([rank], dtype=torch.uint16)]
    before = listify(data)
    out = reduce(data, reduction=reduction, scale=scale)
    return {"out": listify(out), "unchanged": listify(data) == before}


def test_reduce_sum_mean_max_none_four_ranks(ranks4: RankPool) -> None:
    for result in ranks4.run(_on_rank_reduce, "sum", 1.0):
        assert result["unchanged"]
        assert result["out"] == {"a": [10.0, 20.0], "b": [18.0, [[6.0, 6.0], [6.0, 6.0]]], "ints": [6, 34],
                                 "half": [8.0], "short": [[6000], [6]]}
    for result in ranks4.run(_on_rank_reduce, "mean", 2.0):
        assert result["out"] == {"a": [5.0, 10.0], "b": [9.0, [[3.0, 3.0], [3.0, 3.0]]], "half": [4.0]}
    for result in ranks4.run(_on_rank_reduce, "max", 1.0):
        assert result["out"]["a"] == [4.0, 8.0] and result["out"]["ints"] == [3, 10]
    for result in ranks4.run(_on_rank_reduce, "none", 1.0):
        assert result["out"]["a"] == [10.0, 20.0]


def _on_rank_reduce_errors(case: str) -> str:
    rank = _state(debug=case == "debug").process_index
    if case == "int-mean":
        return _raised(reduce, {"n": [torch.tensor([rank])]})
    if case == "backend":
        return _raised(reduce, torch.ones(2, dtype=torch.uint64), reduction="sum")
    return _raised(reduce, {"x": torch.ones(rank + 1)}, reduction="sum")


def test_reduce_errors(ranks2: RankPool) -> None:
    for message in ranks2.run(_on_rank_reduce_errors, "int-mean"):
        assert message.startswith("TypeError: reduce: reduction='mean' needs floating-point tensors, but "
                                  "tensor['n'][0] is torch.int64")
    for message in ranks2.run(_on_rank_reduce_errors, "backend"):
        assert message == "RuntimeError: Invalid scalar type"  # the backend's own error, not taken for a timeout
    for message in ranks2.run(_on_rank_reduce_errors, "debug"):
        assert "reduce: the ranks passed tensors of different dtypes or shapes" in message
        assert "tensor['x']: rank 0 float32[1], rank 1 float32[2]" in message


def _on_rank_broadcast(source: int) -> Any:
    rank = _state().process_index
    data = {
        "f": torch.full((2, 3), float(rank)),
        "strided": (torch.arange(6).view(2, 3) * (rank + 1)).t(),
        "flags": [torch.tensor([rank == source, True]), torch.tensor(rank, dtype=torch.int16)],
        "half": torch.full((1,), rank, dtype=torch.float16),
    }
    single = torch.arange(3, dtype=torch.int16) + rank
    out = broadcast(data, from_process=source)
    same_objects = out["f"] is data["f"] and out["flags"][0] is data["flags"][0]
    return {"out": listify(out), "single": broadcast(single, from_process=source).tolist(), "in_place": same_objects}


def test_broadcast_nested_in_place_from_any_rank(ranks4: RankPool) -> None:
    for result in ranks4.run(_on_rank_broadcast, 2):
        assert result["in_place"]
        assert result["out"]["f"] == [[2.0] * 3] * 2
        assert result["out"]["strided"] == [[0, 9], [3, 12], [6, 15]]
        assert result["out"]["flags"] == [[True, True], 2] and result["out"]["half"] == [2.0]
        assert result["single"] == [2, 3, 4]


def _on_rank_broadcast_errors(case: str) -> str:
    rank = _state(debug=case == "debug").process_index
    if case == "source":
        return _raised(broadcast, torch.ones(1), from_process=5)
    return _raised(broadcast, [torch.ones(2, rank + 1)], from_process=1)


def test_broadcast_errors(ranks2: RankPool) -> None:
    for message in ranks2.run(_on_rank_broadcast_errors, "source"):
        assert message.startswith(f"{ConfigurationError.__name__}: broadcast: from_process=5 must be the rank of a "
                                  "process, an int from 0 to 1")
    for message in ranks2.run(_on_rank_broadcast_errors, "debug"):
        assert message.startswith(DistributedOperationException.__name__)
        assert "tensor[0]: rank 0 float32[2, 1], rank 1 float32[2, 2]" in message and "broadcast needs" in message


# --- objects ------------------------------------------------------------------------------------


def _on_rank_objects(size: int) -> Any:
    rank = _state().process_index
    gathered = gather_object([{"rank": rank, "blob": "x" * size}] * (rank + 1))
    single = gather_object(("t", rank))
    plain = gather_object({"not": "a list"})
    received = broadcast_object_list([None, None] if rank else [{"from": 0, "blob": "y" * size}, 7])
    last = broadcast_object_list([rank], from_process=1)
    return {
        "gathered": [(item["rank"], len(item["blob"])) for item in gathered],
        "single": single,
        "plain": plain,
        "received": [received[0]["from"], len(received[0]["blob"]), received[1]],
        "last": last,
    }


@pytest.mark.parametrize("size", [10, 3 * ENVELOPE_BYTES], ids=["inline", "second-round"])
def test_object_collectives_two_ranks(ranks2: RankPool, size: int) -> None:
    for result in ranks2.run(_on_rank_objects, size):
        assert result["gathered"] == [(0, size), (1, size), (1, size)]
        assert result["single"] == ["t", 0, "t", 1]
        assert result["plain"] == [{"not": "a list"}, {"not": "a list"}]
        assert result["received"] == [0, size, 7] and result["last"] == [1]


def test_object_collectives_four_ranks(ranks4: RankPool) -> None:
    for result in ranks4.run(_on_rank_objects, 100):
        assert result["gathered"] == [(0, 100), (1, 100), (1, 100)] + [(2, 100)] * 3 + [(3, 100)] * 4


def _on_rank_object_errors(case: str) -> str:
    rank = _state(debug=case != "tuple").process_index
    if case == "tuple":
        return _raised(broadcast_object_list, ("a",))
    if case == "source":
        return _raised(broadcast_object_list, ["a"], from_process=rank)
    return _raised(gather_object if rank else broadcast_object_list, ["a"])


def test_object_collective_errors(ranks2: RankPool) -> None:
    for message in ranks2.run(_on_rank_object_errors, "tuple"):
        assert message == "TypeError: broadcast_object_list: object_list must be a list (it is filled in place), got tuple."
    for message in ranks2.run(_on_rank_object_errors, "source"):
        assert "broadcast_object_list was called with different arguments: rank 0 (from_process=0), rank 1 " \
               "(from_process=1)" in message
    for message in ranks2.run(_on_rank_object_errors, "op"):
        assert "rank 0 broadcast_object_list(), rank 1 gather_object()" in message


# --- debug mode ---------------------------------------------------------------------------------


def _on_rank_debug_mismatched_calls() -> str:
    rank = _state(debug=True).process_index
    if rank == 0:
        return _raised(reduce, torch.ones(2))
    return _raised(broadcast, torch.ones(2))


def _on_rank_debug_wrong_device() -> str:
    _state(debug=True)
    return _raised(gather, {"x": torch.ones(2, device="meta")})


def _on_rank_debug_passes() -> Any:
    rank = _state(debug=True).process_index
    data = {"x": torch.ones(2) * rank}
    return [gather(data)["x"].tolist(), reduce(data, "sum")["x"].tolist(), broadcast(data)["x"].tolist(),
            gather_object([rank]), broadcast_object_list([rank])]


def test_debug_mode_catches_different_collectives_instead_of_hanging(ranks4: RankPool) -> None:
    for message in ranks4.run(_on_rank_debug_mismatched_calls):
        assert "called different collectives at the same time: rank 0 reduce(), rank 1 broadcast(), " \
               "rank 2 broadcast(), rank 3 broadcast()" in message


def test_debug_mode_checks_devices_and_lets_good_calls_through(ranks2: RankPool) -> None:
    for message in ranks2.run(_on_rank_debug_wrong_device):
        assert "DistributedOperationException: gather: tensor['x'] is on 'meta', but this process computes on 'cpu'" \
               in message
    for result in ranks2.run(_on_rank_debug_passes):
        assert result == [[0.0, 0.0, 1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0, 1], [0]]


# --- copy_tensor_to_devices ---------------------------------------------------------------------


def _on_rank_copy_tensor(holder: int, rows: int) -> Any:
    rank = _state().process_index
    tensor = torch.arange(rows * 2, dtype=torch.int16).view(rows, 2) if rank == holder else None
    out = copy_tensor_to_devices(tensor)
    return [str(out.dtype), list(out.shape), int(out.sum())]


def test_copy_tensor_to_devices_from_any_rank(ranks4: RankPool) -> None:
    for rows in (3, ENVELOPE_BYTES):  # inline, then a second-round broadcast
        expected = ["torch.int16", [rows, 2], int(torch.arange(rows * 2, dtype=torch.int16).sum())]
        assert ranks4.run(_on_rank_copy_tensor, 2, rows) == [expected] * 4


def _on_rank_copy_tensor_errors(everyone: bool) -> str:
    rank = _state().process_index
    return _raised(copy_tensor_to_devices, torch.ones(1) if everyone else None)


def test_copy_tensor_to_devices_needs_exactly_one_holder(ranks2: RankPool) -> None:
    for message in ranks2.run(_on_rank_copy_tensor_errors, True):
        assert "exactly one process must pass a tensor (the others None), but ranks [0, 1] did" in message
    for message in ranks2.run(_on_rank_copy_tensor_errors, False):
        assert message.endswith("but none did.")


# --- a rank that never arrives ------------------------------------------------------------------


def _on_rank_one_rank_skips_the_gather() -> str:
    import time

    rank = PartialState(timeout=2).process_index
    if rank == 1:
        time.sleep(5)  # never calls gather
        return "skipped"
    return _raised(gather, torch.ones(2))


def test_a_rank_that_never_arrives_is_a_timeout_naming_the_operation() -> None:
    from tests.ranks import run_on_ranks

    message, skipped = run_on_ranks(_on_rank_one_rank_skips_the_gather, 2, timeout=60)
    assert skipped == "skipped"
    assert message.startswith("RendezvousTimeoutError: gather on rank 0 of 2: the other ranks did not all take part "
                              "before the process-group timeout")
    assert "ACCELERATE_DEBUG_MODE=1" in message
