"""Where a checkpoint goes, and how it appears there whole or not at all.

Every process writes into a staging folder beside the final one (``.checkpoint_3.incomplete``);
once all have written and synced, one process renames it into place (``os.replace`` of a
folder is atomic within a file system) and only then removes checkpoints beyond
``total_limit``, oldest first, each renamed away before it is deleted. A process killed at any
moment leaves the previous checkpoints complete, and ``load_state()`` never sees a staging
folder. Saving into an existing folder (an explicit ``output_dir`` that exists) keeps the
files already there and replaces the checkpoint's files one by one, each atomically.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from hasten.utils.atomic import _fsync_directory, _fsync_file
from hasten.utils.dataclasses.configs import ProjectConfiguration
from hasten.utils.errors import CheckpointError

CHECKPOINTS = "checkpoints"
_NUMBERED = re.compile(r"checkpoint_(\d+)")
STAGING_SUFFIX = ".incomplete"


def checkpoints_folder(config: ProjectConfiguration) -> Path:
    """``project_dir/checkpoints``.

    Raises:
        CheckpointError: automatic naming without a ``project_dir``.
    """
    if config.project_dir is None:
        raise CheckpointError(
            "ProjectConfiguration(automatic_checkpoint_naming=True) needs a project_dir to put checkpoints "
            "in: pass project_dir= to the ProjectConfiguration or the Accelerator."
        )
    return Path(config.project_dir) / CHECKPOINTS


def numbered(folder: Path) -> list[tuple[int, Path]]:
    """The complete ``checkpoint_<i>`` folders in ``folder``, by number (staging folders excluded)."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _NUMBERED.fullmatch(entry.name)
        if match is not None and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save_target(config: ProjectConfiguration, output_dir: str | os.PathLike[str] | None) -> Path:
    """The folder ``save_state`` writes: ``checkpoints/checkpoint_<iteration>`` under automatic naming,
    else ``output_dir``.

    Raises:
        CheckpointError: no folder was given and automatic naming is off, or the numbered folder exists.
    """
    if config.automatic_checkpoint_naming:
        target = checkpoints_folder(config) / f"checkpoint_{config.iteration}"
        if target.exists():
            raise CheckpointError(
                f"{target} already exists (ProjectConfiguration.iteration={config.iteration}). Resume with "
                "load_state() first, which continues the numbering after the checkpoint it loads, or set "
                "accelerator.project_configuration.iteration to the next free number."
            )
        return target
    if output_dir is None:
        raise CheckpointError(
            "save_state() needs output_dir when automatic checkpoint naming is off: pass a folder, or "
            "ProjectConfiguration(project_dir=..., automatic_checkpoint_naming=True) to the Accelerator."
        )
    return Path(os.path.expanduser(os.fspath(output_dir)))


def load_source(config: ProjectConfiguration, input_dir: str | os.PathLike[str] | None) -> Path:
    """The folder ``load_state`` reads: ``input_dir``, or the highest-numbered complete checkpoint.

    Raises:
        CheckpointError: the folder does not exist, or there is none to pick.
    """
    if input_dir is not None:
        source = Path(os.path.expanduser(os.fspath(input_dir)))
        if not source.is_dir():
            raise CheckpointError(f"load_state: input_dir={os.fspath(input_dir)!r} is not a folder.")
        return source
    if not config.automatic_checkpoint_naming:
        raise CheckpointError(
            "load_state() needs input_dir when automatic checkpoint naming is off: pass the folder "
            "save_state wrote."
        )
    folder = checkpoints_folder(config)
    found = numbered(folder)
    if not found:
        raise CheckpointError(
            f"load_state(): {folder} holds no complete checkpoint_<i> folder to resume from."
        )
    return found[-1][1]


def staging_for(target: Path) -> Path:
    return target.parent / f".{target.name}{STAGING_SUFFIX}"


def prepare_staging(target: Path) -> Path:
    """Create an empty staging folder for ``target`` (removing one a crash left); on the writing
    process only."""
    staging = staging_for(target)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _sync_tree(folder: Path) -> None:
    """Sync every file and folder under ``folder`` (cheap for files their writer synced already; this
    catches what hooks and engines wrote)."""
    for root, directories, names in os.walk(folder):
        for name in names:
            _fsync_file(Path(root) / name)
        for directory in directories:
            _fsync_directory(Path(root) / directory)
    _fsync_directory(folder)


def commit(staging: Path, target: Path) -> None:
    """Make ``target`` the complete checkpoint in ``staging`` (every process synced the files it wrote;
    the folders are synced here)."""
    _sync_tree(staging)
    if not target.exists():
        os.replace(staging, target)
    else:
        for entry in sorted(staging.iterdir()):
            destination = target / entry.name
            if entry.is_dir() and destination.is_dir():
                _remove(destination)
            os.replace(entry, destination)
        staging.rmdir()
        _fsync_directory(target)
    _fsync_directory(target.parent)


def _remove(folder: Path) -> None:
    """Rename ``folder`` away (atomically), then delete it: it never exists half deleted."""
    doomed = folder.parent / f".{folder.name}.deleting"
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(folder, doomed)
    _fsync_directory(folder.parent)
    shutil.rmtree(doomed)


def apply_total_limit(config: ProjectConfiguration) -> list[Path]:
    """Delete the oldest numbered checkpoints until ``total_limit`` remain; returns those deleted."""
    limit = config.total_limit
    if limit is None or not config.automatic_checkpoint_naming:
        return []
    found = numbered(checkpoints_folder(config))
    doomed = [path for _, path in found[: max(0, len(found) - limit)]]
    for path in doomed:
        _remove(path)
    folder = checkpoints_folder(config)
    for leftover in folder.glob(".*.deleting"):  # from a process killed while deleting
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(leftover)
    return doomed


def number_of(folder: Path, config: ProjectConfiguration) -> int | None:
    """The ``<i>`` of ``folder`` when it is one of the project's numbered checkpoints."""
    if not config.automatic_checkpoint_naming or config.project_dir is None:
        return None
    match = _NUMBERED.fullmatch(folder.name)
    if match is None or folder.resolve().parent != checkpoints_folder(config).resolve():
        return None
    return int(match.group(1))
