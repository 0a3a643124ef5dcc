"""Type aliases shared across hasten."""

from __future__ import annotations

import os
from typing import Union

import torch

Device = str | int | torch.device
"""A device as users write it: ``"cuda:0"``, ``0``, ``"cpu"``, ``"disk"`` or a ``torch.device``."""

PathLike = Union[str, "os.PathLike[str]"]
"""A file-system path."""
