"""Model sizes, tensors and tied weights, computed in one pass over the module tree.

Sizes are what device maps are planned from, so they follow Accelerate's rules:
a size is ``numel * bytes per element``; a parameter shared under two names
(tied weights) is counted once, under its first name; with a target ``dtype``,
floating tensors count at the smaller of their own and the target size while
integer and bool tensors keep theirs (loading never casts them).
"""

from __future__ import annotations

import contextlib
import gc
import re
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from hasten.utils.dataclasses.enums import CustomDtype
from hasten.utils.reexport import lazy_reexports

DtypeLike = str | torch.dtype | CustomDtype

_SIZE_PATTERN = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMGT]I?B)\s*$", re.IGNORECASE)
_BINARY = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DECIMAL = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def convert_file_size_to_int(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"10GiB"``, ``"10GB"``, ``"500MB"``.

    ``GiB``/``MiB``/``KiB`` are powers of 1024, ``GB``/``MB``/``KB`` powers of 1000. As in
    Accelerate (and transformers), a unit ending in a lower-case ``b`` (``"10Gb"``) means bits.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"size={size!r} must be an int (bytes) or a string like '10GiB', '10GB' or '500MB'")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE_PATTERN.match(size)
        if match is None:
            raise ValueError(
                f"size={size!r} is not a size hasten can read: use an int number of bytes or a number "
                "followed by "
                f"one of {sorted(_BINARY) + sorted(_DECIMAL)} (e.g. '10GiB', '500MB')"
            )
        number, unit = float(match.group(1)), match.group(2)
        upper = unit.upper()
        value = int(number * _BINARY[upper]) if upper in _BINARY else int(number * _DECIMAL[upper])
        if unit.endswith("b") and upper in _DECIMAL:
            value //= 8
    if value < 0:
        raise ValueError(f"size={size!r} is negative; a memory size must be at least 0 bytes")
    return value


_CUSTOM_BYTES: dict[CustomDtype, float] = {CustomDtype.INT2: 0.25, CustomDtype.INT4: 0.5, CustomDtype.FP8: 1}


def dtype_byte_size(dtype: DtypeLike) -> float:
    """Bytes one element of ``dtype`` occupies: a fraction for the packed types (``CustomDtype.INT4``
    0.5, ``INT2`` 0.25; ``FP8`` 1), which may also be named by their values (``"int4"``).

    ``bool`` is one byte, as torch stores it (Accelerate says 1/8, undercounting bool buffers).
    This is the one table of sizes: device maps, memory budgets and ``hasten estimate-memory`` use it.
    """
    if isinstance(dtype, str) and dtype in _CUSTOM_BYTES:  # CustomDtype members are str-valued
        return _CUSTOM_BYTES[CustomDtype(dtype)]
    return as_torch_dtype(dtype).itemsize


def as_torch_dtype(dtype: DtypeLike) -> torch.dtype:
    """``dtype`` as a ``torch.dtype``; accepts ``"float16"``, ``"torch.float16"`` and dtypes.

    Raises:
        ValueError: ``dtype`` names no torch dtype (the packed ``CustomDtype`` types have none).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and not isinstance(dtype, CustomDtype):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(found, torch.dtype):
            return found
    raise ValueError(
        f"dtype={dtype!r} is not a torch dtype: pass a torch.dtype or a name such as 'float16' or "
        f"'torch.bfloat16' (the packed types {CustomDtype.list()} only size memory plans)"
    )


def keeps_own_dtype(dtype: torch.dtype) -> bool:
    """Integer and bool tensors are never cast when a model is loaded in another dtype."""
    return not (dtype.is_floating_point or dtype.is_complex)


def value_dtype(stored: torch.dtype, requested: torch.dtype) -> torch.dtype:
    """The dtype a tensor stored as ``stored`` is loaded in when ``requested`` is asked for: floating
    tensors take it, integer and bool tensors keep theirs."""
    return stored if keeps_own_dtype(stored) else requested


def _non_persistent(module: nn.Module) -> set[str]:
    return module._non_persistent_buffers_set


def named_module_tensors(
    module: nn.Module,
    include_buffers: bool = True,
    recurse: bool = False,
    remove_non_persistent: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters of ``module``, then its buffers (all of them, or only persistent ones)."""
    yield from module.named_parameters(recurse=recurse)
    if not include_buffers:
        return
    skipped = non_persistent_buffer_names(module, recurse=recurse) if remove_non_persistent else set()
    for name, buffer in module.named_buffers(recurse=recurse):
        if name not in skipped:
            yield name, buffer


def non_persistent_buffer_names(module: nn.Module, recurse: bool = False) -> set[str]:
    """Names (relative to ``module``) of the buffers left out of its ``state_dict``."""
    if not recurse:
        return set(_non_persistent(module))
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, child in module.named_modules()
        for name in _non_persistent(child)
    }


def _walk(model: nn.Module, remove_duplicate: bool) -> tuple[list[tuple[str, nn.Module]], int]:
    order: list[tuple[str, nn.Module]] = []
    append = order.append
    seen = {id(model)}
    skipped = 0

    def visit(name: str, dot: str, module: nn.Module) -> None:
        nonlocal skipped
        append((name, module))
        for key, child in module._modules.items():
            if child is None:
                continue
            if id(child) in seen:
                skipped += 1
                if remove_duplicate:
                    continue
            seen.add(id(child))
            full = dot + key
            visit(full, full + ".", child)

    try:
        visit("", "", model)
    except RecursionError:  # nested deeper than Python recurses: let torch's generators walk it
        everything = list(model.named_modules(remove_duplicate=False))
        unique = list(model.named_modules())
        return (unique if remove_duplicate else everything), len(everything) - len(unique)
    return order, skipped


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small objects.

    Walking a model of 100k modules creates hundreds of thousands of strings and tuples; each
    automatic collection would traverse the whole heap (the model included) and can double the
    cost. Nothing built here forms reference cycles, so pausing loses nothing.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def walk_modules(model: nn.Module, remove_duplicate: bool = True) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules(remove_duplicate=...))`` in the same order, about 25% faster.

    ``named_modules`` re-yields every module through each generator above it; this appends once.
    """
    return _walk(model, remove_duplicate)[0]


def _count_when_held_once() -> int:
    """The reference count of a value read by ``for key, value in store.items()`` when ``store`` is the
    only thing holding it (the loop's own references included), measured by the same loop shape.

    Measured at each scan rather than once at import, so that a tracer or debugger that holds extra
    references to frame locals raises this count along with the scan's (never the reverse, which
    would hide ties).
    """
    store, count = {"value": object()}, 0
    for _, value in store.items():
        count = sys.getrefcount(value)
    return count


class ModuleScan:
    """One pass over a model: sizes (as :func:`compute_module_sizes`), buffer bytes, tied parameters.

    Device-map planning needs all three; computing them in one recursive walk that returns
    each subtree's totals (instead of four walks and a prefix sum per tensor) is most of what
    makes planning fast on models with 100k+ modules and tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: DtypeLike | None = None,
        special_dtypes: dict[str, DtypeLike] | None = None,
        buffers_only: bool = False,
    ) -> None:
        target = None if dtype is None else dtype_byte_size(dtype)
        special = {name: dtype_byte_size(kind) for name, kind in (special_dtypes or {}).items()}
        per_element: dict[torch.dtype, float] = {}
        sizes: defaultdict[str, float] = defaultdict(int)
        buffer_sizes: dict[str, float] = {}
        first_name: dict[int, str] = {}
        ties: dict[str, list[str]] = {}
        modules: list[tuple[str, nn.Module]] = []
        seen = {id(model)}
        shared = 0
        getrefcount, held_once = sys.getrefcount, _count_when_held_once()

        def factor_of(kind: torch.dtype) -> float:
            factor: float = kind.itemsize
            if target is not None and not keeps_own_dtype(kind):
                factor = min(factor, target)
            per_element[kind] = factor
            return factor

        def tensors(dot: str, store: dict[str, Any], is_buffer: bool) -> tuple[float, int]:
            total: float = 0
            count = 0
            for name, tensor in store.items():
                if tensor is None:
                    continue
                full = dot + name
                # Only a tensor held by more than this one dict can be met again under another name
                # (tied): the others skip the identity table, which at 100k+ tensors costs cache misses.
                if getrefcount(tensor) > held_once:
                    known = first_name.setdefault(id(tensor), full)
                    if known is not full:
                        if not is_buffer:
                            ties.setdefault(known, [known]).append(full)
                        continue
                factor = per_element.get(tensor.dtype) or factor_of(tensor.dtype)
                size = tensor.numel() * (special[full] if special and full in special else factor)
                sizes[full] = size
                total += size
                count += 1
            return total, count

        def visit(prefix: str, dot: str, module: nn.Module) -> tuple[float, float, int]:
            nonlocal shared
            modules.append((prefix, module))
            total, count = (0.0, 0) if buffers_only else tensors(dot, module._parameters, False)
            buffers, buffer_count = tensors(dot, module._buffers, True)
            total += buffers
            count += buffer_count
            for key, child in module._modules.items():
                if child is None:
                    continue
                if getrefcount(child) > held_once:  # as for tensors: only these can be met twice
                    if id(child) in seen:
                        shared += 1
                        continue
                    seen.add(id(child))
                full = dot + key
                child_total, child_buffers, child_count = visit(full, full + ".", child)
                total += child_total
                buffers += child_buffers
                count += child_count
            if count:
                sizes[prefix] = total
            if buffers:
                buffer_sizes[prefix] = buffers
            return total, buffers, count

        try:
            with gc_paused():
                visit("", "", model)
        except RecursionError:
            raise ValueError(
                f"{type(model).__name__} is nested deeper than Python can recurse ({len(modules)} modules "
                "on one "
                "path); raise sys.setrecursionlimit to size it"
            ) from None
        self.modules = modules
        self.sizes = sizes
        self.buffer_sizes = buffer_sizes
        self._ties = ties
        self._complete_ties = not shared and not buffers_only
        self._model = model

    def tied_parameters(self) -> list[list[str]]:
        """:func:`find_tied_parameters`, from this pass when no module is shared (else a full walk)."""
        if not self._complete_ties:
            return find_tied_parameters(self._model)
        return [sorted(set(names)) for names in self._ties.values()]


def compute_module_sizes(
    model: nn.Module,
    dtype: DtypeLike | None = None,
    special_dtypes: dict[str, DtypeLike] | None = None,
    buffers_only: bool = False,
) -> defaultdict[str, float]:
    """Bytes held by every submodule and tensor of ``model``, keyed by name (``""`` is the whole model).

    One walk of the module tree: each tensor's size is added to its module, and each
    module's total to its parent, instead of adding every tensor to every prefix of its name.
    Modules holding no tensor are absent, as in Accelerate; missing names read as 0.

    Args:
        model: the model, on any device including ``meta``.
        dtype: the dtype the weights will be loaded in, if not their own.
        special_dtypes: per-tensor dtypes that override ``dtype``.
        buffers_only: count buffers only.
    """
    return ModuleScan(model, dtype, special_dtypes, buffers_only).sizes


def compute_module_total_buffer_size(
    model: nn.Module, dtype: DtypeLike | None = None, special_dtypes: dict[str, DtypeLike] | None = None
) -> float:
    """Bytes held by all buffers of ``model`` (sized as :func:`compute_module_sizes` does)."""
    return compute_module_sizes(model, dtype=dtype, special_dtypes=special_dtypes, buffers_only=True).get(
        "", 0
    )


def is_layer(module: Any, no_split_module_classes: Sequence[str]) -> bool:
    """A layer is kept whole on one device: a tensor, a module without children, or a no-split class."""
    if not isinstance(module, nn.Module):
        return True
    children = module._modules.values()
    return type(module).__name__ in no_split_module_classes or all(child is None for child in children)


def get_max_layer_size(
    modules: Sequence[tuple[str, Any]], module_sizes: dict[str, float], no_split_module_classes: Sequence[str]
) -> tuple[float, list[str]]:
    """The size of the largest layer under ``modules``, and the names of every layer of that size.

    ``modules`` are named modules (or tensors) whose subtrees are searched, depth first and in
    order; a layer is a tensor, a module without children, or a module whose class name is in
    ``no_split_module_classes``.
    """
    best: float = 0
    names: list[str] = []
    stack = list(reversed(modules))
    while stack:
        name, module = stack.pop()
        if is_layer(module, no_split_module_classes):
            size = module_sizes.get(name, 0)
            if size > best:
                best, names = size, [name]
            elif size == best:
                names.append(name)
        else:
            stack.extend((f"{name}.{child}", sub) for child, sub in reversed(list(module.named_children())))
    return best, names


def top_level_entries(model: nn.Module) -> list[tuple[str, Any]]:
    """What a device map places first: the model's own parameters, its children, its own buffers."""
    return [
        *model.named_parameters(recurse=False),
        *model.named_children(),
        *model.named_buffers(recurse=False),
    ]


def calculate_maximum_sizes(
    model: nn.Module, *, dtype: DtypeLike | None = None
) -> tuple[float, tuple[float, list[str]]]:
    """``(total size, (largest layer size, its names))``; transformers' ``_no_split_modules`` are layers.

    ``dtype`` (keyword-only, not in Accelerate) sizes the weights as :func:`compute_module_sizes`
    does for a load in that dtype (``"int4"`` counts half a byte per floating-point element).
    """
    sizes = compute_module_sizes(model, dtype=dtype)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    return sizes.get("", 0), get_max_layer_size(top_level_entries(model), sizes, no_split)


def get_module_children_bottom_up(
    model: nn.Module, return_fqns: bool = False
) -> list[nn.Module] | list[tuple[str, nn.Module]]:
    """Every submodule, children before parents and ``model`` last: the order to wrap or free them in.

    Siblings keep their definition order from the end of the list backwards (the order
    Accelerate returns, which FSDP wrapping relies on).
    """
    ordered: list[tuple[str, nn.Module]] = []
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        ordered.append((name, module))
        for child_name, child in module.named_children():
            stack.append((f"{name}.{child_name}" if name else child_name, child))
    ordered.reverse()
    if return_fqns:
        return ordered
    return [module for _, module in ordered]


def find_tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that refer to one tensor, each sorted, in model order.

    One pass over every module (shared modules under each of their names) grouped by identity.
    """
    groups: dict[int, list[str]] = {}
    for prefix, module in walk_modules(model, remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, parameter in module._parameters.items():
            if parameter is not None:
                groups.setdefault(id(parameter), []).append(dot + name)
    return [sorted(set(names)) for names in groups.values() if len(set(names)) > 1]


def get_non_persistent_buffers(module: nn.Module, recurse: bool = False, fqns: bool = False) -> set[str]:
    """The buffers of ``module`` left out of its ``state_dict``; with ``recurse``, its submodules' too
    (by full name when ``fqns``, else by their own short names)."""
    if recurse and fqns:
        return non_persistent_buffer_names(module, recurse=True)
    if recurse:
        return {name for child in module.modules() for name in _non_persistent(child)}
    return set(_non_persistent(module))


def check_tied_parameters_in_config(model: nn.Module) -> bool:
    """Whether a transformers model's configuration asks for tied weights (``tie_word_embeddings`` with
    output embeddings, ``tie_encoder_decoder``, or a module that ties its own weights)."""
    if "PreTrainedModel" not in {cls.__name__ for cls in type(model).__mro__}:
        return False
    config = getattr(model, "config", None)
    if config is None:
        return any(hasattr(module, "_tie_weights") for module in model.modules())
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    output_embeddings = getattr(model, "get_output_embeddings", lambda: None)()
    return bool(
        (getattr(text_config, "tie_word_embeddings", False) and output_embeddings is not None)
        or (getattr(config, "is_encoder_decoder", False) and getattr(config, "tie_encoder_decoder", False))
        or any(hasattr(module, "_tie_weights") for module in model.modules())
    )


# Accelerate's `accelerate.utils.modeling` also holds these; hasten keeps each with its concept.
__getattr__, __dir__ = lazy_reexports(
    __name__,
    globals(),
    {
        "hasten.utils.device_map": "clean_device_map infer_auto_device_map",
        "hasten.utils.device_map_checks": "check_device_map check_tied_parameters_on_same_device",
        "hasten.utils.device_map_search": "fallback_allocate get_module_size_with_ties",
        "hasten.utils.memory_budget": "get_balanced_memory get_max_memory get_module_leaves",
        "hasten.utils.loading": "load_checkpoint_in_model load_state_dict",
        "hasten.utils.offload": "load_offloaded_weights",
        "hasten.utils.amp": "get_grad_scaler get_mixed_precision_context_manager",
        "hasten.utils.placement": "retie_parameters set_module_tensor_to_device",
        "hasten.utils.parallel": "id_tensor_storage is_peft_model",
        "hasten.utils.device": "check_device_same",
        "hasten.utils.onload": "align_module_device get_state_dict_from_offload "
        "get_state_dict_offloaded_model has_offloaded_params",
    },
)
