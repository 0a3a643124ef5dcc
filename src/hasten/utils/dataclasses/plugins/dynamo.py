"""``torch.compile`` settings, and the call that applies them."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hasten.utils.constants import TORCH_DYNAMO_MODES, launch_variables
from hasten.utils.dataclasses._env import env_field, one_of, resolve_fields, to_bool
from hasten.utils.dataclasses.enums import DynamoBackend
from hasten.utils.dataclasses.kwargs import KwargsHandler
from hasten.utils.errors import ConfigurationError

if TYPE_CHECKING:
    import torch

_LAUNCH = launch_variables("TorchDynamoPlugin")  # field -> the variable `hasten launch` writes


@dataclass
class TorchDynamoPlugin(KwargsHandler):
    """How to compile models with ``torch.compile``; every unset field is read from ``ACCELERATE_DYNAMO_*``.

    Args:
        backend: a :class:`DynamoBackend` (or its name, any case); ``"no"`` compiles nothing.
        mode: ``"default"``, ``"reduce-overhead"``, ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``.
        fullgraph: fail instead of splitting the model into several graphs.
        dynamic: trace with dynamic shapes (``None``: let torch decide).
        options: backend options (a dict).
        disable: make ``torch.compile`` a no-op.
        use_regional_compilation: compile each repeated block (the items of a ``ModuleList`` of
            one class) separately, so the compiler's cache serves all but the first.
    """

    backend: DynamoBackend | None = env_field(_LAUNCH["backend"], "no", DynamoBackend.parse)
    mode: str | None = env_field(_LAUNCH["mode"], "default", one_of(TORCH_DYNAMO_MODES))
    fullgraph: bool | None = env_field(_LAUNCH["fullgraph"], False, to_bool)
    dynamic: bool | None = env_field(_LAUNCH["dynamic"], None, to_bool)
    options: Any = None
    disable: bool = False
    use_regional_compilation: bool | None = env_field(_LAUNCH["use_regional_compilation"], False, to_bool)

    def __post_init__(self) -> None:
        resolve_fields(self)
        self.disable = to_bool(self.disable, "disable")
        if self.options is not None and not isinstance(self.options, dict):
            raise ConfigurationError(f"options={self.options!r} must be a dict of backend options (or None).")

    def to_dict(self) -> dict[str, Any]:
        """The fields, with ``backend`` as the lower-case name ``torch.compile`` takes."""
        config = copy.deepcopy(self.__dict__)
        config["backend"] = str(config["backend"].value).lower()
        return config

    def to_kwargs(self) -> dict[str, Any]:
        """The ``torch.compile`` arguments that differ from its defaults."""
        kwargs = super().to_kwargs()
        kwargs.pop("use_regional_compilation", None)
        return kwargs

    def compile(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` compiled as configured (the model itself when ``backend`` is ``"no"``).

        With ``use_regional_compilation`` the repeated blocks are compiled in place and
        ``model`` is returned; otherwise the compiled wrapper ``torch.compile`` returns.
        """
        if self.backend == DynamoBackend.NO:
            return model
        import torch

        kwargs = self.to_kwargs()
        kwargs["backend"] = str(self.backend.value).lower()  # type: ignore[union-attr]
        if self.use_regional_compilation:
            blocks = list(_repeated_blocks(model))
            if blocks:
                for block in blocks:
                    block.compile(**kwargs)
                return model
        compiled: torch.nn.Module = torch.compile(model, **kwargs)  # type: ignore[assignment]
        return compiled


def _repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The items of every repeated block (``ModuleList`` of one class) in ``model``."""
    from hasten.utils.compilation import is_repeated_blocks

    return [block for module in model.modules() if is_repeated_blocks(module) for block in module]
