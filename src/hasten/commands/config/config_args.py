"""The launch config file as typed objects: ``ClusterConfig`` for a local machine or cluster,
``SageMakerConfig`` for Amazon SageMaker (Accelerate's ``commands.config.config_args``).

:func:`load_config_from_file` picks the class from the file's ``compute_environment``. Files are
YAML or JSON (by suffix), read and written through :mod:`hasten.utils.config_file` (old key names
renamed on the way in; written crash-safely). An unknown key is an error that names the closest
known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hasten.utils.atomic import atomic_write
from hasten.utils.config_file import default_config_file, load_config_file
from hasten.utils.dataclasses.enums import ComputeEnvironment, DistributedType, SageMakerDistributedType
from hasten.utils.typing import PathLike

SAGEMAKER_PYTORCH_VERSION = "1.10.2"
SAGEMAKER_PYTHON_VERSION = "py38"
SAGEMAKER_TRANSFORMERS_VERSION = "4.17.0"


def load_config_from_file(config_file: PathLike | None) -> ClusterConfig | SageMakerConfig:
    """The config in ``config_file`` (``None``: the default file), as a ``ClusterConfig`` or, for
    ``compute_environment: AMAZON_SAGEMAKER``, a ``SageMakerConfig``.

    Raises:
        FileNotFoundError: ``config_file`` is given but does not exist, or there is no default file.
        ValueError: the file has unknown keys, lacks ``distributed_type``, or holds a bad value.
    """
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(
            f"The passed configuration file `{config_file}` does not exist. Pass an existing file, or write "
            "the "
            "default one with `hasten config default` and leave out --config_file."
        )
    path = Path(config_file) if config_file is not None else default_config_file()
    if not path.is_file():
        raise FileNotFoundError(f"there is no config file at {path}; write one with `hasten config default`.")
    raw = load_config_file(path)
    environment = str(raw.get("compute_environment", ComputeEnvironment.LOCAL_MACHINE.value))
    kind: type[BaseConfig] = (
        ClusterConfig if environment == ComputeEnvironment.LOCAL_MACHINE.value else SageMakerConfig
    )
    return kind._from_file(path)  # type: ignore[return-value]


def _plain(value: Any) -> Any:
    """``value`` with enums as their values and empty dicts as ``None`` (what config files hold)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()} or None
    return value


@dataclass
class BaseConfig:
    """The settings every launch config has."""

    compute_environment: ComputeEnvironment
    distributed_type: DistributedType | SageMakerDistributedType
    mixed_precision: str
    use_cpu: bool
    debug: bool

    def __post_init__(self) -> None:
        self.compute_environment = ComputeEnvironment.parse(self.compute_environment, "compute_environment")
        kind = (
            SageMakerDistributedType
            if self.compute_environment == ComputeEnvironment.AMAZON_SAGEMAKER
            else DistributedType
        )
        self.distributed_type = kind.parse(self.distributed_type, "distributed_type")
        if getattr(self, "dynamo_config", None) is None:
            object.__setattr__(self, "dynamo_config", {})  # a field of the subclasses, {} when unset

    def to_dict(self) -> dict[str, Any]:
        """The settings as a config file holds them: enums as strings, unset and empty ones left out."""
        plain = {key: _plain(value) for key, value in vars(self).items()}
        return {key: value for key, value in plain.items() if value is not None}

    @staticmethod
    def process_config(config_dict: dict[str, Any]) -> dict[str, Any]:
        """Fill in what older or hand-written files leave out, and convert keys older releases wrote.

        Raises:
            ValueError: there is no ``distributed_type``.
        """
        if "distributed_type" not in config_dict:
            raise ValueError(
                "A `distributed_type` must be specified in the config file (e.g. NO, MULTI_CPU, FSDP)."
            )
        config_dict.setdefault("compute_environment", ComputeEnvironment.LOCAL_MACHINE)
        if "num_processes" not in config_dict and config_dict["distributed_type"] == DistributedType.NO:
            config_dict["num_processes"] = 1
        fp16 = config_dict.pop("fp16", None)
        config_dict.setdefault("mixed_precision", "fp16" if fp16 else None)
        if "dynamo_backend" in config_dict:
            backend = config_dict.pop("dynamo_backend")
            config_dict["dynamo_config"] = {} if backend == "NO" else {"dynamo_backend": backend}
        for key in ("use_cpu", "debug", "enable_cpu_affinity"):
            config_dict.setdefault(key, False)
        return config_dict

    @classmethod
    def _from_file(cls, path: Path) -> BaseConfig:
        config = cls.process_config(load_config_file(path))
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(config) - set(known))
        if unknown:
            hints = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
            named = ", ".join(
                f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in hints.items()
            )
            raise ValueError(
                f"The config file at {path} has unknown keys: {named}. Fix or remove them (a file written "
                "by a newer "
                "Accelerate may need a newer hasten)."
            )
        return cls(**config)

    @classmethod
    def from_json_file(cls, json_file: PathLike | None = None) -> BaseConfig:
        """Read a JSON config (``None``: the default file)."""
        return cls._from_file(Path(json_file) if json_file is not None else default_config_file())

    @classmethod
    def from_yaml_file(cls, yaml_file: PathLike | None = None) -> BaseConfig:
        """Read a YAML config (``None``: the default file)."""
        return cls._from_file(Path(yaml_file) if yaml_file is not None else default_config_file())

    def to_json_file(self, json_file: PathLike) -> None:
        """Write the config as JSON to ``json_file``, crash-safely."""
        with atomic_write(json_file, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def to_yaml_file(self, yaml_file: PathLike) -> None:
        """Write the config as YAML to ``yaml_file``, crash-safely."""
        with atomic_write(yaml_file, "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.to_dict(), handle, sort_keys=True)


@dataclass
class ClusterConfig(BaseConfig):
    """A launch on this machine or a cluster of machines (``compute_environment: LOCAL_MACHINE``)."""

    num_processes: int = -1
    machine_rank: int = 0
    num_machines: int = 1
    gpu_ids: str | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None
    rdzv_backend: str | None = "static"
    same_network: bool | None = False
    main_training_function: str = "main"
    enable_cpu_affinity: bool = False
    fp8_config: dict[str, Any] | None = None
    deepspeed_config: dict[str, Any] | None = None
    fsdp_config: dict[str, Any] | None = None
    parallelism_config: dict[str, Any] | None = None
    megatron_lm_config: dict[str, Any] | None = None
    mpirun_config: dict[str, Any] | None = None
    downcast_bf16: bool = False
    tpu_name: str | None = None
    tpu_zone: str | None = None
    tpu_use_cluster: bool = False
    tpu_use_sudo: bool = False
    command_file: str | None = None
    commands: list[str] | None = None
    tpu_vm: list[str] | None = None
    tpu_env: list[str] | None = None
    dynamo_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for section in (
            "deepspeed_config",
            "fsdp_config",
            "megatron_lm_config",
            "mpirun_config",
            "fp8_config",
            "parallelism_config",
        ):
            if getattr(self, section) is None:
                setattr(self, section, {})
        super().__post_init__()


@dataclass
class SageMakerConfig(BaseConfig):
    """A launch as an Amazon SageMaker training job (``compute_environment: AMAZON_SAGEMAKER``)."""

    ec2_instance_type: str
    iam_role_name: str
    image_uri: str | None = None
    profile: str | None = None
    region: str = "us-east-1"
    num_machines: int = 1
    gpu_ids: str = "all"
    base_job_name: str = "accelerate-sagemaker-1"
    pytorch_version: str = SAGEMAKER_PYTORCH_VERSION
    transformers_version: str = SAGEMAKER_TRANSFORMERS_VERSION
    py_version: str = SAGEMAKER_PYTHON_VERSION
    sagemaker_inputs_file: str | None = None
    sagemaker_metrics_file: str | None = None
    additional_args: dict[str, Any] | None = None
    dynamo_config: dict[str, Any] | None = None
    enable_cpu_affinity: bool = False
