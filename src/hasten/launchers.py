"""Start a function on several processes from Python: ``debug_launcher`` (CPU, for tests) and
``notebook_launcher`` (from a notebook or script, through torch's elastic agent)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as torch_mp

from hasten.utils.dataclasses.enums import PrecisionType
from hasten.utils.environment import patch_environment
from hasten.utils.ports import get_free_port


def debug_launcher(function: Callable[..., Any], args: tuple[Any, ...] = (), num_processes: int = 2) -> None:
    """Run ``function(*args)`` on ``num_processes`` CPU processes forming one gloo group (for tests).

    Processes are forked, so functions defined in a notebook or test work. An exception in any
    process is raised here, naming the process.
    """
    from hasten.utils.launch import PrepareForLaunch

    if num_processes < 1:
        raise ValueError(f"debug_launcher: num_processes={num_processes} must be at least 1")
    group = {
        "WORLD_SIZE": str(num_processes),
        "LOCAL_WORLD_SIZE": str(num_processes),
        "NPROC": str(num_processes),
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(get_free_port()),
        "ACCELERATE_USE_CPU": "True",
    }
    with patch_environment(**group):  # the children inherit it; PrepareForLaunch adds each one's rank
        torch_mp.start_processes(
            PrepareForLaunch(function, distributed_type="MULTI_CPU"),
            args=args,
            nprocs=num_processes,
            start_method="fork",
        )


def notebook_launcher(
    function: Callable[..., Any],
    args: tuple[Any, ...] = (),
    num_processes: int | None = None,
    mixed_precision: str = "no",
    use_port: str = "29500",
    master_addr: str = "127.0.0.1",
    node_rank: int = 0,
    num_nodes: int = 1,
    rdzv_backend: str = "static",
    rdzv_endpoint: str = "",
    rdzv_conf: dict[str, Any] | None = None,
    rdzv_id: str = "none",
    max_restarts: int = 0,
    monitor_interval: float = 0.1,
    log_line_prefix_template: str | None = None,
) -> Any:
    """Run ``function(*args)`` on ``num_processes`` processes per node, started by torch's elastic agent.

    With ``num_processes`` of ``None`` or 1, it runs here, in this process, and returns its result.
    Otherwise the processes are forked (so a function defined in the notebook works), form one
    group through the rendezvous (``master_addr:use_port``, or ``rdzv_backend``/``rdzv_endpoint``
    across nodes), and failures are raised as torch's ``ChildFailedError`` with each child's error.
    """
    precision = PrecisionType.parse(mixed_precision, "mixed_precision")
    if num_processes is None or num_processes == 1:
        with patch_environment(accelerate_mixed_precision=precision.value):
            return function(*args)
    if num_processes < 1:
        raise ValueError(f"notebook_launcher: num_processes={num_processes} must be at least 1")
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    endpoint = rdzv_endpoint or f"{master_addr}:{use_port}"
    config = LaunchConfig(
        min_nodes=num_nodes,
        max_nodes=num_nodes,
        nproc_per_node=num_processes,
        run_id=rdzv_id,
        rdzv_backend=rdzv_backend,
        rdzv_endpoint=endpoint,
        rdzv_configs={"rank": node_rank, **(rdzv_conf or {})},
        max_restarts=max_restarts,
        monitor_interval=monitor_interval,
        start_method="fork",
        log_line_prefix_template=log_line_prefix_template,
    )
    before = dict(os.environ)
    try:
        with patch_environment(accelerate_mixed_precision=precision.value):
            return elastic_launch(config, entrypoint=function)(*args)
    finally:  # torch's agent leaves variables such as TORCHELASTIC_SIGNALS_TO_HANDLE behind
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)


def test_launch() -> None:
    """Check that this process can form its ``PartialState`` (what a launched test script calls first).

    Raises whatever forming the state raises: an inconsistent launch environment, or peers that
    never arrive.
    """
    from hasten.state import PartialState

    PartialState()


test_launch.__test__ = False  # type: ignore[attr-defined]  # a launcher helper, not a pytest test
