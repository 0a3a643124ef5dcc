"""The ``Accelerator``'s saving methods (``save``, ``save_model``, ``save_state``, ``load_state``,
``register_for_checkpointing`` and the state hooks), kept apart from the facade.

``save_state`` writes into a staging folder that every process fills, then renames it into
place (see :mod:`hasten._checkpointing.folders`). ``load_state`` reads and checks every file
first and changes nothing when one is missing or damaged; it restores the RNG states last. The
engine saves and loads what it keeps itself (FSDP2 shards, DeepSpeed's own checkpoint) through
``Engine.save_checkpoint`` / ``load_checkpoint``; the rest is the same for every engine.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from hasten._checkpointing import files, folders
from hasten._checkpointing.files import StagedFiles
from hasten._checkpointing.training_state import read_state, write_state
from hasten.engines.outputs import check_saveable, write_model
from hasten.engines.processes import ProcessMixin
from hasten.utils.errors import CheckpointError
from hasten.utils.operations import gather_object
from hasten.utils.parallel import save
from hasten.utils.typing import PathLike


def _agree(problem: str, distributed: bool) -> None:
    """Raise on every process when one could not read its part of the checkpoint (so none loads, and
    none waits for the others in the engine's collectives).

    Raises:
        CheckpointError: this process's ``problem``, or the first other process's.
    """
    problems = [(0, problem)]
    if distributed:
        problems = list(enumerate(gather_object([problem])))
    if problem:
        raise CheckpointError(problem)
    for rank, other in problems:
        if other:
            raise CheckpointError(
                f"Process {rank} could not load its part of the checkpoint; nothing was loaded: {other}"
            )


class CheckpointingMixin(ProcessMixin):
    """What the ``Accelerator`` saves and loads; its attributes are set by the ``Accelerator``."""

    _engine: Any
    _models: list[nn.Module]
    _optimizers: list[Any]
    _schedulers: list[Any]
    _dataloaders: list[Any]
    _custom_objects: list[Any]
    project_configuration: Any
    scaler: Any
    step: int
    get_state_dict: Callable[..., Any]

    @property
    def _save_model_state_pre_hook(self) -> OrderedDict[int, Callable[..., None]]:
        return self.__dict__.setdefault("_save_hooks", OrderedDict())

    @property
    def _load_model_state_pre_hook(self) -> OrderedDict[int, Callable[..., None]]:
        return self.__dict__.setdefault("_load_hooks", OrderedDict())

    def _writes(self) -> bool:
        config = self.project_configuration
        return self.is_local_main_process if config.save_on_each_node else self.is_main_process

    def _pending_gradients(self, models: list[nn.Module]) -> list[dict[str, Any]] | None:
        """Each model's gradients when saving in the middle of an accumulation (the next optimizer step
        adds to them), else ``None``."""
        if self.step % self.gradient_state.num_steps == 0:
            return None
        return [
            {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
            for model in models
        ]

    def save(self, obj: Any, f: Any, safe_serialization: bool = False) -> None:
        """``hasten.utils.save``: write ``obj`` once (per machine with ``save_on_each_node``), atomically."""
        save(
            obj,
            f,
            save_on_each_node=self.project_configuration.save_on_each_node,
            safe_serialization=safe_serialization,
        )

    def save_model(
        self,
        model: nn.Module,
        save_directory: PathLike,
        max_shard_size: int | str = "10GB",
        safe_serialization: bool = True,
    ) -> None:
        """Write ``model``'s weights to ``save_directory`` as safetensors (or ``.bin``) shards of at most
        ``max_shard_size``, with an index when sharded: the layout ``load_checkpoint_in_model`` and
        transformers read. Tied weights are stored once; each file is written atomically.

        Raises:
            NotADirectoryError: ``save_directory`` is a file.
            ValueError: some parameters are on the meta device.
        """
        check_saveable(model, save_directory)
        state_dict = self.get_state_dict(model)
        if state_dict is not None and self._writes():
            write_model(state_dict, os.fspath(save_directory), max_shard_size, safe_serialization)

    def register_for_checkpointing(self, *objects: Any) -> None:
        """Save and load ``objects`` (anything with ``state_dict`` and ``load_state_dict``) with the state.

        Raises:
            ValueError: an object lacks one of the two methods (the message lists which).
        """
        invalid = [
            f"argument {index}: {type(obj).__qualname__}"
            for index, obj in enumerate(objects)
            if not callable(getattr(obj, "state_dict", None))
            or not callable(getattr(obj, "load_state_dict", None))
        ]
        if invalid:
            raise ValueError(
                "register_for_checkpointing takes objects with state_dict() and load_state_dict() methods; "
                f"these lack one: {'; '.join(invalid)}."
            )
        self._custom_objects.extend(objects)

    def register_save_state_pre_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        """Call ``hook(models, weights, output_dir)`` in ``save_state`` before the models are written;
        ``output_dir`` is the staging folder that becomes the checkpoint. Returns a handle whose
        ``remove()`` unregisters it."""
        handle = RemovableHandle(self._save_model_state_pre_hook)
        self._save_model_state_pre_hook[handle.id] = hook
        return handle

    def register_load_state_pre_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        """Call ``hook(models, input_dir)`` in ``load_state`` before the models are loaded (remove from
        ``models`` those the hook loads itself). Returns a handle whose ``remove()`` unregisters it."""
        handle = RemovableHandle(self._load_model_state_pre_hook)
        self._load_model_state_pre_hook[handle.id] = hook
        return handle

    def save_state(
        self,
        output_dir: PathLike | None = None,
        safe_serialization: bool = True,
        **save_model_func_kwargs: Any,
    ) -> str:
        """Save the models, optimizers, schedulers, data-loader positions, grad scaler, RNG states of
        every process, step and registered objects to ``output_dir`` (or, with automatic checkpoint
        naming, ``project_dir/checkpoints/checkpoint_<iteration>``); every process must call it.

        The folder appears whole once every process has written and synced, or not at all; then
        checkpoints beyond ``total_limit`` are removed, oldest first. Returns the folder.

        Raises:
            CheckpointError: no folder was given and automatic naming is off, or the numbered folder
                exists already.
        """
        config = self.project_configuration
        target = folders.save_target(config, output_dir)
        writer = self._writes()
        staging = folders.staging_for(target)
        if writer:
            folders.prepare_staging(target)
        self.wait_for_everyone()
        parts = self._engine.checkpoint_parts(self._models, self._optimizers, self._schedulers)
        weights = [self._engine.state_dict(model, False) for model in parts.models]
        self._engine.save_checkpoint(staging, self._models, self._optimizers, save_model_func_kwargs)
        for hook in self._save_model_state_pre_hook.values():
            hook(self._models, weights, os.fspath(staging))
        # The shared files are spread over every process, or written by each node's main process.
        if config.save_on_each_node:
            out = StagedFiles(self.local_process_index, 1)
        else:
            out = StagedFiles(self.process_index, self.num_processes)
        write_state(
            staging,
            weights,
            parts.optimizers,
            parts.schedulers,
            self._dataloaders,
            self.process_index,
            self.step,
            self.scaler,
            out=out,
            safe_serialization=safe_serialization,
            gradients=self._pending_gradients(parts.models),
        )
        for index, obj in enumerate(self._custom_objects):
            out.put(obj.state_dict(), staging / files.custom_file(index))
        out.sync()
        self.wait_for_everyone()
        if writer:
            folders.commit(staging, target)
            folders.apply_total_limit(config)
        self.wait_for_everyone()
        config.iteration += 1
        return os.fspath(target)

    def load_state(
        self,
        input_dir: PathLike | None = None,
        load_kwargs: dict[str, Any] | None = None,
        **load_model_func_kwargs: Any,
    ) -> None:
        """Load what :meth:`save_state` wrote from ``input_dir`` (or, with automatic checkpoint naming,
        the latest complete checkpoint), on every process.

        Every file is read and checked before anything changes; the RNG states are restored last.
        With automatic naming, the next ``save_state`` continues after the loaded checkpoint's
        number. ``load_kwargs`` go to ``torch.load`` (``{"weights_only": False}`` opts into
        unpickling files Accelerate wrote with pickled objects: only for files you trust);
        ``load_model_func_kwargs`` take ``strict`` and ``map_location`` (``"cpu"`` or
        ``"on_device"``, where optimizer states go), or DeepSpeed's ``load_checkpoint`` arguments.

        Raises:
            CheckpointError: the folder does not exist, or a file is missing, truncated, corrupt or
                does not fit what is prepared (the message names it); nothing was changed.
        """
        config = self.project_configuration
        folder = folders.load_source(config, input_dir)
        map_location = load_model_func_kwargs.pop("map_location", None)
        parts = self._engine.checkpoint_parts(self._models, self._optimizers, self._schedulers)
        models = list(parts.models)
        for hook in self._load_model_state_pre_hook.values():
            hook(models, os.fspath(folder))
        engine_kwargs = {} if parts.models or not self._models else dict(load_model_func_kwargs)
        try:
            read = read_state(
                folder,
                models,
                parts.optimizers,
                parts.schedulers,
                self._dataloaders,
                self.process_index,
                self.scaler,
                map_location,
                load_kwargs,
                customs=self._custom_objects,
                trained_models=list(parts.models),
                **({} if engine_kwargs else load_model_func_kwargs),
            )
            problem = ""
        except CheckpointError as error:
            problem = str(error)
        _agree(problem, self.num_processes > 1)
        read.apply_scaler()  # before the engine's optimizer load: FSDP2 steps the optimizer once to load it
        self._engine.load_checkpoint(folder, self._models, self._optimizers, engine_kwargs)
        read.apply()
        if read.step is not None:
            self.step = int(read.step)
        number = folders.number_of(folder, config)
        if number is not None:
            config.iteration = number + 1
        read.restore_rngs()
