"""Saving and loading a training state as functions: what ``Accelerator.save_state`` /
``load_state`` do with the objects they are given (Accelerate 1.15's names, arguments and files).

Each file is written atomically (temporary name, sync, rename) and read without running pickled
code; ``load_accelerator_state`` reads and checks every file before it changes any object, and
restores the RNG states last. The ``Accelerator``'s methods add the crash-safe folder (staging,
rename, ``total_limit``) and the engine's own files; see :mod:`hasten._checkpointing`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hasten._checkpointing import files
from hasten._checkpointing.files import AtomicFiles
from hasten._checkpointing.training_state import read_state, write_state
from hasten.utils.parallel import save
from hasten.utils.typing import PathLike

__all__ = ["load_accelerator_state", "load_custom_state", "save_accelerator_state", "save_custom_state"]


def save_accelerator_state(
    output_dir: PathLike,
    model_states: list[dict[str, Any]],
    optimizers: list[Any],
    schedulers: list[Any],
    dataloaders: list[Any],
    process_index: int,
    step: int,
    scaler: Any = None,
    save_on_each_node: bool = False,
    safe_serialization: bool = True,
) -> Path:
    """Write the model states, optimizers, schedulers, data-loader positions, scaler, step and this
    process's RNG states into ``output_dir`` (created if needed); returns it.

    Call it on every process: the main one writes the shared files (the local main ones with
    ``save_on_each_node``), each writes ``random_states_<process_index>.pkl``.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_state(
        folder,
        list(model_states),
        optimizers,
        schedulers,
        dataloaders,
        process_index,
        step,
        scaler,
        out=AtomicFiles(save_on_each_node),
        safe_serialization=safe_serialization,
    )
    return folder


def load_accelerator_state(
    input_dir: PathLike,
    models: list[Any],
    optimizers: list[Any],
    schedulers: list[Any],
    dataloaders: list[Any],
    process_index: int,
    scaler: Any = None,
    map_location: Any = None,
    load_kwargs: dict[str, Any] | None = None,
    **load_model_func_kwargs: Any,
) -> dict[str, Any]:
    """Load what :func:`save_accelerator_state` wrote into the objects; returns ``{"step": ...}``, the
    attributes the ``Accelerator`` takes back.

    ``map_location`` (``None``/``"cpu"`` or ``"on_device"``) is where optimizer states are read
    to; ``load_kwargs`` go to ``torch.load`` (``{"weights_only": False}`` to unpickle objects from a
    trusted file); ``load_model_func_kwargs`` takes ``strict``.

    Raises:
        CheckpointError: a file is missing, truncated, corrupt or does not fit its object; nothing
            was changed.
        TypeError: ``map_location`` is not one of the three values.
    """
    read = read_state(
        Path(input_dir),
        models,
        optimizers,
        schedulers,
        dataloaders,
        process_index,
        scaler,
        map_location,
        load_kwargs,
        **load_model_func_kwargs,
    )
    read.apply()
    read.restore_rngs()
    return {} if read.step is None else {"step": read.step}


def save_custom_state(obj: Any, path: PathLike, index: int = 0, save_on_each_node: bool = False) -> None:
    """Write ``obj.state_dict()`` to ``path/custom_checkpoint_<index>.pkl`` (main process), atomically."""
    save(obj.state_dict(), Path(path) / files.custom_file(index), save_on_each_node=save_on_each_node)


def load_custom_state(obj: Any, path: PathLike, index: int = 0) -> None:
    """Load ``path/custom_checkpoint_<index>.pkl`` into ``obj.load_state_dict``, without unpickling code.

    Raises:
        CheckpointError: the file is missing or corrupt, or holds objects only full unpickling restores
            (Accelerate unpickles them; hasten asks for ``load_state(load_kwargs={"weights_only": False})``).
    """
    target = Path(path) / files.custom_file(index)
    obj.load_state_dict(files.read(target, f"state of registered object {index}"))
