"""Where a prepared loader is in its epochs, and what fixes each epoch's order: what exact resume needs.

An epoch's order is drawn when its iterator is created and its first batch fetched: from the
sampler's generator (a ``RandomSampler`` given one, or the one ``prepare_data_loader`` attaches),
from the ``DataLoader``'s or the dataset's generator, from ``seed + epoch``
(:class:`SeedableRandomSampler`), or from the global torch RNG (a ``RandomSampler`` without a
generator draws its seed there, and every iterator draws the ``DataLoader``'s base seed there).
:class:`Progress` records those states as the epoch starts, and counts the batches handed out.

Restoring a state that was saved mid-epoch sets the generators back to the epoch's start and
marks the next epoch start as a replay: it draws from the recorded global RNG state and then
puts every global RNG stream back as it was (they were restored from the checkpoint and must
continue from there), so a resumed run draws exactly the numbers the uninterrupted one drew.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hasten.data_loading.samplers import SeedableRandomSampler
from hasten.utils.device import accelerator_type

_ACCELERATOR_RNGS = ("cuda", "xpu", "npu", "mlu", "musa", "sdaa", "hpu")
_KEYS = {"iteration", "batches_yielded", "generators"}
_OPTIONAL_KEYS = {"rng_state", "sampler"}


@dataclass(slots=True)
class Progress:
    """One loader's position; shared with the loaders :func:`skip_first_batches` makes from it."""

    iteration: int = 0
    batches_yielded: int = 0
    epoch_rng: torch.Tensor | None = None
    epoch_generators: dict[str, torch.Tensor] = field(default_factory=dict)
    replay: bool = False  # the next epoch start replays a restored epoch
    loader_state: dict[str, Any] | None = None  # the latest torchdata snapshot (stateful loaders)
    in_epoch: bool = False
    last_batch_out: bool = False  # the epoch in progress has handed out its last batch

    def start(self, generators: dict[str, torch.Generator], position: int = 0) -> bool:
        """Begin an epoch at batch ``position``; record what fixes its order unless it replays a
        restored one.

        Returns whether it replays (the caller then guards the global RNG streams).
        """
        replay, self.replay = self.replay, False
        if not replay:
            self.loader_state = None
            self.epoch_rng = torch.get_rng_state()
            self.epoch_generators = {role: g.get_state() for role, g in generators.items()}
        self.batches_yielded = position
        self.in_epoch = True
        self.last_batch_out = False
        return replay

    def abandon(self) -> None:
        """The epoch was left before its end: the next one starts afresh with the same iteration."""
        if self.in_epoch:
            self.batches_yielded = 0
            self.in_epoch = False
            self.epoch_rng = None
            self.epoch_generators = {}
            self.loader_state = None

    def finish(self) -> None:
        """The epoch ran to its end: the next one starts from batch 0."""
        self.iteration += 1
        self.batches_yielded = 0
        self.in_epoch = False
        self.epoch_rng = None
        self.epoch_generators = {}


def order_generators(sampler: Any, loader_generator: Any, dataset: Any) -> dict[str, torch.Generator]:
    """The generators an epoch's order is drawn from, by role (each generator once)."""
    found: dict[str, torch.Generator] = {}
    seedable = isinstance(sampler, SeedableRandomSampler)  # reseeded every epoch: nothing to keep
    candidates = [
        ("sampler", None if seedable else getattr(sampler, "generator", None)),
        ("loader", loader_generator),
        ("dataset", getattr(getattr(dataset, "dataset", dataset), "generator", None)),
    ]
    for role, generator in candidates:
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found.values()):
            found[role] = generator
    return found


def _accelerator_module() -> Any:
    kind = accelerator_type()
    if kind not in _ACCELERATOR_RNGS:
        return None
    module = getattr(torch, kind, None)
    initialized = getattr(module, "is_initialized", None)
    return module if module is not None and (initialized is None or initialized()) else None


def global_rng_streams() -> tuple[torch.Tensor, Any]:
    """The global torch CPU RNG state and the accelerator's (``None`` without one in use)."""
    module = _accelerator_module()
    return torch.get_rng_state(), (module.get_rng_state_all() if module is not None else None)


def restore_global_rng_streams(streams: tuple[torch.Tensor, Any]) -> None:
    """Put back what :func:`global_rng_streams` returned."""
    cpu, device = streams
    torch.set_rng_state(cpu)
    if device is not None:
        _accelerator_module().set_rng_state_all(device)


def progress_state(
    progress: Progress, sampler: Any, generators: dict[str, torch.Generator]
) -> dict[str, Any]:
    """The plain-data state of ``progress`` (ints, dicts and tensors only).

    Once the last batch of an epoch is out, every draw of that epoch has
    been made, so the state is the one between epochs: the next iteration, from batch 0.
    """
    if progress.in_epoch and progress.last_batch_out:
        state: dict[str, Any] = {"iteration": progress.iteration + 1, "batches_yielded": 0}
    else:
        state = {"iteration": progress.iteration, "batches_yielded": progress.batches_yielded}
    if state["batches_yielded"] > 0 or progress.replay:  # an epoch in progress: its start fixes its order
        state["generators"] = {role: s.clone() for role, s in progress.epoch_generators.items()}
        if progress.epoch_rng is not None:
            state["rng_state"] = progress.epoch_rng.clone()
    else:  # between epochs: the generators as they are now fix the next epoch
        state["generators"] = {role: g.get_state() for role, g in generators.items()}
    if isinstance(sampler, SeedableRandomSampler):
        state["sampler"] = sampler.state_dict()
    return state


def _check_state(state: Any, owner: str) -> None:
    if not isinstance(state, dict) or not set(state) >= _KEYS:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{owner}.load_state_dict: expected the dict {owner}.state_dict() returns, with keys "
            f"{sorted(_KEYS)} (and optionally {sorted(_OPTIONAL_KEYS)}); got {keys}. Was it saved from "
            "another kind of loader?"
        )
    for key in ("iteration", "batches_yielded"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{owner}.load_state_dict: state[{key!r}]={value!r} must be an int >= 0.")


def load_progress_state(
    progress: Progress,
    state: dict[str, Any],
    sampler: Any,
    generators: dict[str, torch.Generator],
    owner: str,
) -> None:
    """Restore what :func:`progress_state` returned into ``progress``, the sampler and the generators.

    Raises:
        ValueError: the state does not fit this loader (missing keys, a generator role it lacks, a
            seedable-sampler state for a loader without one or the reverse).
    """
    _check_state(state, owner)
    saved = state["generators"]
    if not isinstance(saved, dict) or set(saved) != set(generators):
        held = sorted(saved) if isinstance(saved, dict) else saved
        raise ValueError(
            f"{owner}.load_state_dict: the state holds generators {held!r} "
            f"but this loader draws its order from {sorted(generators)}. Prepare the loader as the saved "
            "one was (same sampler, generator and dataset)."
        )
    seedable = isinstance(sampler, SeedableRandomSampler)
    if seedable != ("sampler" in state):
        raise ValueError(
            f"{owner}.load_state_dict: the state was saved "
            f"{'with' if 'sampler' in state else 'without'} a SeedableRandomSampler but this loader has "
            f"{'one' if seedable else 'none'}; prepare it with the same use_seedable_sampler setting."
        )
    for role, generator in generators.items():
        generator.set_state(saved[role])
    if seedable:
        sampler.load_state_dict(state["sampler"])
    progress.iteration = state["iteration"]
    progress.batches_yielded = state["batches_yielded"]
    progress.replay = state["batches_yielded"] > 0
    progress.in_epoch = False
    progress.epoch_generators = {role: s.clone() for role, s in saved.items()} if progress.replay else {}
    rng = state.get("rng_state")
    progress.epoch_rng = rng.clone() if progress.replay and isinstance(rng, torch.Tensor) else None
