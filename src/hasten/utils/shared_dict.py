"""A class attribute holding one dict per thread, for state shared by the instances of a class.

Accelerate keeps its shared state in such a descriptor when PyTorch/XLA runs one process per
device in several threads (TPU v2/v3 with PJRT). hasten's state classes use typed class attributes
instead; the descriptor is kept for code that builds on it.
"""

from __future__ import annotations

import threading
from typing import Any


class ThreadLocalSharedDict(threading.local):
    """A descriptor whose value is a dict of its own in each thread.

    ``instance.attribute`` and ``Class.attribute`` give the calling thread's dict; assigning through
    an instance replaces it. (Assigning on the class replaces the descriptor itself.)
    """

    def __init__(self, thread_local: bool = False) -> None:
        self.thread_local = thread_local
        self._storage: dict[Any, Any] = {}

    def __get__(self, obj: Any, objtype: type | None = None) -> dict[Any, Any]:
        return self._storage

    def __set__(self, obj: Any, value: dict[Any, Any]) -> None:
        if not isinstance(value, dict):
            raise TypeError(
                f"ThreadLocalSharedDict holds a dict, not {type(value).__qualname__}: {value!r:.60}"
            )
        self._storage = value
