"""debug_launcher and notebook_launcher start real process groups from Python."""

from __future__ import annotations

from pathlib import Path

import pytest

from hasten.launchers import debug_launcher, notebook_launcher


def _collective(folder: str) -> None:
    import torch

    from hasten.state import PartialState
    from hasten.utils.operations import gather

    state = PartialState()
    gathered = gather(torch.tensor([state.process_index + 1])).tolist()
    Path(folder, f"rank{state.process_index}").write_text(f"{state.num_processes} {gathered}")


def test_debug_launcher_runs_a_group_on_the_cpu(tmp_path: Path) -> None:
    debug_launcher(_collective, args=(str(tmp_path),), num_processes=2)
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["2 [1, 2]", "2 [1, 2]"]
    with pytest.raises(ValueError, match="num_processes=0 must be at least 1"):
        debug_launcher(_collective, num_processes=0)


def test_notebook_launcher_inline_and_on_two_processes(tmp_path: Path) -> None:
    assert notebook_launcher(lambda x: x * 2, args=(21,)) == 42
    from tests.ranks import free_port

    notebook_launcher(_collective, args=(str(tmp_path),), num_processes=2, use_port=str(free_port()))
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["2 [1, 2]", "2 [1, 2]"]
    with pytest.raises(ValueError, match="mixed_precision"):
        notebook_launcher(_collective, mixed_precision="fp64")
