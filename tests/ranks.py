"""Run a function on N real gloo ranks on 127.0.0.1 and collect what each rank returns.

Two ways, both with real processes (``spawn``, never ``fork``):

* :class:`RankPool` keeps N workers alive in one process group and runs one
  function after another on them, so a test file pays for starting torch and
  forming the group once. Between tasks each worker forgets hasten's state
  (``AcceleratorState._reset_state(reset_partial_state=True)``, which leaves the
  group up for the next ``PartialState()`` to adopt) and restores its environment.
* :func:`run_on_ranks` starts fresh processes for one function, for tests of how
  the group is formed (backend, timeout, a missing rank).

The function must be importable by the workers (a module-level function in a
test module). A rank's exception is re-raised in the parent as
:class:`RankFailure`, with the rank and its traceback. If some ranks fail or
time out while others wait in a collective, the pool is torn down and
rebuilt for the next task, so one broken test does not hang the rest.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

_CTX = mp.get_context("spawn")


class RankFailure(AssertionError):
    """One or more ranks raised or did not finish; the message holds each rank's traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_environment(
    rank: int, world_size: int, port: int, local_world_size: int | None = None
) -> dict[str, str]:
    """The variables torchrun would set for ``rank`` of ``world_size`` on 127.0.0.1."""
    local = local_world_size or world_size
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank % local),
        "LOCAL_WORLD_SIZE": str(local),
        "GROUP_RANK": str(rank // local),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }


def raised(call: Callable[[], Any]) -> str:
    """What ``call()`` raised, as ``"Type: message"`` (``""`` when nothing): a rank returns it, and the
    test reads the message in the parent."""
    try:
        call()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return ""


def _run_task(task: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]) -> tuple[str, Any]:
    function, args, kwargs = task
    try:
        return "ok", function(*args, **kwargs)
    except BaseException as error:
        return "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"


def _forget_hasten_state() -> None:
    from hasten.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _pool_worker(env: dict[str, str], conn: Connection) -> None:
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    from hasten.state import PartialState

    PartialState(timeout=60)  # joins the group once; later tasks adopt it
    baseline = dict(os.environ)
    conn.send(("ready", None))
    while True:
        task = conn.recv()
        if task is None:
            break
        reply = _run_task(task)
        os.environ.clear()
        os.environ.update(baseline)
        _forget_hasten_state()
        try:
            conn.send(reply)
        except Exception as error:
            conn.send(("error", f"could not send the result back: {error!r}"))
    PartialState().destroy_process_group()


def _one_shot_worker(env: dict[str, str], conn: Connection, task: Any) -> None:
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    conn.send(_run_task(task))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _collect(
    conns: list[Connection], procs: list[Any], timeout: float, what: str, labels: list[int] | None = None
) -> list[Any]:
    """Gather one reply per rank (``labels`` are the ranks' numbers); raise RankFailure naming failed and
    silent ranks."""
    labels = labels if labels is not None else list(range(len(conns)))
    replies: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    pending = {conn: rank for rank, conn in zip(labels, conns)}
    exit_codes = dict(zip(labels, procs))
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for conn in wait(list(pending), timeout=remaining):
            rank = pending.pop(conn)  # type: ignore[call-overload]
            try:
                replies[rank] = conn.recv()
            except EOFError:
                exit_codes[rank].join(timeout=5)
                replies[rank] = (
                    "error",
                    f"rank {rank} exited with code {exit_codes[rank].exitcode} without replying",
                )
        if any(status == "error" for status, _ in replies.values()):
            # Give the others a moment to finish; ranks stuck in a collective will not.
            grace = min(3.0, max(0.0, deadline - time.monotonic()))
            for conn in wait(list(pending), timeout=grace):
                rank = pending.pop(conn)  # type: ignore[call-overload]
                try:
                    replies[rank] = conn.recv()
                except EOFError:
                    replies[rank] = ("error", f"rank {rank} exited without replying")
            break
    failures = [
        f"--- rank {rank} raised:\n{value}"
        for rank, (status, value) in sorted(replies.items())
        if status == "error"
    ]
    silent = sorted(set(labels) - set(replies))
    if silent:
        failures.append(
            f"--- ranks {silent} did not finish within {timeout:g} s (stuck, probably in a collective)"
        )
    if failures:
        raise RankFailure(f"{what} failed on {len(conns)} ranks:\n" + "\n".join(failures))
    return [replies[rank][1] for rank in labels]


class RankPool:
    """N worker processes in one gloo group on 127.0.0.1, reused across tasks."""

    def __init__(self, world_size: int, start_timeout: float = 120.0) -> None:
        self.world_size = world_size
        self.start_timeout = start_timeout
        self._procs: list[Any] = []
        self._conns: list[Connection] = []

    def _start(self) -> None:
        port = free_port()
        for rank in range(self.world_size):
            parent, child = _CTX.Pipe()
            proc = _CTX.Process(
                target=_pool_worker, args=(rank_environment(rank, self.world_size, port), child), daemon=True
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        try:
            _collect(self._conns, self._procs, self.start_timeout, f"starting a pool of {self.world_size}")
        except BaseException:
            self.close(kill=True)
            raise

    def run(
        self, function: Callable[..., Any], *args: Any, timeout: float = 120.0, **kwargs: Any
    ) -> list[Any]:
        """Run ``function(*args, **kwargs)`` on every rank; return the results in rank order."""
        if not self._procs:
            self._start()
        for conn in self._conns:
            conn.send((function, args, kwargs))
        try:
            results = _collect(
                self._conns, self._procs, timeout, getattr(function, "__name__", repr(function))
            )
        except BaseException:
            self.close(kill=True)  # ranks may be stuck in a collective: start afresh next time
            raise
        return results

    def close(self, kill: bool = False) -> None:
        """Stop the workers (politely, unless ``kill``)."""
        for conn, proc in zip(self._conns, self._procs):
            if not kill and proc.is_alive():
                try:
                    conn.send(None)
                except OSError:
                    pass
        for proc in self._procs:
            proc.join(timeout=0 if kill else 10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []


def run_on_ranks(
    function: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    ranks: list[int] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Start ``world_size`` fresh processes (or only ``ranks`` of them) and run ``function`` on each.

    ``env`` adds variables to every rank's environment; starting only some ``ranks``
    simulates a missing peer.
    """
    port = free_port()
    labels = list(ranks) if ranks is not None else list(range(world_size))
    procs, conns = [], []
    for rank in labels:
        parent, child = _CTX.Pipe()
        rank_env = {**rank_environment(rank, world_size, port), **(env or {})}
        proc = _CTX.Process(
            target=_one_shot_worker, args=(rank_env, child, (function, args, kwargs)), daemon=True
        )
        proc.start()
        child.close()
        procs.append(proc)
        conns.append(parent)
    try:
        return _collect(conns, procs, timeout, getattr(function, "__name__", repr(function)), labels)
    finally:
        for proc in procs:
            proc.join(timeout=3)  # ranks left hanging after a failure are killed
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in conns:
            conn.close()
