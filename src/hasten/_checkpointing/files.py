"""The files of a training-state folder, named as Accelerate names them, written crash-safely and
read without running pickled code.

Every file is a ``torch.save`` of plain data (tensors, numbers, strings, lists, tuples, dicts;
numpy arrays in the RNG states) or a safetensors file, so ``torch.load(weights_only=True)``
reads it, and Accelerate reads it too. What Accelerate wrote with full pickling (a sampler object)
is read only when the caller opts in with ``load_kwargs={"weights_only": False}``.
"""

from __future__ import annotations

import pickle
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from hasten.utils.atomic import _fsync_file, atomic_path
from hasten.utils.constants import (
    MODEL_NAME,
    OPTIMIZER_NAME,
    RNG_STATE_NAME,
    SAFE_MODEL_NAME,
    SAMPLER_NAME,
    SCHEDULER_NAME,
)
from hasten.utils.errors import CheckpointError
from hasten.utils.parallel import clean_state_dict_for_safetensors, load, save

CUSTOM_NAME = "custom_checkpoint"
LOADER_STATE_NAME = "dl_state_dict"
OPT_IN = 'load_kwargs={"weights_only": False}'


def indexed(stem: str, index: int, suffix: str) -> str:
    """``stem + suffix`` for the first object, ``stem_<index> + suffix`` after it (Accelerate's names)."""
    return f"{stem}{suffix}" if index == 0 else f"{stem}_{index}{suffix}"


def model_file(index: int, safe_serialization: bool) -> str:
    """``model.safetensors`` / ``model_1.safetensors`` (or ``pytorch_model*.bin``)."""
    return (
        indexed(SAFE_MODEL_NAME, index, ".safetensors")
        if safe_serialization
        else indexed(MODEL_NAME, index, ".bin")
    )


def optimizer_file(index: int) -> str:
    return indexed(OPTIMIZER_NAME, index, ".bin")


def scheduler_file(index: int) -> str:
    return indexed(SCHEDULER_NAME, index, ".bin")


def sampler_file(index: int) -> str:
    return indexed(SAMPLER_NAME, index, ".bin")


def loader_file(index: int) -> str:
    return indexed(LOADER_STATE_NAME, index, ".bin")


def rng_file(process_index: int) -> str:
    """``random_states_<rank>.pkl``: one per process."""
    return f"{RNG_STATE_NAME}_{process_index}.pkl"


def custom_file(index: int) -> str:
    """``custom_checkpoint_<i>.pkl``: the state of the ``index``-th registered object."""
    return f"{CUSTOM_NAME}_{index}.pkl"


def write(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` through a synced temporary file renamed into place."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


class AtomicFiles:
    """Writes each file atomically (temporary name, sync, rename): for folders others can see."""

    def __init__(self, save_on_each_node: bool = False) -> None:
        self.save_on_each_node = save_on_each_node

    def put(
        self, obj: Any, path: Path, shared: bool = True, safe: bool = False, spread: bool = False
    ) -> None:
        """Write ``obj`` (a state dict as safetensors when ``safe``); ``shared`` files from one process."""
        if shared:
            save(obj, path, save_on_each_node=self.save_on_each_node, safe_serialization=safe)
        else:
            write(obj, path)


class StagedFiles:
    """Writes files straight into a staging folder no reader looks at, syncing each in the background
    while the next one is serialised; :meth:`sync` waits for them. The folder's rename into place
    then makes them visible together.

    Shared files (the same on every process) are written by process ``index`` of ``count`` writers;
    the large ones (``spread=True``: model and optimizer states, identical on every process under
    DDP) go round-robin to the writers, so processes write them in parallel.
    """

    def __init__(self, index: int, count: int) -> None:
        self.index, self.count = index, count
        self._spread = 0
        self._syncs: list[Future[None]] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hasten-fsync")

    def put(
        self, obj: Any, path: Path, shared: bool = True, safe: bool = False, spread: bool = False
    ) -> None:
        """Write ``obj`` (a state dict as safetensors when ``safe``) if this process is its writer."""
        if shared:
            writer = self._spread % self.count if spread else 0
            self._spread += spread
            if writer != self.index:
                return
        if safe:
            from safetensors.torch import save_file

            save_file(clean_state_dict_for_safetensors(obj), str(path), metadata={"format": "pt"})
        else:
            torch.save(obj, path)
        self._syncs.append(self._pool.submit(_fsync_file, path))

    def sync(self) -> None:
        """Wait until every file written is on the disk."""
        try:
            for pending in self._syncs:
                pending.result()
        finally:
            self._pool.shutdown()


def mappable(path: Path, load_kwargs: dict[str, Any] | None = None) -> bool:
    """Whether :func:`read` with ``mapped=True`` maps ``path`` (a zip-format torch file, and the caller's
    ``load_kwargs`` do not say ``mmap=False``); ``torch.load`` maps only that format."""
    if "mmap" in (load_kwargs or {}):
        return bool((load_kwargs or {})["mmap"])
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"PK\x03\x04"
    except OSError:
        return False  # read() names the problem


def read(
    path: Path,
    what: str,
    load_kwargs: dict[str, Any] | None = None,
    map_location: Any = "cpu",
    mapped: bool = False,
) -> Any:
    """Read a ``torch.save`` file of the checkpoint, naming it and what it should hold on failure.

    ``mapped`` (when :func:`mappable`): the tensors view a private map of the file instead of being
    copied out of it; every record is located and the pickle read, but the bytes are copied only
    when the caller copies the tensors (which it must do before handing them out). The map is
    private: replacing or deleting the file meanwhile changes nothing, but truncating it in place
    (which no hasten save does: they replace files) would kill the process with ``SIGBUS`` at the copy.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or holds objects that only full
            unpickling restores (the message names the opt-in).
    """
    kwargs = dict(load_kwargs or {})
    kwargs.setdefault("map_location", map_location)
    if mapped:
        kwargs.setdefault("mmap", True)
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the checkpoint has no {what}. Was it written by save_state with the same "
            "objects prepared (and the same number of processes)? Nothing was loaded."
        )
    try:
        return load(path, **kwargs)
    except pickle.UnpicklingError as error:
        if kwargs.get("weights_only", True):
            raise CheckpointError(
                f"{path} ({what}) holds pickled objects beyond tensors and plain data, and hasten does not "
                f"unpickle them by default (unpickling runs code from the file). If you trust the file, pass "
                f"{OPT_IN} to load_state. Nothing was loaded. First line of the refusal: "
                f"{str(error).splitlines()[0]}"
            ) from error
        raise CheckpointError(f"{path} ({what}) is not a readable torch file: {error}") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} ({what}) is truncated or corrupt; nothing was loaded. The error: {error}"
        ) from error
