"""The load progress bar: silent for short work, off the terminal, off ranks > 0, or when disabled."""

from __future__ import annotations

import io

import pytest

from hasten.utils import progress as progress_module
from hasten.utils.environment import patch_environment
from hasten.utils.progress import Progress, progress_wanted


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _terminal(monkeypatch: pytest.MonkeyPatch) -> Terminal:
    """Stand in for a terminal (inside the test: pytest re-installs its capture after fixtures run)."""
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    return screen


def test_no_bar_without_a_terminal() -> None:
    assert not progress_wanted()  # pytest captures stderr


def test_bar_appears_after_the_delay_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    terminal = _terminal(monkeypatch)
    monkeypatch.setattr(progress_module, "DELAY", 0.0)
    with Progress(3, "Loading checkpoint") as bar:
        for _ in range(3):
            bar.update()
    assert "Loading checkpoint" in terminal.getvalue()


def test_short_work_stays_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _terminal(monkeypatch)
    with Progress(3, "Loading checkpoint") as bar:
        bar.update(3)
    assert terminal.getvalue() == "" and bar.done == 3


@pytest.mark.parametrize(
    "variables",
    [{"HASTEN_DISABLE_PROGRESS_BAR": "1"}, {"TQDM_DISABLE": "yes"}, {"RANK": "1", "WORLD_SIZE": "2"}],
)
def test_disabled_by_environment_or_rank(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]) -> None:
    _terminal(monkeypatch)
    assert progress_wanted()
    with patch_environment(**variables):
        assert not progress_wanted()
