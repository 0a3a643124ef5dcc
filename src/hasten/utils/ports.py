"""TCP ports on this machine: whether one is taken, and one that is free (for a rendezvous)."""

from __future__ import annotations

import socket

DEFAULT_PORT = 29500
"""The port torchrun and ``hasten launch`` use for the rendezvous unless told otherwise."""


def is_port_in_use(port: int | None = None) -> bool:
    """Whether something listens on ``port`` (29500 by default) on ``localhost``.

    ``hasten launch`` asks before starting a second job on one machine, whose rendezvous would
    otherwise collide with the first's.
    """
    port = DEFAULT_PORT if port is None else port
    if not 0 < port < 65536:
        raise ValueError(f"port={port!r} is not a TCP port number; give one between 1 and 65535.")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def get_free_port() -> int:
    """A port on ``127.0.0.1`` that nothing listens on now (the system picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
