"""Seeding and RNG synchronisation on one process (utils/random.py); ranks in tests/dist."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hasten.utils.random import set_seed, synchronize_rng_state, synchronize_rng_states


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_set_seed_makes_every_generator_repeat() -> None:
    set_seed(1234)
    first = _draws()
    set_seed(1234)
    assert _draws() == first
    set_seed(1234, device_specific=True)  # process index 0 here
    assert _draws() == first
    set_seed(2**40)  # numpy takes seeds below 2**32; larger ones still work
    set_seed(4321)
    assert _draws() != first


def test_deterministic_turns_on_deterministic_algorithms() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    try:
        set_seed(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_bad_arguments_are_explained() -> None:
    with pytest.raises(TypeError, match=r"seed='7' must be an int"):
        set_seed("7")  # type: ignore[arg-type]
    set_seed(2**64 - 1)
    set_seed(-(2**63))  # the ends of the range torch takes
    with pytest.raises(
        ValueError,
        match=r"set_seed: seed=18446744073709551616 is outside the range torch's generators take, "
        r"-9223372036854775808 to 18446744073709551615 \(2\*\*64 - 1\); pass a smaller seed",
    ):
        set_seed(2**64)
    with pytest.raises(
        ValueError, match=r"seed=18446744073709551616 \(with the process index added\) is outside"
    ):
        set_seed(2**64, device_specific=True)
    with pytest.raises(ValueError, match=r"seed=-9223372036854775809 is outside"):
        set_seed(-(2**63) - 1)
    with pytest.raises(ValueError, match=r"rng_type"):
        synchronize_rng_state("dice")
    with pytest.raises(ValueError, match=r"rng_type='generator' needs the generator"):
        synchronize_rng_state("generator")
    with pytest.raises(ValueError, match=r"rng_type='cuda': this machine has no cuda device"):
        synchronize_rng_state("cuda")


def test_one_process_keeps_its_state() -> None:
    generator = torch.Generator().manual_seed(5)
    expected = torch.rand(3, generator=torch.Generator().manual_seed(5))
    synchronize_rng_states(["torch", "generator"], generator=generator)
    synchronize_rng_state(generator=generator)
    assert torch.equal(torch.rand(3, generator=generator), expected)
