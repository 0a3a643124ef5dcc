"""Each tracker backend for real: values logged through hasten, read back through the backend's own reader.

Every backend runs offline, in a fresh process (these packages patch the interpreter that imports them:
import hooks, stdout capture, atexit handlers), with its home, cache and output folders inside the test's
``tmp_path`` and with sockets guarded: a connection or name lookup beyond 127.0.0.1 fails and is reported,
and the test asserts there was none.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import socket
import struct
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hasten.utils.imports import package_version
from tests.ranks import run_on_ranks
from tests.unit.test_tracking import scalars

REPO = Path(__file__).resolve().parents[2]


def offline_environment(root: Path) -> dict[str, str]:
    """Variables that keep every backend local, quiet and inside ``root``."""
    return {
        "HOME": str(root / "home"),
        "XDG_CACHE_HOME": str(root / "cache"),
        "XDG_CONFIG_HOME": str(root / "config"),
        "XDG_DATA_HOME": str(root / "data"),
        "HF_HOME": str(root / "hf"),
        "HF_HUB_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
        "WANDB_DATA_DIR": str(root / "wandb_data"),
        "WANDB_SILENT": "true",
        "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "COMET_OFFLINE_DIRECTORY": str(root / "comet"),
        "COMET_AUTO_LOG_ENV_DETAILS": "false",  # else it probes cloud metadata addresses
        "COMET_ERROR_TRACKING_ENABLE": "false",
        "CLEARML_OFFLINE_MODE": "1",
        "CLEARML_CACHE_DIR": str(root / "clearml"),
        "DVC_NO_ANALYTICS": "1",
        "TRACKIO_DIR": str(root / "trackio"),
    }


def _guard_network() -> list[str]:
    """Refuse (and record) every connection and name lookup that would leave this machine."""
    attempts: list[str] = []

    def loopback(host: Any) -> bool:
        if host is None or host in ("localhost", b"localhost"):
            return True
        try:
            return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host).is_loopback
        except ValueError:
            return False

    real_connect, real_connect_ex, real_getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def guarded(real: Any) -> Any:
        def connect(sock: socket.socket, address: Any) -> Any:
            if sock.family == socket.AF_UNIX or loopback(address[0]):
                return real(sock, address)
            attempts.append(f"connect to {address!r}")
            raise ConnectionRefusedError(f"tests may not reach {address!r}")

        return connect

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if loopback(host):
            return real_getaddrinfo(host, *args, **kwargs)
        attempts.append(f"look up {host!r}")
        raise socket.gaierror(socket.EAI_NONAME, f"tests may not look up {host!r}")

    socket.socket.connect = guarded(real_connect)  # type: ignore[method-assign]
    socket.socket.connect_ex = guarded(real_connect_ex)  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
    return attempts


CLEARML_CONFIG = "sdk { development { report_use_subprocess: false } }\n"  # a daemon process has no children


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, Any, list[str]]]]:
    """Every installed backend's session, run once in one fresh process; backend -> (status, data, attempts).

    Afterwards, checks that nothing new appeared in the repository.
    """
    root = tmp_path_factory.mktemp("trackers")
    (root / "clearml.conf").write_text(CLEARML_CONFIG)
    env = {**offline_environment(root), "CLEARML_CONFIG_FILE": str(root / "clearml.conf")}
    before = set(os.listdir(REPO))
    yield run_on_ranks(all_sessions, 1, str(root), env=env, timeout=600)[0]
    assert set(os.listdir(REPO)) == before, f"files left in the repository: {set(os.listdir(REPO)) - before}"


def all_sessions(root: str) -> dict[str, tuple[str, Any, list[str]]]:
    """In the fresh process: each backend's session in its own folder; failures and network attempts kept."""
    import traceback

    attempts = _guard_network()
    results: dict[str, tuple[str, Any, list[str]]] = {"root": ("ok", root, [])}
    for name, session in SESSIONS.items():
        if name != "all" and package_version(name) is None:
            continue
        folder = os.path.join(root, name)
        os.makedirs(folder)
        os.chdir(folder)
        seen = len(attempts)
        try:
            results[name] = ("ok", session(folder), attempts[seen:])
        except BaseException:
            results[name] = ("error", traceback.format_exc(), attempts[seen:])
    return results


def result(sessions: dict[str, tuple[str, Any, list[str]]], name: str) -> Any:
    """The data of ``name``'s session, after checking it ran, did not fail and stayed off the network."""
    if name not in sessions:
        pytest.skip(f"{name} is not installed")
    status, data, attempts = sessions[name]
    if status == "error":
        pytest.fail(f"the {name} session failed in its process:\n{data}")
    assert attempts == [], f"{name} tried to reach the network: {attempts}"
    return data


def _run(log_with: str, root: str, init_kwargs: dict[str, Any], config: dict[str, Any] | None = None) -> Any:
    """The Accelerator's path: filter, build and start, store the config, log three steps, finish."""
    from hasten._tracking.lifecycle import finish_trackers, log_to_trackers, start_trackers
    from hasten.tracking import filter_trackers

    trackers = start_trackers(
        filter_trackers(log_with, os.path.join(root, "logs")),
        "proj",
        os.path.join(root, "logs"),
        config=config if config is not None else {"lr": 0.1, "layers": 2, "optimizer": "adamw"},
        init_kwargs={log_with: init_kwargs},
    )
    import torch

    for step in range(3):
        log_to_trackers(trackers, {"loss": 1.0 / (step + 1), "acc": torch.tensor(step / 4)}, step=step)
    return trackers, lambda: finish_trackers(trackers)


EXPECTED_LOSS = [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
EXPECTED_ACC = [(0, 0.0), (1, 0.25), (2, 0.5)]


# --- Weights & Biases: the offline run's .wandb file ---------------------------------------------------


def _leveldb_records(path: str, ident: bytes) -> Iterator[bytes]:
    """The records of a W&B transaction log (LevelDB's log format behind a 7-byte W&B header)."""
    data = Path(path).read_bytes()
    assert data[:4] == ident, data[:7]
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def wandb_session(root: str) -> Any:
    trackers, finish = _run("wandb", root, {"dir": root})
    tracker = trackers[0]
    tracker.log_images({"pictures": [np.zeros((4, 4, 3), dtype=np.uint8)]}, step=3)
    tracker.log_table("scores", columns=["a", "b"], data=[[1, 2], [3, 4]], step=3)
    finish()
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # the service writes the run's file in the background; stopping it completes the file

    (path,) = glob.glob(os.path.join(root, "wandb", "offline-run-*", "run-*.wandb"))
    history, config = [], {}
    for raw in _leveldb_records(path, b":W&B"):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            history.append(items)
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "exit":
            return history, config
    raise AssertionError(f"{path} has no exit record: the run did not finish")


def test_wandb_offline(sessions: Any) -> None:
    history, config = result(sessions, "wandb")
    assert {"lr": 0.1, "layers": 2, "optimizer": "adamw"}.items() <= config.items()
    steps = {row["_step"]: row for row in history}
    assert [(step, steps[step]["loss"]) for step in range(3)] == EXPECTED_LOSS
    assert [(step, steps[step]["acc"]) for step in range(3)] == EXPECTED_ACC
    assert (steps[3]["pictures/_type"], steps[3]["pictures/count"]) == ("images/separated", 1)
    assert (steps[3]["scores/_type"], steps[3]["scores/nrows"]) == ("table-file", 2)


# --- MLflow: the local file store, through MlflowClient -----------------------------------------------


def mlflow_session(root: str) -> Any:
    long_value = "x" * 7000
    trackers, finish = _run(
        "mlflow",
        root,
        {"run_name": "first", "tags": {"team": "nlp"}},
        config={"lr": 0.1, "layers": 2, "optimizer": "adamw", "notes": long_value},
    )
    tracker = trackers[0]
    tracker.log({"phase": "train", "loss": 0.125}, step=3)  # the string is skipped with a warning
    Path(root, "report.txt").write_text("done")
    tracker.log_artifact(os.path.join(root, "report.txt"))
    Path(root, "plots").mkdir()
    Path(root, "plots", "a.csv").write_text("1,2")
    tracker.log_artifacts(os.path.join(root, "plots"), artifact_path="plots")
    run_id = tracker.active_run.info.run_id
    finish()
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    history = {
        key: [(metric.step, metric.value) for metric in client.get_metric_history(run_id, key)]
        for key in ("loss", "acc")
    }
    experiment = client.get_experiment(run.info.experiment_id)
    artifacts = [item.path for item in client.list_artifacts(run_id)]
    return (history, run.data.params, run.data.tags, experiment.name, run.info.status, artifacts)


def test_mlflow_file_store(sessions: Any) -> None:
    history, params, tags, experiment, status, artifacts = result(sessions, "mlflow")
    assert history["loss"] == [*EXPECTED_LOSS, (3, 0.125)] and history["acc"] == EXPECTED_ACC
    assert params == {
        "lr": "0.1",
        "layers": "2",
        "optimizer": "adamw",
    }  # the 7000-character value was refused
    assert tags["team"] == "nlp" and tags["mlflow.runName"] == "first"
    assert (experiment, status, sorted(artifacts)) == ("proj", "FINISHED", ["plots", "report.txt"])


# --- Comet: the offline archive's messages -------------------------------------------------------------


def comet_options() -> dict[str, Any]:
    """Offline, and without wrapping stdout (Comet stacks a wrapper per experiment in one process)."""
    import comet_ml

    return {"online": False, "experiment_config": comet_ml.ExperimentConfig(auto_output_logging=False)}


def comet_session(root: str) -> Any:
    trackers, finish = _run("comet_ml", root, comet_options())
    trackers[0].log({"phase": "train", "lrs": {"g0": 0.5}}, step=4)
    finish()
    (archive,) = glob.glob(os.path.join(os.environ["COMET_OFFLINE_DIRECTORY"], "*.zip"))
    with zipfile.ZipFile(archive) as opened:
        messages = [json.loads(line) for line in opened.read("messages.json").decode().splitlines()]
    return messages


def test_comet_offline(sessions: Any) -> None:
    messages = result(sessions, "comet_ml")
    metrics: dict[str, list[tuple[int, float]]] = {}
    params, others = {}, {}
    for message in messages:
        payload = message["payload"]
        if message["type"] == "metric_msg":
            metric = payload["metric"]
            metrics.setdefault(metric["metricName"], []).append((metric["step"], metric["metricValue"]))
        elif message["type"] == "parameter_msg":
            params[payload["param"]["paramName"]] = payload["param"]["paramValue"]
        elif message["type"] == "log_other":
            others[payload["key"]] = payload["value"]
    assert metrics["loss"] == EXPECTED_LOSS and metrics["acc"] == EXPECTED_ACC
    assert metrics["lrs_g0"] == [(4, 0.5)]
    assert {"lr": 0.1, "layers": 2, "optimizer": "adamw"}.items() <= params.items()
    assert others["phase"] == "train"


# --- ClearML: the offline session folder --------------------------------------------------------------


# No framework patching, resource monitor or repository detection (which also asks a server for updates).
CLEARML_QUIET = {
    "auto_connect_frameworks": {"detect_repository": False, "pytorch": False, "tensorboard": False},
    "auto_resource_monitoring": False,
    "auto_connect_streams": False,
}


def clearml_session(root: str) -> Any:
    trackers, finish = _run("clearml", root, CLEARML_QUIET)
    tracker = trackers[0]
    tracker.log({"eval_loss": 0.75}, step=1)
    tracker.log({"final_acc": 0.875})
    tracker.log_table("scores", columns=["a", "b"], data=[[1, 2]], step=1)
    tracker.log_images({"eval_pictures": np.zeros((4, 4, 3), dtype=np.uint8)}, step=2)
    finish()
    offline = os.path.join(os.environ["CLEARML_CACHE_DIR"], "offline", "*")
    (folder,) = [path for path in glob.glob(offline) if os.path.isdir(path)]
    lines = Path(folder, "metrics.jsonl").read_text().splitlines()
    events = [event for line in lines for event in json.loads(line)]
    task = json.loads(Path(folder, "task.json").read_text())
    return events, task["configuration"], task["project_name"], task["name"]


def test_clearml_offline(sessions: Any) -> None:
    events, configuration, project, name = result(sessions, "clearml")
    assert (project, name) == ("proj", "proj")
    assert "lr = 0.1" in configuration["General"]["value"]
    scalar_events = [e for e in events if e["type"] == "training_stats_scalar"]
    series = {(e["metric"], e["variant"]): [] for e in scalar_events}
    for event in scalar_events:
        series[(event["metric"], event["variant"])].append((event["iter"], event["value"]))
    assert series[("loss", "train")] == EXPECTED_LOSS and series[("acc", "train")] == EXPECTED_ACC
    assert series[("loss", "eval")] == [(1, 0.75)]
    assert [
        value for (metric, variant), points in series.items() for _, value in points if variant == "final_acc"
    ] == [0.875]
    assert any(e["type"] == "plot" and "scores" in json.dumps(e) for e in events)
    images = [e for e in events if e["type"] == "training_debug_image"]
    assert [(e["metric"], e["variant"], e["iter"]) for e in images] == [("pictures", "eval", 2)]


# --- DVCLive: its folder, through dvclive's own parsers ------------------------------------------------


def dvclive_session(root: str) -> Any:
    trackers, finish = _run("dvclive", root, {"dir": os.path.join(root, "dvclive"), "save_dvc_exp": False})
    try:
        trackers[0].log({"loss": 9.0, "histogram": [1, 2]}, step=7)
    except TypeError as error:
        refused = str(error)
    finish()
    from dvclive.serialize import load_yaml
    from dvclive.utils import parse_json, parse_tsv

    folder = Path(root, "dvclive")
    plots = {name: parse_tsv(folder / "plots" / "metrics" / f"{name}.tsv") for name in ("loss", "acc")}
    return plots, parse_json(folder / "metrics.json"), load_yaml(folder / "params.yaml"), refused


def test_dvclive(sessions: Any) -> None:
    plots, latest, params, refused = result(sessions, "dvclive")
    assert "DVCLiveTracker cannot log values['histogram'] = [1, 2] of type list" in refused
    assert [(int(row["step"]), float(row["loss"])) for row in plots["loss"]] == EXPECTED_LOSS
    assert [(int(row["step"]), float(row["acc"])) for row in plots["acc"]] == EXPECTED_ACC
    assert latest == {"loss": pytest.approx(1 / 3), "acc": 0.5, "step": 2}
    assert params == {"lr": 0.1, "layers": 2, "optimizer": "adamw"}


# --- SwanLab: the offline run's record file -------------------------------------------------------------


def swanlab_session(root: str) -> Any:
    trackers, finish = _run("swanlab", root, {"mode": "offline", "logdir": os.path.join(root, "swanlog")})
    trackers[0].log_images({"pictures": [np.zeros((4, 4, 3), dtype=np.uint8)]}, step=3)
    finish()
    import yaml
    from google.protobuf.json_format import MessageToDict
    from swanlab.proto.swanlab.record.v1 import record_pb2
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (run_folder,) = glob.glob(os.path.join(root, "swanlog", "run-*"))
    reader = DataStoreReader()
    reader.open(glob.glob(os.path.join(run_folder, "run-*.swanlab"))[0])
    points: dict[str, list[tuple[int, float]]] = {}
    columns = []
    for raw in reader:
        record = record_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "column":
            column = MessageToDict(record.column)
            columns.append((column["columnKey"], column["columnType"]))
        if record.WhichOneof("record_type") == "scalar":
            points.setdefault(record.scalar.key, []).append((record.scalar.step, record.scalar.value.number))
    reader.close()
    config = yaml.safe_load(Path(run_folder, "files", "config.yaml").read_text())
    return points, {key: entry["value"] for key, entry in config.items()}, columns


def test_swanlab_offline(sessions: Any) -> None:
    points, config, columns = result(sessions, "swanlab")
    assert ("pictures", "COLUMN_TYPE_IMAGE") in columns
    assert points["loss"] == EXPECTED_LOSS and points["acc"] == EXPECTED_ACC
    assert config == {"lr": 0.1, "layers": 2, "optimizer": "adamw"}  # and no stray `allow_val_change`


# --- Trackio: its local SQLite store ---------------------------------------------------------------------


def trackio_session(root: str) -> Any:
    _, finish = _run("trackio", root, {})
    finish()
    from trackio.sqlite_storage import SQLiteStorage

    (run,) = SQLiteStorage.get_runs("proj")
    return SQLiteStorage.get_logs("proj", run), SQLiteStorage.get_run_config("proj", run)


def test_trackio_local(sessions: Any) -> None:
    logs, config = result(sessions, "trackio")
    assert [(row["step"], row["loss"]) for row in logs] == EXPECTED_LOSS
    assert [(row["step"], row["acc"]) for row in logs] == EXPECTED_ACC
    assert {"lr": 0.1, "layers": 2, "optimizer": "adamw"}.items() <= config.items()
    assert "allow_val_change" not in config


# --- log_with="all": every installed backend at once ------------------------------------------------------


def all_session(root: str) -> Any:
    from hasten._tracking.lifecycle import finish_trackers, log_to_trackers, start_trackers
    from hasten.tracking import filter_trackers

    logs = os.path.join(root, "logs")
    options: dict[str, Any] = {
        "wandb": {"dir": root},
        "comet_ml": comet_options() if package_version("comet_ml") else {},
        "clearml": CLEARML_QUIET,
        "dvclive": {"dir": os.path.join(root, "dvclive"), "save_dvc_exp": False},
        "swanlab": {"mode": "offline", "logdir": os.path.join(root, "swanlog")},
    }
    specs = filter_trackers("all", logs)
    names = [str(spec) for spec in specs]
    trackers = start_trackers(
        specs,
        "every",
        logs,
        config={"lr": 0.5},
        init_kwargs={name: kwargs for name, kwargs in options.items() if name in names},
    )
    for step in range(2):
        log_to_trackers(trackers, {"loss": 2.0 - step}, step=step)
    finish_trackers(trackers)
    return [tracker.name for tracker in trackers]


def test_log_with_all_starts_every_installed_backend(sessions: Any) -> None:
    from hasten.tracking import get_available_trackers

    names = result(sessions, "all")
    assert names == [str(t) for t in get_available_trackers()]
    if "tensorboard" in names:
        run = Path(result(sessions, "root")) / "all" / "logs" / "every"
        assert scalars(run, "loss") == [(0, 2.0), (1, 1.0)]


# --- TensorBoard through tensorboardX, when tensorboard is not installed -----------------------------------


def tensorboardx_session(root: str) -> Any:
    sys.modules["tensorboard"] = None  # type: ignore[assignment]  # as if only tensorboardX were installed
    package_version.cache_clear()
    trackers, finish = _run("tensorboard", root, {})
    writer_module = type(trackers[0].writer).__module__
    finish()
    return writer_module


def test_tensorboardx_when_tensorboard_is_absent(sessions: Any) -> None:
    assert result(sessions, "tensorboardX").startswith("tensorboardX")
    run = Path(result(sessions, "root")) / "tensorboardX" / "logs" / "proj"
    assert scalars(run, "loss") == EXPECTED_LOSS and scalars(run, "acc") == EXPECTED_ACC


# Run in this order in one process; tensorboardX last, as it hides tensorboard from the rest.
SESSIONS = {
    "wandb": wandb_session,
    "mlflow": mlflow_session,
    "comet_ml": comet_session,
    "clearml": clearml_session,
    "dvclive": dvclive_session,
    "swanlab": swanlab_session,
    "trackio": trackio_session,
    "all": all_session,
    "tensorboardX": tensorboardx_session,
}
