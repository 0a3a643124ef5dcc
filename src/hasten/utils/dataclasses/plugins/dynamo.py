"""``torch.compile`` settings, and the call that applies them."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Union

from hasten.utils.dataclasses._env import resolve
from hasten.utils.dataclasses.enums import DynamoBackend
from hasten.utils.dataclasses.kwargs import KwargsHandler

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_PREFIX = "ACCELERATE_DYNAMO_"


@dataclass
class TorchDynamoPlugin(KwargsHandler):
    """How to ``torch.compile`` the model: backend (``DynamoBackend``; ``"no"`` turns compilation off),
    mode, fullgraph, dynamic shapes, backend options, and regional compilation (each repeated block
    compiled once instead of the whole model, which compiles much faster).

    Unset fields read ``ACCELERATE_DYNAMO_BACKEND``, ``_MODE``, ``_USE_FULLGRAPH``, ``_USE_DYNAMIC``
    and ``_USE_REGIONAL_COMPILATION``.
    """

    backend: Union[DynamoBackend, str, None] = None
    mode: Union[str, None] = None
    fullgraph: Union[bool, None] = None
    dynamic: Union[bool, None] = None
    options: Union[dict[str, Any], None] = None
    disable: bool = False
    use_regional_compilation: Union[bool, None] = None

    _UNSET_MEANS = {"backend": "no", "mode": "default", "fullgraph": False, "use_regional_compilation": False}

    def __post_init__(self) -> None:
        backend = resolve(self.backend if self.backend is None else str(self.backend), _PREFIX + "BACKEND", str, "no")
        self.backend = DynamoBackend.parse(str(backend).upper(), "backend")
        self.mode = resolve(self.mode, _PREFIX + "MODE", str, "default")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {list(MODES)}")
        self.fullgraph = resolve(self.fullgraph, _PREFIX + "USE_FULLGRAPH", bool, False)
        self.use_regional_compilation = resolve(self.use_regional_compilation, _PREFIX + "USE_REGIONAL_COMPILATION",
                                                bool, False)  # fmt: skip
        self.dynamic = resolve(self.dynamic, _PREFIX + "USE_DYNAMIC", bool)

    def to_dict(self) -> dict[str, Any]:
        config = copy.deepcopy(self.__dict__)
        config["backend"] = self.backend.value.lower() if isinstance(self.backend, DynamoBackend) else self.backend
        return config

    def compile_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``torch.compile`` for these settings."""
        kwargs: dict[str, Any] = {"backend": self.to_dict()["backend"], "mode": self.mode, "fullgraph": self.fullgraph,
                                  "dynamic": self.dynamic, "disable": self.disable}  # fmt: skip
        if self.options is not None:
            kwargs["options"] = self.options
            kwargs.pop("mode")  # torch.compile takes mode or options, not both
        return kwargs

    def compile(self, model: Any) -> Any:
        """``model`` compiled as configured (returned unchanged when the backend is ``"no"``).

        With regional compilation, every block of each ``nn.ModuleList`` is compiled in place
        (``module.compile``) and the model itself is returned.
        """
        import torch
        from torch import nn

        if self.backend == DynamoBackend.NO:
            return model
        kwargs = self.compile_kwargs()
        if self.use_regional_compilation:
            blocks = [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
            if not blocks:
                raise ValueError(
                    f"use_regional_compilation=True but {type(model).__name__} has no nn.ModuleList of repeated "
                    "blocks to compile; compile the whole model instead"
                )
            for block in blocks:
                block.compile(**kwargs)
            return model
        return torch.compile(model, **kwargs)
