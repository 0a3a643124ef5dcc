"""Accelerate's whole public surface, at its own module paths, in hasten (issue 18).

For every public function or class an Accelerate module defines (its ``__module__`` is that
module; ``accelerate.commands`` and ``accelerate.test_utils`` aside), the same name must be
importable from the same path with ``accelerate`` replaced by ``hasten``, must not be a stub,
and must take the same parameters with the same defaults in the same order (hasten may add
keyword-only parameters that have defaults). The names ``accelerate.utils`` and ``accelerate``
re-export must be re-exported by ``hasten.utils`` and ``hasten`` too.

Two tables keep the exceptions honest:

- ``EXCLUDED``: names that cannot be real on any machine hasten supports, each with its reason
  (docs/design.md repeats them). It must stay under 10% of the surface.
- ``PENDING``: names other issues are building right now, keyed by issue. The test fails when a
  pending name already exists, so rows are removed as the work lands.
"""

from __future__ import annotations

import ast
import enum
import functools
import importlib
import inspect
import pkgutil
import textwrap
import types
from collections.abc import Iterator

import pytest

accelerate = pytest.importorskip("accelerate")

# Accelerate modules that are not read: importing them has side effects, and neither defines a name.
SKIPPED_MODULES = {
    "accelerate.utils.rich": "importing it installs rich's traceback handler for the whole process",
    "accelerate.memory_utils": "a deprecation shim: it only warns on import",
}

# Names that cannot be real here, with the reason (a module entry covers all its names).
EXCLUDED: dict[str, str] = {
    "accelerate.utils.megatron_lm": (
        "Megatron-LM's train steps, engine and wrappers drive megatron.core, which cannot be installed "
        "(it needs CUDA and Apex to build); hasten keeps MegatronLMPlugin and its config parsers"
    ),
    "accelerate.utils.transformer_engine": (
        "TransformerEngine needs NVIDIA GPUs with FP8 support to install and run; hasten validates "
        "TERecipeKwargs without it"
    ),
}

# Command-module functions issue 18 asks for, checked on top of the enumerated surface.
COMMAND_NAMES = [
    "accelerate.commands.config.config_args.BaseConfig",
    "accelerate.commands.config.config_args.ClusterConfig",
    "accelerate.commands.config.config_args.SageMakerConfig",
    "accelerate.commands.config.config_args.load_config_from_file",
    "accelerate.commands.estimate.estimate_command_parser",
    "accelerate.commands.estimate.gather_data",
    "accelerate.commands.launch.launch_command_parser",
    "accelerate.commands.to_fsdp2.to_fsdp2_command_parser",
    "accelerate.commands.tpu.tpu_command_launcher",
    "accelerate.commands.tpu.tpu_command_parser",
]

# Names being built by other issues right now. A module entry covers all its names.
PENDING: dict[str, set[str]] = {}


# Where hasten's signature differs from Accelerate's on purpose: qualified name -> the reason.
SIGNATURE_DIFFERENCES: dict[str, str] = {
    "accelerate.utils.modeling.find_tied_parameters": (
        "no **kwargs: Accelerate's were for its own recursion and are documented as to be ignored"
    ),
}


def _covered(qualified: str, table: dict[str, set[str]] | dict[str, str]) -> str | None:
    """The key of `table` whose entry covers `qualified` (the name itself or its module)."""
    module = qualified.rpartition(".")[0]
    for key, entry in table.items():
        entries = {key} if isinstance(entry, str) else entry
        if qualified in entries or module in entries:
            return key
    return None


def _hasten_path(accelerate_path: str) -> str:
    return "hasten" + accelerate_path[len("accelerate") :]


def _accelerate_modules() -> Iterator[str]:
    yield "accelerate"
    for info in pkgutil.walk_packages(accelerate.__path__, "accelerate."):
        name = info.name
        if name.startswith(("accelerate.commands", "accelerate.test_utils")) or name in SKIPPED_MODULES:
            continue
        yield name


def _defines(module: types.ModuleType) -> Iterator[tuple[str, object]]:
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType) or not callable(value):
            continue
        if getattr(value, "__module__", None) == module.__name__:
            yield name, value


@functools.cache
def _surface() -> dict[str, object]:
    """Qualified name -> Accelerate's object, for every name an Accelerate module defines."""
    found = {}
    for module_name in _accelerate_modules():
        module = importlib.import_module(module_name)
        for name, value in _defines(module):
            found[f"{module_name}.{name}"] = value
    return found


@functools.cache
def _reexports() -> dict[str, str]:
    """`accelerate.X` / `accelerate.utils.X` re-exports -> the qualified name of what they re-export."""
    by_object = {id(value): qualified for qualified, value in _surface().items()}
    found = {}
    for facade in ("accelerate", "accelerate.utils"):
        module = importlib.import_module(facade)
        for name, value in vars(module).items():
            home = by_object.get(id(value))
            if not name.startswith("_") and home is not None and home.rpartition(".")[0] != facade:
                found[f"{facade}.{name}"] = home
    return found


def _resolve(qualified: str) -> tuple[bool, object]:
    """Whether `qualified` (a hasten path) imports, and the object."""
    module_name, _, name = qualified.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False, None
    if not hasattr(module, name):
        return False, None
    return True, getattr(module, name)


def _stub_reason(obj: object) -> str | None:
    """Why `obj` is a stub (a body that only raises NotImplementedError, passes or returns a constant)."""
    target: object = obj
    if isinstance(obj, type):  # a class: its constructor, when hasten wrote it
        target = next((vars(cls)["__init__"] for cls in obj.__mro__ if "__init__" in vars(cls)), None)
        if not str(getattr(target, "__module__", "")).startswith("hasten"):
            return None
    target = inspect.unwrap(target) if callable(target) else target  # type: ignore[arg-type]
    if not isinstance(target, types.FunctionType):
        return None
    try:
        source = textwrap.dedent(inspect.getsource(target))
    except (OSError, TypeError):
        return None
    function = ast.parse(source).body[0]
    assert isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
    body = [
        node
        for node in function.body
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))  # docstring, `...`
    ]
    if not body:
        return "its body is empty"
    if len(body) == 1 and isinstance(body[0], ast.Pass):
        return "its body is `pass`"
    if len(body) == 1 and isinstance(body[0], ast.Raise):
        raised = body[0].exc
        name = raised.func if isinstance(raised, ast.Call) else raised
        if isinstance(name, ast.Name) and name.id == "NotImplementedError":
            return "it only raises NotImplementedError"
    return None


def _signature(obj: object) -> inspect.Signature | None:
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        return None
    try:
        return inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _default(value: object) -> object:
    if value is inspect.Parameter.empty:
        return value
    if isinstance(value, enum.Enum):  # enums compare by value (Accelerate's are not all str enums)
        return value.value
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    if type(value) is object:  # a private "not passed" sentinel (the Accelerator's split_batches)
        return "<sentinel>"
    return value


def _incompatibility(ours: inspect.Signature, theirs: inspect.Signature) -> str | None:
    """What makes `ours` unable to stand in for `theirs`, or None."""
    keyword_only = inspect.Parameter.KEYWORD_ONLY

    def entries(signature: inspect.Signature, kw_only: bool) -> list[tuple[str, object, object]]:
        return [
            (p.name, p.kind, _default(p.default))
            for p in signature.parameters.values()
            if (p.kind is keyword_only) == kw_only
        ]

    if entries(ours, False) != entries(theirs, False):
        return f"positional parameters: hasten {entries(ours, False)} vs accelerate {entries(theirs, False)}"
    our_kw = {name: default for name, _, default in entries(ours, True)}
    their_kw = {name: default for name, _, default in entries(theirs, True)}
    for name, default in their_kw.items():
        if name not in our_kw and not any(p.kind is p.VAR_KEYWORD for p in ours.parameters.values()):
            return f"keyword-only parameter {name!r} missing"
        if name in our_kw and our_kw[name] != default:
            return f"keyword-only {name!r} defaults to {our_kw[name]!r}, accelerate {default!r}"
    extra = [name for name in our_kw if name not in their_kw and our_kw[name] is inspect.Parameter.empty]
    if extra:
        return f"extra keyword-only parameters without a default: {extra}"
    return None


def _check(qualified: str, theirs: object) -> str | None:
    """The problem with hasten's counterpart of Accelerate's `qualified`, or None."""
    found, ours = _resolve(_hasten_path(qualified))
    if not found:
        return "missing"
    if isinstance(theirs, type) != isinstance(ours, type):
        return f"is a {type(ours).__name__} where accelerate has a {type(theirs).__name__}"
    stub = _stub_reason(ours)
    if stub:
        return f"is a stub: {stub}"
    if isinstance(theirs, type) and issubclass(theirs, enum.Enum):
        assert isinstance(ours, type) and issubclass(ours, enum.Enum)
        absent = sorted(member.name for member in theirs if member.name not in ours.__members__)
        return f"enum lacks members {absent}" if absent else None
    if qualified in SIGNATURE_DIFFERENCES:
        return None
    their_signature, our_signature = _signature(theirs), _signature(ours)
    if their_signature is None:
        return None
    if our_signature is None:
        return "has no signature to compare"
    return _incompatibility(our_signature, their_signature)


def _all_pending() -> set[str]:
    return set().union(*PENDING.values())


def test_tables_are_small_and_current() -> None:
    surface = _surface()
    excluded = [name for name in surface if _covered(name, EXCLUDED)]
    assert len(excluded) < 0.10 * len(surface), (
        f"the exclusion table covers {len(excluded)} of {len(surface)} names (limit 10%)"
    )
    known = set(surface) | set(_reexports()) | set(COMMAND_NAMES)
    modules = {name.rpartition(".")[0] for name in known}
    stale = [
        entry
        for entry in [*EXCLUDED, *_all_pending(), *SIGNATURE_DIFFERENCES]
        if entry not in known and entry not in modules
    ]
    assert not stale, f"table entries that name nothing in Accelerate {accelerate.__version__}: {stale}"


def _problems(names: dict[str, object]) -> tuple[list[str], list[str]]:
    """(problems of non-pending names, pending names that exist already)."""
    missing, landed = [], []
    for qualified, theirs in sorted(names.items()):
        if _covered(qualified, EXCLUDED):
            continue
        problem = _check(qualified, theirs)
        if _covered(qualified, PENDING):
            if problem != "missing":
                landed.append(qualified)
        elif problem:
            missing.append(f"{_hasten_path(qualified)}: {problem}")
    return missing, landed


def test_every_accelerate_name_is_at_its_path() -> None:
    missing, landed = _problems(_surface())
    assert not landed, f"these pending names exist now: remove their PENDING rows: {landed}"
    assert not missing, f"{len(missing)} names are missing or incompatible:\n" + "\n".join(missing)


def test_facades_reexport_what_accelerate_reexports() -> None:
    missing, landed = [], []
    for qualified, home in sorted(_reexports().items()):
        if _covered(home, EXCLUDED):
            continue
        found, ours = _resolve(_hasten_path(qualified))
        if _covered(qualified, PENDING):
            if found:
                landed.append(qualified)
            continue
        if not found and _covered(home, PENDING):
            continue
        home_found, home_object = _resolve(_hasten_path(home))
        if not found:
            missing.append(f"{_hasten_path(qualified)}: missing")
        elif home_found and ours is not home_object:
            missing.append(f"{_hasten_path(qualified)}: not the object at {_hasten_path(home)}")
    assert not landed, f"these pending names exist now: remove their PENDING rows: {landed}"
    assert not missing, f"{len(missing)} re-exports are missing:\n" + "\n".join(missing)


def test_command_names_are_at_their_paths() -> None:
    names = {qualified: _resolve(qualified)[1] for qualified in COMMAND_NAMES}
    missing, landed = _problems(names)
    assert not landed, f"these pending names exist now: remove their PENDING rows: {landed}"
    assert not missing, "\n".join(missing)


# --- the checker itself -------------------------------------------------------------------------


def _accelerate_like(a: int, b: str = "x", *, c: bool = False) -> None:
    del a, b, c


def test_the_checker_reports_missing_names_and_landed_pending_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    missing, landed = _problems({"accelerate.utils.operations.no_such_name": _accelerate_like})
    assert missing == ["hasten.utils.operations.no_such_name: missing"] and not landed
    monkeypatch.setitem(PENDING, "an issue", {"accelerate.utils.operations.gather"})
    missing, landed = _problems(
        {"accelerate.utils.operations.gather": _surface()["accelerate.utils.operations.gather"]}
    )
    assert landed == ["accelerate.utils.operations.gather"] and not missing


def test_the_checker_compares_signatures() -> None:
    theirs = inspect.signature(_accelerate_like)

    def same_plus_keyword(a: int, b: str = "x", *, c: bool = False, d: int = 1) -> None: ...
    def other_default(a: int, b: str = "y", *, c: bool = False) -> None: ...
    def renamed(a: int, bee: str = "x", *, c: bool = False) -> None: ...
    def keyword_without_default(a: int, b: str = "x", *, c: bool = False, d: int) -> None: ...
    def lost_keyword(a: int, b: str = "x") -> None: ...

    assert _incompatibility(inspect.signature(same_plus_keyword), theirs) is None
    assert "positional parameters" in str(_incompatibility(inspect.signature(other_default), theirs))
    assert "positional parameters" in str(_incompatibility(inspect.signature(renamed), theirs))
    assert "without a default: ['d']" in str(
        _incompatibility(inspect.signature(keyword_without_default), theirs)
    )
    assert "keyword-only parameter 'c' missing" in str(
        _incompatibility(inspect.signature(lost_keyword), theirs)
    )


def test_the_checker_recognises_stubs() -> None:
    assert _stub_reason(_stub_example_raises) == "it only raises NotImplementedError"
    assert _stub_reason(_stub_example_passes) == "its body is `pass`"
    assert _stub_reason(_accelerate_like) is None


def _stub_example_raises() -> None:
    """Doc."""
    raise NotImplementedError("later")


def _stub_example_passes() -> None:
    pass
