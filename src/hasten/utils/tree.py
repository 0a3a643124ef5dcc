"""Nested structures of tensors: one traversal core and the operations built on it.

A *tree* is a tensor (or any leaf) inside any nesting of lists, tuples,
namedtuples, dicts and other ``Mapping`` types. :func:`tree_map` rebuilds every
container as its own type: ``defaultdict`` keeps its factory, namedtuples are
rebuilt by position, ``UserDict`` subclasses (a transformers ``BatchEncoding``)
keep their other attributes, and every Mapping keeps its key order. Flat
batches (a dict, list or tuple of plain tensors) take a fast path.
:func:`tree_flatten` lists the leaves in the same order and gives back a
:class:`TreeSpec` that rebuilds the structure around new leaves, which is how
the collectives pack many tensors into one buffer.

A structure that refers to itself, or nests deeper than Python's recursion
limit, raises :class:`TreeNestingError` naming the path where it happens.

>>> import torch
>>> batch = {"x": torch.ones(2), "y": [torch.zeros(1), "label"]}
>>> doubled = recursively_apply(lambda t: t * 2, batch)
>>> doubled["x"].tolist(), doubled["y"][1]
([2.0, 2.0], 'label')
"""

from __future__ import annotations

import copy
from collections import UserDict, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hasten.utils.errors import TreeNestingError
from hasten.utils.typing import Device

_Tensor = torch.Tensor
_MAX_NESTING = 100  # deeper than this *and* failing with RecursionError: reported as too deep


@dataclass
class TensorInformation:
    """The shape and dtype of a tensor, enough to allocate one like it (see :func:`initialize_tensors`)."""

    shape: torch.Size
    dtype: torch.dtype


def is_torch_tensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.Tensor`` (or a subclass such as ``Parameter``)."""
    return isinstance(tensor, _Tensor)


def is_tensor_information(tensor_info: Any) -> bool:
    """Whether ``tensor_info`` is a :class:`TensorInformation`."""
    return isinstance(tensor_info, TensorInformation)


def is_namedtuple(data: Any) -> bool:
    """Whether ``data`` is a namedtuple (a tuple with ``_fields`` and ``_asdict``)."""
    return isinstance(data, tuple) and hasattr(data, "_asdict") and hasattr(data, "_fields")


def honor_type(obj: Any, generator: Any) -> Any:
    """Build a container of ``obj``'s type (list, tuple, namedtuple, ...) from the items of ``generator``."""
    if is_namedtuple(obj):
        return type(obj)(*list(generator))
    return type(obj)(generator)


# --- rebuilding containers ----------------------------------------------------------------------


class _Unbuildable(Exception):
    """Internal: a container (or leaf) the walk cannot handle; carries the node to locate its path."""

    def __init__(self, node: Any, problem: str) -> None:
        super().__init__(problem)
        self.node = node
        self.problem = problem


_NAMEDTUPLE: dict[type, bool] = {}  # sequence class -> whether it is a namedtuple (rebuilt by position)


def _rebuild_sequence(node: Any, items: list[Any]) -> Any:
    cls = type(node)
    if cls is list:
        return items
    if cls is tuple:
        return tuple(items)
    by_position = _NAMEDTUPLE.get(cls)
    if by_position is None:
        by_position = _NAMEDTUPLE[cls] = is_namedtuple(node)
    try:
        return cls(*items) if by_position else cls(items)
    except TypeError as error:
        raise _Unbuildable(node, f"{cls.__qualname__} could not be rebuilt from its items ({error})") from error


def _rebuild_mapping(node: Any, items: dict[Any, Any]) -> Any:
    cls = type(node)
    if cls is dict:
        return items
    try:
        if isinstance(node, defaultdict):
            return cls(node.default_factory, items)
        if isinstance(node, UserDict):
            rebuilt = copy.copy(node)  # keeps the other attributes (a BatchEncoding's encodings, ...)
            rebuilt.data = items
            return rebuilt
        return cls(items)
    except TypeError as error:
        raise _Unbuildable(
            node, f"{cls.__qualname__} could not be rebuilt from a dict of its items ({error}); give it a "
            "constructor that accepts a dict, or convert it to a dict first"
        ) from error


def _items_of(node: Any) -> Iterator[tuple[Any, Any]]:
    """The (key, child) pairs of a container, in traversal order (empty for a leaf)."""
    if isinstance(node, (list, tuple)):
        return iter(enumerate(node))
    if isinstance(node, Mapping):
        return iter(node.items())
    return iter(())


# --- the traversal core -------------------------------------------------------------------------


def _walker(
    func: Callable[[Any], Any],
    test: Callable[[Any], bool],
    tensors: bool,
    strict: bool,
    skip_keys: frozenset[Any],
    leaf_first: bool,
) -> Callable[[Any], Any]:
    """A visitor that applies ``func`` to the leaves ``test`` accepts and rebuilds every container.

    With ``tensors``, plain ``torch.Tensor`` objects are leaves without asking ``test``, and the
    comprehensions over lists, tuples and dicts call ``func`` on them directly (the fast path:
    no call to ``visit`` per tensor).
    """

    def leaf(node: Any) -> Any:
        if test(node):
            return func(node)
        if strict:
            raise _Unbuildable(node, "unsupported leaf")
        return node

    def visit(node: Any) -> Any:
        cls = type(node)
        if cls is _Tensor:
            return func(node) if tensors else leaf(node)
        if cls is dict:
            if skip_keys:
                return {k: v if k in skip_keys else visit(v) for k, v in node.items()}
            if tensors:
                return {k: func(v) if type(v) is _Tensor else visit(v) for k, v in node.items()}
            return {k: visit(v) for k, v in node.items()}
        if cls is list or cls is tuple:
            if tensors:
                items = [func(v) if type(v) is _Tensor else visit(v) for v in node]
            else:
                items = [visit(v) for v in node]
            return items if cls is list else tuple(items)
        if leaf_first and test(node):
            return func(node)
        if isinstance(node, (list, tuple)):
            return _rebuild_sequence(node, [visit(v) for v in node])
        if isinstance(node, Mapping):
            return _rebuild_mapping(node, {k: v if k in skip_keys else visit(v) for k, v in node.items()})
        return leaf(node)

    return visit


def tree_map(
    func: Callable[[Any], Any],
    data: Any,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    tensors: bool = True,
    strict: bool = False,
    skip_keys: frozenset[Any] = frozenset(),
    leaf_first: bool = False,
    caller: str | Callable[[], str] = "tree_map",
    argument: str = "data",
) -> Any:
    """Apply ``func`` to every leaf of ``data`` and rebuild the containers around the results.

    Args:
        func: called once per leaf, in traversal order (depth first, containers in their own order).
        data: the tree.
        is_leaf: which objects ``func`` applies to (default: tensors, subclasses included).
        tensors: plain ``torch.Tensor`` objects are always leaves, without asking ``is_leaf``
            (the fast path; ``func`` then decides what to do with each of them).
        strict: raise ``TypeError`` (naming the path) on a leaf that ``is_leaf`` rejects,
            instead of passing it through unchanged.
        skip_keys: Mapping keys whose values are kept as they are, at any depth.
        leaf_first: test ``is_leaf`` before treating a Mapping or sequence as a container
            (``send_to_device`` hands objects with a ``.to()`` method to that method).
        caller, argument: how error messages name the function (or a function that names it)
            and the argument.

    Raises:
        TypeError: ``strict`` and a leaf is not accepted, or a container cannot be rebuilt.
        TreeNestingError: ``data`` contains itself or is nested too deeply.
    """
    test = is_torch_tensor if is_leaf is None else is_leaf
    try:
        if tensors and not skip_keys and type(data) in _FLAT:
            return _flat(func, data, lambda: _walker(func, test, tensors, strict, skip_keys, leaf_first))
        return _walker(func, test, tensors, strict, skip_keys, leaf_first)(data)
    except _Unbuildable as error:
        raise _explain(error, data, test, _name(caller), argument) from None
    except RecursionError as error:
        raise _nesting_error(data, _name(caller), argument, error) from error


_FLAT = {dict, list, tuple, _Tensor}


def _flat(func: Callable[[Any], Any], data: Any, make_walker: Callable[[], Callable[[Any], Any]]) -> Any:
    """The fast path for a flat batch: a dict, list or tuple of plain tensors needs no walker.

    At the first value that is not a plain tensor, a walker is made and finishes the rest, so
    ``func`` still runs once per leaf, in order.
    """
    cls = type(data)
    if cls is _Tensor:
        return func(data)
    if cls is dict:
        out = {}
        items = iter(data.items())
        for key, value in items:
            if type(value) is not _Tensor:
                visit = make_walker()
                out[key] = visit(value)
                for key, value in items:
                    out[key] = visit(value)
                break
            out[key] = func(value)
        return out
    done: list[Any] = []
    for value in data:
        if type(value) is not _Tensor:
            visit = make_walker()
            done.extend([visit(value) for value in data[len(done) :]])
            break
        done.append(func(value))
    return done if cls is list else tuple(done)


def _name(caller: str | Callable[[], str]) -> str:
    return caller if isinstance(caller, str) else caller()


def tree_leaves(
    data: Any,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    tensors: bool = True,
    strict: bool = False,
    caller: str = "tree_leaves",
    argument: str = "data",
) -> list[Any]:
    """The leaves of ``data`` in the order :func:`tree_map` visits them (same arguments)."""
    leaves: list[Any] = []
    append = leaves.append

    def collect(leaf: Any) -> None:
        append(leaf)

    tree_map(collect, data, is_leaf=is_leaf, tensors=tensors, strict=strict, caller=caller, argument=argument)
    return leaves


class TreeSpec:
    """The shape of a tree without its leaves: :meth:`unflatten` puts new leaves in their places."""

    __slots__ = ("_data", "_is_leaf", "_tensors", "num_leaves")

    def __init__(self, data: Any, is_leaf: Callable[[Any], bool] | None, tensors: bool, num_leaves: int) -> None:
        self._data = data
        self._is_leaf = is_leaf
        self._tensors = tensors
        self.num_leaves = num_leaves

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        """The original structure with ``leaves`` (in flatten order) in place of its leaves."""
        if len(leaves) != self.num_leaves:
            raise ValueError(f"unflatten needs {self.num_leaves} leaves for this structure, got {len(leaves)}.")
        it = iter(leaves)
        return tree_map(lambda _: next(it), self._data, is_leaf=self._is_leaf, tensors=self._tensors)

    def __repr__(self) -> str:
        return f"TreeSpec({self.num_leaves} leaves)"


def tree_flatten(
    data: Any,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    tensors: bool = True,
    strict: bool = False,
    caller: str = "tree_flatten",
    argument: str = "data",
) -> tuple[list[Any], TreeSpec]:
    """The leaves of ``data`` and the :class:`TreeSpec` that rebuilds it around other leaves.

    >>> import torch
    >>> leaves, spec = tree_flatten({"a": torch.ones(1), "b": (torch.zeros(2), 3)})
    >>> len(leaves), spec.unflatten(["A", "B"])
    (2, {'a': 'A', 'b': ('B', 3)})
    """
    leaves = tree_leaves(data, is_leaf=is_leaf, tensors=tensors, strict=strict, caller=caller, argument=argument)
    return leaves, TreeSpec(data, is_leaf, tensors, len(leaves))


def leaf_paths(data: Any, argument: str = "data") -> list[str]:
    """How each leaf of ``data`` is reached (``data['a'][0]``), in the order :func:`tree_map` visits them."""
    paths: list[str] = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, (list, tuple, Mapping)) and not isinstance(node, _Tensor):
            for key, child in _items_of(node):
                visit(child, path + _key_text(node, key))
        else:
            paths.append(path)

    visit(data, argument)
    return paths


# --- errors with paths --------------------------------------------------------------------------


def _key_text(container: Any, key: Any) -> str:
    if is_namedtuple(container):
        return f".{container._fields[key]}"
    return f"[{key!r}]"


def _path_to(data: Any, target: Any) -> str | None:
    """The path (``['a'][0]``) to the first occurrence of ``target`` (by identity), depth first."""
    stack: list[tuple[str, Iterator[tuple[Any, Any]], Any]] = [("", _items_of(data), data)]
    if data is target:
        return ""
    on_path = {id(data)}
    while stack:
        path, children, container = stack[-1]
        step = next(children, None)
        if step is None:
            stack.pop()
            on_path.discard(id(container))
            continue
        key, child = step
        child_path = path + _key_text(container, key)
        if child is target:
            return child_path
        if isinstance(child, (list, tuple, Mapping)) and id(child) not in on_path:
            on_path.add(id(child))
            stack.append((child_path, _items_of(child), child))
    return None


def _explain(error: _Unbuildable, data: Any, test: Callable[[Any], bool], caller: str, argument: str) -> TypeError:
    path = argument + (_path_to(data, error.node) or "")
    if error.problem != "unsupported leaf":
        return TypeError(f"{caller}: {path} is a {error.problem}.")
    accepts = getattr(test, "__name__", repr(test))
    return TypeError(
        f"{caller}: {path} is a {type(error.node).__qualname__} ({error.node!r:.60}), but only nested "
        f"lists/tuples/dicts of objects accepted by `{accepts}` can be passed. Convert it to a tensor, or "
        "remove it from the structure."
    )


def _deepest_or_cycle(data: Any) -> tuple[str, str | None, int]:
    """Walk without recursion: the path of a cycle (and where it points back to), or the deepest path."""
    paths = {id(data): ""}
    stack: list[tuple[str, Iterator[tuple[Any, Any]], Any]] = [("", _items_of(data), data)]
    deepest, depth = "", 0
    while stack:
        path, children, container = stack[-1]
        step = next(children, None)
        if step is None:
            stack.pop()
            paths.pop(id(container), None)
            continue
        key, child = step
        child_path = path + _key_text(container, key)
        if not isinstance(child, (list, tuple, Mapping)):
            continue
        if id(child) in paths:
            return child_path, paths[id(child)], len(stack)
        paths[id(child)] = child_path
        stack.append((child_path, _items_of(child), child))
        if len(stack) > depth:
            deepest, depth = child_path, len(stack)
    return deepest, None, depth


def _shorten(path: str, limit: int = 120) -> str:
    return path if len(path) <= limit else f"{path[: limit // 2]}...{path[-limit // 3 :]}"


def _nesting_error(data: Any, caller: str, argument: str, error: RecursionError) -> Exception:
    path, back_to, depth = _deepest_or_cycle(data)
    path, back_to = _shorten(path), None if back_to is None else _shorten(back_to)
    if back_to is not None:
        return TreeNestingError(
            f"{caller}: {argument}{path} is {argument}{back_to} itself, so {argument} contains itself and has "
            "no end. Pass a structure without cycles (copy the part that refers back)."
        )
    if depth < _MAX_NESTING:
        return error  # the recursion came from the applied function, not from the structure
    return TreeNestingError(
        f"{caller}: {argument} is nested {depth} levels deep (down to {argument}{path}), deeper than Python's "
        "recursion limit allows. Flatten the structure, or raise the limit with sys.setrecursionlimit()."
    )


# --- operations on trees ------------------------------------------------------------------------


def recursively_apply(
    func: Callable[..., Any],
    data: Any,
    *args: Any,
    test_type: Callable[[Any], bool] = is_torch_tensor,
    error_on_other_type: bool = False,
    **kwargs: Any,
) -> Any:
    """Apply ``func(leaf, *args, **kwargs)`` to every leaf of ``data`` that ``test_type`` accepts.

    Containers (lists, tuples, namedtuples, dicts and other Mappings) are rebuilt as their own
    type; other objects pass through unchanged, or raise a ``TypeError`` naming their path when
    ``error_on_other_type`` is set.
    """
    leaf = func if not (args or kwargs) else (lambda node: func(node, *args, **kwargs))
    return tree_map(
        leaf,
        data,
        is_leaf=test_type,
        tensors=test_type is is_torch_tensor,
        strict=error_on_other_type,
        caller=lambda: f"recursively_apply({getattr(func, '__name__', 'func')})",
    )


_DEVICES: dict[Any, torch.device] = {}  # parsed device strings and indices


def _as_device(device: Any) -> torch.device:
    if isinstance(device, torch.device):
        return device
    known = _DEVICES.get(device) if isinstance(device, str) else None
    if known is not None:
        return known
    if device == "npu":
        device = "npu:0"  # torch_npu cannot find its context from a bare "npu"
    if isinstance(device, (str, int)) and not isinstance(device, bool):
        try:
            parsed = torch.device(device)
        except RuntimeError as error:
            raise ValueError(
                f"send_to_device: device={device!r} cannot be used: {error} Pass a device this machine has, "
                "such as 'cpu'."
            ) from None
        if isinstance(device, str) and len(_DEVICES) < 64:
            _DEVICES[device] = parsed
        return parsed
    raise TypeError(
        f"send_to_device: device={device!r} must be a torch.device, a device string such as 'cpu' or 'cuda:0', "
        "or an accelerator index."
    )


def _has_to(node: Any) -> bool:
    return hasattr(node, "to")


def send_to_device(
    tensor: Any, device: Device, non_blocking: bool = False, skip_keys: str | list[str] | None = None
) -> Any:
    """Move every tensor (and object with a ``.to()`` method) in a nested structure to ``device``.

    Tensors already on ``device`` are returned as they are (no copy). Values under the Mapping
    keys named in ``skip_keys`` (a key or a list of keys, at any depth) stay where they are.
    """
    target = _as_device(device)
    if skip_keys is None and type(tensor) is dict:  # the usual batch: a flat dict of tensors
        moved = {}
        for key, value in tensor.items():
            if type(value) is not _Tensor:
                break
            moved[key] = value if value.device == target else value.to(target, non_blocking=non_blocking)
        else:
            return moved
    if skip_keys is None:
        skip: frozenset[Any] = frozenset()
    elif isinstance(skip_keys, str):
        skip = frozenset([skip_keys])
    else:
        try:
            skip = frozenset(skip_keys)
        except TypeError:
            raise TypeError(f"send_to_device: skip_keys={skip_keys!r} must be a key or a list of keys.") from None

    def move(node: Any) -> Any:
        if type(node) is _Tensor:
            return node if node.device == target else node.to(target, non_blocking=non_blocking)
        try:
            return node.to(target, non_blocking=non_blocking)
        except TypeError:  # a .to() that takes no non_blocking
            return node.to(target)

    return tree_map(move, tensor, is_leaf=_has_to, skip_keys=skip, leaf_first=True, caller="send_to_device",
                    argument="tensor")


def get_data_structure(data: Any) -> Any:
    """``data`` with a :class:`TensorInformation` (shape and dtype) in place of each tensor."""
    return tree_map(lambda t: TensorInformation(shape=t.shape, dtype=t.dtype), data, caller="get_data_structure")


def get_shape(data: Any) -> Any:
    """``data`` with each tensor's shape, as a list of ints, in its place."""
    return tree_map(lambda t: list(t.shape), data, caller="get_shape")


def initialize_tensors(data_structure: Any) -> Any:
    """Allocate an uninitialised tensor for every :class:`TensorInformation` in ``data_structure``."""
    return tree_map(
        lambda info: torch.empty(*info.shape, dtype=info.dtype),
        data_structure,
        is_leaf=is_tensor_information,
        tensors=False,
        caller="initialize_tensors",
        argument="data_structure",
    )


def _to_list(tensor: torch.Tensor) -> Any:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy, which tolist goes through, has no bfloat16
        tensor = tensor.float()
    return tensor.tolist()


def listify(data: Any) -> Any:
    """``data`` with each tensor turned into (nested lists of) Python numbers."""
    return tree_map(_to_list, data, caller="listify")


def slice_tensors(
    data: Any, tensor_slice: Any, process_index: int | None = None, num_processes: int | None = None
) -> Any:
    """``data`` with ``tensor[tensor_slice]`` in place of each tensor.

    ``process_index`` and ``num_processes`` are accepted for compatibility and not used.
    """
    return tree_map(lambda t: t[tensor_slice], data, caller="slice_tensors")


def _concatenate_level(items: list[Any], dim: int, path: str) -> Any:
    first = items[0]
    if isinstance(first, _Tensor):
        try:
            return torch.cat(items, dim=dim)
        except TypeError:
            bad = next(i for i, item in enumerate(items) if not isinstance(item, _Tensor))
            raise TypeError(
                f"concatenate: data[{bad}]{path} is a {type(items[bad]).__qualname__}, but data[0]{path} is a tensor."
            ) from None
    if isinstance(first, (list, tuple)):
        for index, item in enumerate(items):
            if not isinstance(item, (list, tuple)) or len(item) != len(first):
                raise ValueError(
                    f"concatenate: data[{index}]{path} does not have the {len(first)} items of data[0]{path}."
                )
        parts = [_concatenate_level([item[i] for item in items], dim, f"{path}[{i}]") for i in range(len(first))]
        return _rebuild_sequence(first, parts)
    if isinstance(first, Mapping):
        merged = {}
        for key in first:
            try:
                column = [item[key] for item in items]
            except (KeyError, TypeError):
                raise ValueError(f"concatenate: some item of data lacks the key {path}[{key!r}] of data[0].") from None
            merged[key] = _concatenate_level(column, dim, f"{path}[{key!r}]")
        return _rebuild_mapping(first, merged)
    if len(items) == 1:
        return first
    raise TypeError(f"concatenate: can only concatenate tensors, but data[0]{path} is a {type(first).__qualname__}.")


def _concatenate_fast(first: Any, rest: Sequence[Any], dim: int) -> Any:
    """:func:`concatenate` without keeping paths; any surprise raises and the careful walk takes over.

    Children are zipped across batches (dict keys must come in the same order), and tensor
    children are concatenated in the comprehension itself, without a call per leaf.
    """
    cls = type(first)
    if cls is _Tensor:
        return torch.cat([first, *rest], dim)
    sequence = cls is list or cls is tuple
    if not sequence and (cls is dict or isinstance(first, Mapping)):
        keys = list(first)
        for other in rest:
            if list(other) != keys:
                raise KeyError("keys differ")
        columns = zip(first.values(), *[other.values() for other in rest])
        merged = {
            key: torch.cat(column, dim) if type(column[0]) is _Tensor else _concatenate_fast(column[0], column[1:], dim)
            for key, column in zip(keys, columns)
        }
        return merged if cls is dict else _rebuild_mapping(first, merged)
    if sequence or isinstance(first, (list, tuple)):
        for other in rest:
            if len(other) != len(first):
                raise ValueError("lengths differ")
        items = [
            torch.cat(column, dim) if type(column[0]) is _Tensor else _concatenate_fast(column[0], column[1:], dim)
            for column in zip(first, *rest)
        ]
        return items if cls is list else tuple(items) if cls is tuple else _rebuild_sequence(first, items)
    if not rest:
        return first
    raise TypeError("not a tensor")


def concatenate(data: Sequence[Any], dim: int = 0) -> Any:
    """Concatenate a list of same-shaped structures leaf by leaf along ``dim``.

    ``data`` is a list of batches (each a tensor or nested structure of tensors) and the result
    has the structure of ``data[0]``. A single non-tensor batch is returned as it is.
    """
    if not isinstance(data, (list, tuple)) or len(data) == 0:
        raise ValueError(f"concatenate: data must be a non-empty list of batches, got {data!r:.80}.")
    try:
        return _concatenate_fast(data[0], data[1:], dim)
    except Exception:  # noqa: BLE001 - the careful walk below explains what went wrong, with its path
        pass
    try:
        return _concatenate_level(list(data), dim, "")
    except _Unbuildable as error:
        raise TypeError(f"concatenate: a {error.problem}.") from None
    except RecursionError as error:
        raise _nesting_error(data[0], "concatenate", "data[0]", error) from error


def find_batch_size(data: Any) -> int:
    """The size of the first dimension of the first tensor in ``data`` (first item, first key).

    Raises:
        ValueError: a container on the way is empty, or the tensor has no dimensions.
        TypeError: the first leaf is not a tensor.
    """
    node, path = data, ""
    for _ in range(_MAX_NESTING * 10):
        if isinstance(node, (list, tuple, Mapping)):
            if len(node) == 0:
                raise ValueError(f"find_batch_size: data{path} is an empty {type(node).__qualname__}, so it holds no batch.")
            key = next(iter(node)) if isinstance(node, Mapping) else 0
            path += _key_text(node, key)
            node = node[key]
            continue
        if not isinstance(node, _Tensor):
            raise TypeError(f"find_batch_size: data{path} is a {type(node).__qualname__}; can only find the batch size of tensors.")
        if node.ndim == 0:
            raise ValueError(f"find_batch_size: data{path} is a 0-d tensor, which has no batch dimension.")
        return int(node.shape[0])
    raise TreeNestingError(f"find_batch_size: data{path} is nested too deeply (does it contain itself?).")


def ignorant_find_batch_size(data: Any) -> int | None:
    """:func:`find_batch_size`, or ``None`` where it would raise."""
    try:
        return find_batch_size(data)
    except (ValueError, TypeError):
        return None


def _children(node: Any) -> Iterator[Any]:
    return iter(node.values()) if isinstance(node, Mapping) else iter(node)


def find_device(data: Any) -> torch.device | None:
    """The device of the first tensor found in ``data`` (depth first), ``None`` when it holds none."""
    if isinstance(data, _Tensor):
        return data.device
    if not isinstance(data, (list, tuple, Mapping)):
        return None
    seen = {id(data)}
    stack = [_children(data)]
    while stack:
        for node in stack[-1]:
            if isinstance(node, _Tensor):
                return node.device
            if isinstance(node, (list, tuple, Mapping)) and id(node) not in seen:
                seen.add(id(node))
                stack.append(_children(node))
                break
        else:
            stack.pop()
    return None
