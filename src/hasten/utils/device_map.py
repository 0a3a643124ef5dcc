"""Device maps: which submodule goes on which device, planned in linear time.

``infer_auto_device_map`` fills devices in order (accelerators by index, then ``"mps"``,
``"cpu"``, ``"disk"``) with the model's modules in definition order, splitting a module into
its parameters, children and buffers when it does not fit, keeping no-split classes and tied
weights together, and reserving room for the largest remaining layer on the devices that
run offloaded layers. It produces the maps Accelerate produces, but keeps the largest
remaining layer in a running aggregate instead of re-walking the remaining modules after
each split, so its cost grows linearly with the model (see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from hasten.utils.memory_budget import DeviceKey, MemoryBudget, get_max_memory, no_split_list
from hasten.utils.modeling import (
    DtypeLike,
    ModuleScan,
    gc_paused,
    is_layer,
    top_level_entries,
)
from hasten.utils.typing import Device

logger = logging.getLogger(__name__)


def _warn_unmatched_classes(model: nn.Module, no_split: Sequence[str], modules: Iterable[nn.Module]) -> None:
    if not no_split:
        return
    present = {type(module).__name__ for module in modules}
    unmatched = [name for name in no_split if name not in present]
    if unmatched:
        warnings.warn(
            f"no_split_module_classes names {unmatched}, which match no module of this "
            f"{type(model).__name__}; check the spelling (class names such as 'LlamaDecoderLayer')",
            UserWarning,
            stacklevel=3,
        )


Entry = tuple[str, Any]
"""A module or tensor still to place, with its full name."""


def _under(name: str, root: str) -> bool:
    """Whether ``name`` is ``root`` or lies inside it (``"a.b"`` is under ``"a"``, ``"ab"`` is not)."""
    return name == root or name.startswith(root + ".")


def _split_entries(name: str, module: nn.Module) -> list[Entry]:
    """What a module is replaced by when split: its own parameters, its children, its own buffers.

    Accelerate leaves the module's own buffers out, so its maps miss them (and fail
    ``check_device_map``) whenever such a module is split; hasten places them.
    """
    return [(f"{name}.{key}", value) for key, value in top_level_entries(module)]


def _outside_kept_whole(
    modules: list[tuple[str, nn.Module]], keep_whole: set[str]
) -> list[tuple[str, nn.Module]]:
    """``modules`` (in pre-order) without the descendants of modules whose class is kept whole."""
    relevant: list[tuple[str, nn.Module]] = []
    inside: str | None = None
    for name, module in modules:  # pre-order: a no-split module's descendants follow it directly
        if inside is not None and name.startswith(inside):
            continue
        inside = None
        relevant.append((name, module))
        if type(module).__name__ in keep_whole:
            inside = name + "."
    return relevant


def _layer_stats(
    modules: list[tuple[str, nn.Module]], sizes: dict[str, float], no_split: Sequence[str]
) -> dict[str, tuple[float, int]]:
    """For every module (walked in pre-order): its largest layer's size and how many layers have it.

    A layer is a module without children or of a no-split class; one reverse pass folds each
    module's result into its parent's.
    """
    keep_whole = set(no_split)
    # Without no-split classes no module's class is read: at 100k+ modules each read is a cache miss.
    relevant = modules if not keep_whole else _outside_kept_whole(modules, keep_whole)
    folded: dict[str, tuple[float, int]] = {}
    stats: dict[str, tuple[float, int]] = {}
    for name, module in reversed(relevant):
        own = folded.pop(name, None)
        if own is None or (keep_whole and type(module).__name__ in keep_whole):
            own = (sizes.get(name, 0), 1)
        stats[name] = own
        if not name:
            continue
        parent = name.rpartition(".")[0]
        best, count = folded.get(parent, (-1, 0))
        if own[0] > best:
            folded[parent] = own
        elif own[0] == best:
            folded[parent] = (best, count + own[1])
    return stats


class _Frontier:
    """What is left to place, front first, with the largest layer among its modules always known.

    Kept reversed (the front is the end of a list); each position also stores the largest
    layer size over itself and everything behind it, and how many layers have that size. So
    pushing or popping at the front and asking for the largest remaining layer are O(1),
    where Accelerate re-walks every remaining module after each split.
    """

    def __init__(self, layers: dict[str, tuple[float, int]], entries: Sequence[Entry]) -> None:
        self._layers = layers
        self._items: list[tuple[str, Any, float, int]] = []
        self._names: dict[str, Any] = {}
        self.push(entries)

    def push(self, entries: Sequence[Entry]) -> None:
        """Put ``entries`` at the front, in their order."""
        items = self._items
        for name, value in reversed(entries):
            best, count = (items[-1][2], items[-1][3]) if items else (-1.0, 0)
            if isinstance(value, nn.Module):
                size, number = self._layers.get(name, (0, 1))
                if size > best:
                    best, count = size, number
                elif size == best:
                    count += number
            items.append((name, value, best, count))
            self._names[name] = value

    def pop(self) -> Entry:
        name, value, _, _ = self._items.pop()
        del self._names[name]
        return name, value

    def __bool__(self) -> bool:
        return bool(self._items)

    def largest_layer(self) -> tuple[float, int]:
        """Size of the largest layer among the modules left, and how many layers have it."""
        if not self._items or self._items[-1][3] == 0:
            return 0, 0
        return self._items[-1][2], self._items[-1][3]

    def entries(self) -> list[Entry]:
        return [(name, value) for name, value, _, _ in reversed(self._items)]

    def reset(self, entries: Sequence[Entry]) -> None:
        self._items.clear()
        self._names.clear()
        self.push(entries)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def remove(self, name: str) -> None:
        self.reset([entry for entry in self.entries() if entry[0] != name])

    def holder(self, tensor_name: str) -> Entry | None:
        """The entry that contains ``tensor_name`` (a strict ancestor of it), if any."""
        parts = tensor_name.split(".")
        for end in range(1, len(parts)):
            prefix = ".".join(parts[:end])
            if prefix in self._names:
                return prefix, self._names[prefix]
        return None


class _Ties:
    """Tied parameter groups, indexed by every prefix of their members' names."""

    def __init__(self, groups: list[list[str]]) -> None:
        self._groups = groups
        self._by_prefix: dict[str, list[int]] = {}
        for index, group in enumerate(groups):
            for member in group:
                parts = member.split(".")
                for end in range(1, len(parts) + 1):
                    found = self._by_prefix.setdefault(".".join(parts[:end]), [])
                    if not found or found[-1] != index:
                        found.append(index)

    def outside(self, name: str) -> list[str]:
        """Parameters tied to one inside ``name`` that are themselves outside it."""
        result: list[str] = []
        for index in self._by_prefix.get(name, ()):
            result.extend(member for member in self._groups[index] if not _under(member, name))
        return result


class _LargestLayer:
    """The largest layer the main devices must keep room for, refreshed as Accelerate refreshes it.

    The size is recomputed after every split, and otherwise only once every layer that had
    it has been taken from the frontier (placed, or moved on to the next device); until then
    it stays, exactly as in Accelerate, so the maps agree.
    """

    def __init__(
        self,
        frontier: _Frontier,
        layers: dict[str, tuple[float, int]],
        first: Sequence[Entry],
        sizes: dict[str, float],
    ) -> None:
        self._frontier = frontier
        self._layers = layers
        modules_size, modules_count = frontier.largest_layer()
        tensors = {name: sizes.get(name, 0) for name, value in first if not isinstance(value, nn.Module)}
        self.size = max([modules_size if modules_count else 0, *tensors.values()])
        self._left = modules_count if modules_count and modules_size == self.size else 0
        self._tensors = {name for name, size in tensors.items() if size == self.size}
        self._left += len(self._tensors)
        self._taken: set[str] = set()

    def take(self, name: str, value: Any) -> None:
        """``name`` left the frontier: its layers no longer count, and the size may be refreshed."""
        if name not in self._taken:
            self._taken.add(name)
            if isinstance(value, nn.Module):
                size, number = self._layers.get(name, (0, 1))
                if size == self.size:
                    self._left -= number
            elif name in self._tensors:
                self._left -= 1
        if self._left <= 0:
            self.refresh()
            self._taken = {name}

    def refresh(self) -> None:
        self.size, self._left = self._frontier.largest_layer()
        self._tensors = set()
        self._taken = set()


class _Planner:
    """One run of :func:`infer_auto_device_map`; see there for the rules."""

    def __init__(
        self,
        model: nn.Module,
        budget: dict[DeviceKey, int],
        no_split: list[str],
        dtype: DtypeLike | None,
        special_dtypes: dict[str, DtypeLike] | None,
        verbose: bool,
        offload_buffers: bool,
        fallback_allocation: bool,
    ) -> None:
        self.budget = budget
        self.devices: list[DeviceKey] = [*budget, *(["disk"] if "disk" not in budget else [])]
        gpus = [device for device in self.devices if device not in ("cpu", "disk")]
        self.gpus = gpus
        self.main_devices = ["mps"] if "mps" in gpus else [gpus[0], "cpu"] if gpus else ["cpu"]
        self.no_split = no_split
        scan = ModuleScan(model, dtype=dtype, special_dtypes=special_dtypes)
        _warn_unmatched_classes(model, no_split, (module for _, module in scan.modules))
        self.sizes = scan.sizes
        self.buffer_sizes = {} if offload_buffers else scan.buffer_sizes
        self.ties = _Ties(scan.tied_parameters())
        first = top_level_entries(model)
        self.layers = _layer_stats(scan.modules, self.sizes, no_split)
        self.frontier = _Frontier(self.layers, first)
        self.largest = _LargestLayer(self.frontier, self.layers, first, self.sizes)
        self.verbose = verbose
        self.fallback_allocation = fallback_allocation
        self.device_map: dict[str, Device] = {}
        self.used: dict[DeviceKey, float] = dict.fromkeys(self.devices, 0)
        self.buffers_used: dict[DeviceKey, float] = {}
        self.minimum: dict[DeviceKey, float] = {}
        self.index = 0

    def _say(self, message: str) -> None:
        if self.verbose:
            print(message)

    def run(self) -> dict[str, Device]:
        frontier, sizes = self.frontier, self.sizes
        while frontier:
            name, value = frontier.pop()
            self._say(f"Placing {name}.")
            self.largest.take(name, value)
            size = sizes.get(name, 0)
            outside = self.ties.outside(name)
            device = self.devices[self.index]
            limit: float | None = None if device == "disk" else self.budget[device]
            reserved: float = 0
            if device in self.main_devices and limit is not None:
                limit -= self.largest.size
                reserved = self.largest.size
            with_ties, holders = self._with_ties(size, outside)
            used = self.used[device]
            if limit is None or used + with_ties <= limit:
                self._assign(name, value, device, with_ties, holders, limit)
                continue
            if outside and used + size <= limit and self._split_tied(name, value, holders):
                continue
            if used + size >= limit and not is_layer(value, self.no_split):
                self._say(
                    f"  {name} ({size} bytes) does not fit in the {limit - used} bytes left on {device}: "
                    "split."
                )
                frontier.push(_split_entries(name, value))
                self.largest.refresh()
                continue
            if (
                used == 0
                and self.fallback_allocation
                and device != "disk"
                and self._fallback(name, value, device, with_ties)
            ):
                continue
            if used == 0:
                self.minimum[device] = with_ties + reserved
            self._say(f"  {name} does not fit on {device} and cannot be split: moving on to the next device.")
            self.used[device] = used + reserved
            self.index += 1
            frontier.push([(name, value)])
        return self.device_map

    def _with_ties(self, size: float, outside: list[str]) -> tuple[float, list[Entry]]:
        total, holders = size, []
        for tensor_name in outside:
            holder = self.frontier.holder(tensor_name)
            if holder is None:
                continue
            holders.append(holder)
            total += self.sizes.get(holder[0], 0) - self.sizes.get(tensor_name, 0)
        return total, holders

    def _assign(
        self,
        name: str,
        value: Any,
        device: DeviceKey,
        with_ties: float,
        holders: list[Entry],
        limit: float | None,
    ) -> None:
        left = "" if limit is None else f" ({limit - self.used[device]} bytes left)"
        tied = f" with tied {[holder for holder, _ in holders]}" if holders else ""
        self._say(f"  {name}{tied} ({with_ties} bytes) goes on {device}{left}.")
        self.used[device] += with_ties
        self.device_map[name] = device
        for holder, _ in holders:
            if holder in self.frontier:
                self.frontier.remove(holder)
            self.device_map[holder] = device
        if self.buffer_sizes and isinstance(value, nn.Module):
            self.buffers_used[device] = self.buffers_used.get(device, 0) + self.buffer_sizes.get(name, 0)

    def _split_tied(self, name: str, value: Any, holders: list[Entry]) -> bool:
        """Split the first splittable module holding a weight tied to ``name``; False if none can be."""
        for holder, module in holders:
            if is_layer(module, self.no_split):
                continue
            self._say(f"  {name} fits but not with its tied weights: splitting {holder}.")
            entries = self.frontier.entries()
            at = next(index for index, (entry, _) in enumerate(entries) if entry == holder)
            self.frontier.reset(
                [(name, value), *entries[:at], *_split_entries(holder, module), *entries[at + 1 :]]
            )
            self.largest.refresh()
            return True
        return False

    def _fallback(self, name: str, value: Any, device: DeviceKey, with_ties: float) -> bool:
        """Put something smaller on a device that would otherwise stay empty (``fallback_allocation``)."""
        limit = self.budget[device] - max(self.largest.size, with_ties) - self.used[device]
        if limit < 0:
            return False
        found = _find_fallback(self.frontier.entries(), self.sizes, limit, self.no_split, self.ties)
        if found is None:
            return False
        chosen, rest = found
        self._say(f"  Falling back to {chosen[0]} for {device}.")
        self.frontier.reset([chosen, (name, value), *rest])
        return True


def _find_fallback(
    entries: list[Entry], sizes: dict[str, float], limit: float, no_split: list[str], ties: _Ties
) -> tuple[Entry, list[Entry]] | None:
    """The first module or tensor (depth first) that fits in ``limit`` with its tied weights, and the
    remaining entries with the chosen one's ancestors replaced by their parts."""
    stack = list(reversed(entries))
    chosen: Entry | None = None
    while stack:
        name, value = stack.pop()
        total = sizes.get(name, 0)
        for tensor_name in ties.outside(name):
            holder = next(
                (entry for entry, _ in reversed(stack) if tensor_name.startswith(entry + ".")), None
            )
            if holder is not None:
                total += sizes.get(holder, 0) - sizes.get(tensor_name, 0)
        if total <= limit:
            chosen = (name, value)
            break
        if not is_layer(value, no_split):
            stack.extend(reversed(_split_entries(name, value)))
    if chosen is None:
        return None
    rest = entries
    while chosen[0] not in {entry for entry, _ in rest}:
        at = next(index for index, (entry, _) in enumerate(rest) if _under(chosen[0], entry))
        parent, module = rest[at]
        rest = [*rest[:at], *_split_entries(parent, module), *rest[at + 1 :]]
    return chosen, [entry for entry in rest if entry[0] != chosen[0]]


def infer_auto_device_map(
    model: nn.Module,
    max_memory: MemoryBudget | None = None,
    no_split_module_classes: list[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: dict[str, DtypeLike] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
) -> dict[str, Device]:
    """Which device each submodule of ``model`` should live on, within ``max_memory``.

    Devices are filled in order (accelerator indices, ``"mps"``, ``"cpu"``, then ``"disk"``, which
    is always available unless ``max_memory`` sets ``"disk": 0``) with the model's parameters,
    children and buffers in definition order. A module that does not fit is split into its
    parts, unless it has none or its class is in ``no_split_module_classes``; tied weights go
    together. The first accelerator and the CPU keep room for the largest layer not yet placed,
    since offloaded layers are brought there to run. The model may be on ``meta``.

    Args:
        model: the model to plan for.
        max_memory: budget per device (see :func:`get_max_memory`); detected when ``None``.
        no_split_module_classes: class names never split across devices (e.g. residual blocks).
        dtype: dtype the weights will be loaded in; special_dtypes: per-tensor overrides.
        verbose: print each decision.
        clean_result: merge submodules that share a device into their parent's entry.
        offload_buffers: do not count buffers of offloaded modules against accelerator memory.
        fallback_allocation: when a device would stay empty because the next module is too big,
            put the first smaller module or tensor that fits there instead.
    """
    budget = get_max_memory(max_memory)
    no_split = no_split_list(no_split_module_classes)
    with gc_paused():
        planner = _Planner(
            model, budget, no_split, dtype, special_dtypes, verbose, offload_buffers, fallback_allocation
        )
        device_map = planner.run()
    if clean_result:
        device_map = clean_device_map(device_map)
    if max_memory is not None and budget.get("disk", None) == 0 and "disk" in device_map.values():
        on_disk = [name for name, device in device_map.items() if device == "disk"]
        raise ValueError(
            f"the model ({planner.sizes.get('', 0)} bytes) does not fit in max_memory={max_memory!r}, which "
            "forbids "
            f"disk ('disk': 0): {on_disk} would go to disk. Raise a budget, or allow disk offload"
        )
    _warn_offloaded_buffers(planner)
    if planner.minimum:
        needs = ", ".join(f"{device}: {int(size)} bytes" for device, size in planner.minimum.items())
        logger.info("No module fitted on some devices; each would need at least: %s.", needs)
    return device_map


def _warn_offloaded_buffers(planner: _Planner) -> None:
    off_accelerator = planner.buffers_used.get("cpu", 0) + planner.buffers_used.get("disk", 0)
    if off_accelerator <= 0 or not planner.gpus:
        return
    room = any(
        limit >= off_accelerator + planner.used.get(device, 0)
        for device, limit in planner.budget.items()
        if device not in ("cpu", "disk")
    )
    if not room:
        warnings.warn(
            f"The offloaded modules hold {int(off_accelerator)} bytes of buffers, which fit on no "
            "accelerator next to "
            "the weights placed there; if you run out of memory, pass offload_buffers=True",
            UserWarning,
            stacklevel=3,
        )


def clean_device_map(device_map: dict[str, Device], module_name: str = "") -> dict[str, Device]:
    """Merge the entries under each module that all share one device into a single entry for it.

    Works top down from ``module_name`` (``""``: the whole map), in place, and returns the map.
    A merged entry takes the place of the first entry it replaces, so the order stays the model's.
    """
    depth = len(module_name.split(".")) if module_name else 0
    chains: dict[str, list[str]] = {}
    stats: dict[str, tuple[int, Any, bool]] = {}
    for key, device in device_map.items():
        if module_name and not key.startswith(module_name + "."):
            continue
        parts = key.split(".")
        chain = chains[key] = [module_name, *(".".join(parts[:end]) for end in range(depth + 1, len(parts)))]
        for node in chain:
            count, first, uniform = stats.get(node, (0, device, True))
            stats[node] = (count + 1, first, uniform and first == device)
    result: dict[str, Device] = {}
    for key, device in device_map.items():
        chain = chains.get(key, [])
        owner = next((node for node in chain if stats[node][0] > 1 and stats[node][2]), None)
        if owner is None:
            result[key] = device
        elif owner not in result:
            result[owner] = device
    device_map.clear()
    device_map.update(result)
    return device_map
