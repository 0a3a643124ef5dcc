"""Nested structures of tensors: the one traversal core, flatten / unflatten, and their errors.

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
from typing import Any

import torch

from hasten.utils.errors import TreeNestingError

_Tensor = torch.Tensor
MAX_NESTING = 100  # deeper than this *and* failing with RecursionError: reported as too deep


def is_torch_tensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.Tensor`` (or a subclass such as ``Parameter``)."""
    return isinstance(tensor, _Tensor)


def is_namedtuple(data: Any) -> bool:
    """Whether ``data`` is a namedtuple (a tuple with ``_fields`` and ``_asdict``)."""
    return isinstance(data, tuple) and hasattr(data, "_asdict") and hasattr(data, "_fields")


def honor_type(obj: Any, generator: Any) -> Any:
    """Build a container of ``obj``'s type (list, tuple, namedtuple, ...) from the items of ``generator``."""
    try:
        if is_namedtuple(obj):
            return type(obj)(*list(generator))
        return type(obj)(generator)
    except TypeError as error:
        raise TypeError(
            f"Unsupported types ({type(obj)}) passed to `honor_type`. Only nested list/tuple/dicts of "
            f"objects can be rebuilt: {type(obj).__qualname__} cannot be built from an iterable of its items "
            f"({error})."
        ) from error


# --- rebuilding containers ----------------------------------------------------------------------


class Unbuildable(Exception):
    """Internal: a container (or leaf) the walk cannot handle; carries the node to locate its path."""

    def __init__(self, node: Any, problem: str) -> None:
        super().__init__(problem)
        self.node = node
        self.problem = problem


# How each container type other than dict, list and tuple is rebuilt, learned once per type.
_TUPLE_NEW = 1  # a namedtuple whose constructor does nothing but tuple.__new__: built straight from a list
_POSITIONAL = 2  # another namedtuple: cls(*items)
_SEQUENCE = 3  # another list or tuple subclass: cls(items)
_MAPPING = 4  # a Mapping other than dict
_NOT_CONTAINER = 5
_KINDS: dict[type, int] = {}
_MAX_KINDS = 4096  # the cache holds its classes; past this many (classes made on the fly), start over
_tuple_new = tuple.__new__


def _only_tuple_new(cls: type) -> bool:
    """Whether ``cls(*items)`` amounts to ``tuple.__new__(cls, items)``: its ``__new__`` is the one
    ``collections.namedtuple`` generates (which only calls ``tuple.__new__``) and no ``__init__`` runs."""
    new = getattr(cls.__new__, "__globals__", None)
    return (
        isinstance(new, dict)
        and new.get("_tuple_new") is _tuple_new
        and str(new.get("__name__", "")).startswith("namedtuple_")
        and cls.__init__ is object.__init__  # type: ignore[misc]  # the class's, not an instance's
    )


def _learn_kind(cls: type) -> int:
    if issubclass(cls, tuple) and hasattr(cls, "_asdict") and hasattr(cls, "_fields"):
        kind = _TUPLE_NEW if _only_tuple_new(cls) else _POSITIONAL
    elif issubclass(cls, (list, tuple)):
        kind = _SEQUENCE
    elif issubclass(cls, Mapping):
        kind = _MAPPING
    else:
        kind = _NOT_CONTAINER
    if len(_KINDS) >= _MAX_KINDS:
        _KINDS.clear()
    _KINDS[cls] = kind
    return kind


def rebuild_sequence(node: Any, items: list[Any]) -> Any:
    """A sequence of ``node``'s type holding ``items`` (a namedtuple is rebuilt by position)."""
    cls = type(node)
    if cls is list:
        return items
    if cls is tuple:
        return tuple(items)
    kind = _KINDS.get(cls) or _learn_kind(cls)
    if kind == _TUPLE_NEW:
        return _tuple_new(cls, items)
    try:
        return cls(*items) if kind == _POSITIONAL else cls(items)
    except TypeError as error:
        raise Unbuildable(
            node, f"{cls.__qualname__} could not be rebuilt from its items ({error})"
        ) from error


def rebuild_mapping(node: Any, items: dict[Any, Any]) -> Any:
    """A Mapping of ``node``'s type holding ``items``: keeps a defaultdict's factory and a UserDict's
    attributes."""
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
        raise Unbuildable(
            node,
            f"{cls.__qualname__} could not be rebuilt from a dict of its items ({error}); give it a "
            "constructor that accepts a dict, or convert it to a dict first",
        ) from error


def _items_of(node: Any) -> Iterator[tuple[Any, Any]]:
    """The (key, child) pairs of a container, in traversal order (empty for a leaf)."""
    if isinstance(node, (list, tuple)):
        return iter(enumerate(node))
    if isinstance(node, Mapping):
        return iter(node.items())
    return iter(())


# --- the traversal core -------------------------------------------------------------------------


def _walk(
    data: Any,
    func: Callable[[Any], Any],
    test: Callable[[Any], bool],
    tensors: bool,
    strict: bool,
    skip_keys: frozenset[Any],
    leaf_first: bool,
) -> Any:
    """Apply ``func`` to the leaves of ``data`` that ``test`` accepts and rebuild every container.

    With ``tensors``, plain ``torch.Tensor`` objects are leaves without asking ``test``, and the
    comprehensions over containers call ``func`` on them directly (the fast path: no call to
    ``visit`` per tensor). Containers other than dict, list and tuple are told apart by a
    per-type lookup, so a namedtuple costs what a tuple costs.
    """
    kinds = _KINDS

    def leaf(node: Any) -> Any:
        if test(node):
            return func(node)
        if strict:
            raise Unbuildable(node, "unsupported leaf")
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
        if cls is list:
            if tensors:
                return [func(v) if type(v) is _Tensor else visit(v) for v in node]
            return [visit(v) for v in node]
        if cls is tuple:
            if tensors:
                return tuple([func(v) if type(v) is _Tensor else visit(v) for v in node])
            return tuple([visit(v) for v in node])
        if leaf_first and test(node):
            return func(node)
        kind = kinds.get(cls) or _learn_kind(cls)
        if kind == _TUPLE_NEW:
            if tensors:
                return _tuple_new(cls, [func(v) if type(v) is _Tensor else visit(v) for v in node])
            return _tuple_new(cls, [visit(v) for v in node])
        if kind == _NOT_CONTAINER:
            return leaf(node)
        if kind == _MAPPING:
            return rebuild_mapping(node, {k: v if k in skip_keys else visit(v) for k, v in node.items()})
        if tensors:
            return rebuild_sequence(node, [func(v) if type(v) is _Tensor else visit(v) for v in node])
        return rebuild_sequence(node, [visit(v) for v in node])

    try:
        return visit(data)
    finally:
        # visit refers to itself through its closure cell: point the cell elsewhere so the functions
        # (and what ``func`` holds) are freed now rather than at the next garbage collection.
        visit = leaf


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
            return _flat(func, data, test, strict, leaf_first)
        return _walk(data, func, test, tensors, strict, skip_keys, leaf_first)
    except Unbuildable as error:
        raise _explain(error, data, test, _name(caller), argument) from None
    except RecursionError as error:
        raise nesting_error(data, _name(caller), argument, error) from error


_FLAT = {dict, list, tuple, _Tensor}


def _flat(
    func: Callable[[Any], Any], data: Any, test: Callable[[Any], bool], strict: bool, leaf_first: bool
) -> Any:
    """The fast path for a flat batch: a dict, list or tuple of plain tensors needs no walker.

    At the first value that is not a plain tensor, the walker finishes the rest (as one list or
    dict of the remaining values), so ``func`` still runs once per leaf, in order.
    """
    cls = type(data)
    if cls is _Tensor:
        return func(data)
    if cls is dict:
        out = {}
        items = iter(data.items())
        for key, value in items:
            if type(value) is not _Tensor:
                rest = {key: value}
                rest.update(items)
                out.update(_walk(rest, func, test, True, strict, frozenset(), leaf_first))
                break
            out[key] = func(value)
        return out
    done: list[Any] = []
    for value in data:
        if type(value) is not _Tensor:
            done += _walk(data[len(done) :], func, test, True, strict, frozenset(), leaf_first)
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

    def __init__(
        self, data: Any, is_leaf: Callable[[Any], bool] | None, tensors: bool, num_leaves: int
    ) -> None:
        self._data = data
        self._is_leaf = is_leaf
        self._tensors = tensors
        self.num_leaves = num_leaves

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        """The original structure with ``leaves`` (in flatten order) in place of its leaves."""
        if len(leaves) != self.num_leaves:
            raise ValueError(
                f"unflatten needs {self.num_leaves} leaves for this structure, got {len(leaves)}."
            )
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
    leaves = tree_leaves(
        data, is_leaf=is_leaf, tensors=tensors, strict=strict, caller=caller, argument=argument
    )
    return leaves, TreeSpec(data, is_leaf, tensors, len(leaves))


def leaf_paths(data: Any, argument: str = "data") -> list[str]:
    """How each leaf of ``data`` is reached (``data['a'][0]``), in the order :func:`tree_map` visits them."""
    paths: list[str] = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, (list, tuple, Mapping)) and not isinstance(node, _Tensor):
            for key, child in _items_of(node):
                visit(child, path + key_text(node, key))
        else:
            paths.append(path)

    visit(data, argument)
    return paths


# --- errors with paths --------------------------------------------------------------------------


def key_text(container: Any, key: Any) -> str:
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
        child_path = path + key_text(container, key)
        if child is target:
            return child_path
        if isinstance(child, (list, tuple, Mapping)) and id(child) not in on_path:
            on_path.add(id(child))
            stack.append((child_path, _items_of(child), child))
    return None


def _explain(
    error: Unbuildable, data: Any, test: Callable[[Any], bool], caller: str, argument: str
) -> TypeError:
    path = argument + (_path_to(data, error.node) or "")
    if error.problem != "unsupported leaf":
        return TypeError(f"{caller}: {path} is a {error.problem}.")
    accepts = getattr(test, "__name__", repr(test))
    # Accelerate's sentence first (callers match on it), then where the object is and what to do.
    function = caller[caller.index("(") + 1 : -1] if caller.endswith(")") and "(" in caller else caller
    return TypeError(
        f"Unsupported types ({type(error.node)}) passed to `{function}`. Only nested list/tuple/dicts of "
        f"objects that are valid for `{accepts}` should be passed. {caller}: {path} is a "
        f"{type(error.node).__qualname__} ({error.node!r:.60}); convert it to a tensor, or remove it from "
        "the structure."
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
        child_path = path + key_text(container, key)
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


def nesting_error(data: Any, caller: str, argument: str, error: RecursionError) -> Exception:
    path, back_to, depth = _deepest_or_cycle(data)
    path, back_to = _shorten(path), None if back_to is None else _shorten(back_to)
    if back_to is not None:
        return TreeNestingError(
            f"{caller}: {argument}{path} is {argument}{back_to} itself, so {argument} contains itself and "
            "has "
            "no end. Pass a structure without cycles (copy the part that refers back)."
        )
    if depth < MAX_NESTING:
        return error  # the recursion came from the applied function, not from the structure
    return TreeNestingError(
        f"{caller}: {argument} is nested {depth} levels deep (down to {argument}{path}), deeper than "
        "Python's "
        "recursion limit allows. Flatten the structure, or raise the limit with sys.setrecursionlimit()."
    )


# --- the public face of the core ------------------------------------------------------------------------


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


def merge_dicts(source: dict[Any, Any], destination: dict[Any, Any]) -> dict[Any, Any]:
    """Merge ``source`` into ``destination`` (changed in place and returned); nested dicts merge key by
    key, any other value from ``source`` replaces the one in ``destination``."""
    for key, value in source.items():
        if isinstance(value, dict):
            node = destination.setdefault(key, {})
            if not isinstance(node, dict):
                raise TypeError(
                    f"merge_dicts: destination[{key!r}] is a {type(node).__name__}, source[{key!r}] a dict; "
                    "a dict can only be merged into a dict (replace the value first)."
                )
            merge_dicts(value, node)
        else:
            destination[key] = value
    return destination


def is_torch_xpu_tensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a tensor on an Intel XPU."""
    return isinstance(tensor, torch.Tensor) and tensor.device.type == "xpu"
