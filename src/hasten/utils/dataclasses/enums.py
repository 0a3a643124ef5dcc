"""String-valued enums with the member names and values Accelerate uses.

Each member compares equal to its value (``PrecisionType.BF16 == "bf16"``),
``str()`` gives the value, and ``"bf16" in PrecisionType`` tests values, so
strings from config files and environment variables can be checked directly.
"""

from __future__ import annotations

import enum
from typing import Any

from hasten.utils.errors import ConfigurationError


class EnumWithContains(enum.EnumMeta):
    """Enum metaclass whose ``in`` accepts values as well as members (``"bf16" in PrecisionType``)."""

    def __contains__(cls, item: Any) -> bool:
        if isinstance(item, cls):
            return True
        try:
            cls(item)
        except ValueError:
            return False
        return True


class BaseEnum(str, enum.Enum, metaclass=EnumWithContains):
    """A ``str`` enum whose ``str()`` is its value and whose ``in`` tests values."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def list(cls) -> list[str]:
        """Every value, in declaration order."""
        return [member.value for member in cls]

    @classmethod
    def parse(cls, value: Any, name: str) -> Any:
        """Convert ``value`` (a member or its value; case-insensitive) to a member.

        Raises:
            ConfigurationError: (a ``ValueError``) ``value`` is not one of the values; the message names
                ``name``
                (the argument or variable being read) and lists the accepted values.
        """
        if isinstance(value, cls):
            return value
        exact = cls._value2member_map_.get(value) if isinstance(value, str) else None
        if exact is not None:
            return exact
        if isinstance(value, str):
            for member in cls:
                if member.value.lower() == value.strip().lower():
                    return member
        raise ConfigurationError(f"{name}={value!r} is not valid; expected one of {cls.list()}.")


class ComputeEnvironment(BaseEnum):
    """Where the training runs."""

    LOCAL_MACHINE = "LOCAL_MACHINE"
    AMAZON_SAGEMAKER = "AMAZON_SAGEMAKER"


class DistributedType(BaseEnum):
    """How the processes of a job share the work."""

    NO = "NO"
    MULTI_CPU = "MULTI_CPU"
    MULTI_GPU = "MULTI_GPU"
    MULTI_NPU = "MULTI_NPU"
    MULTI_MLU = "MULTI_MLU"
    MULTI_SDAA = "MULTI_SDAA"
    MULTI_MUSA = "MULTI_MUSA"
    MULTI_XPU = "MULTI_XPU"
    DEEPSPEED = "DEEPSPEED"
    FSDP = "FSDP"
    XLA = "XLA"
    MEGATRON_LM = "MEGATRON_LM"
    MULTI_HPU = "MULTI_HPU"
    MULTI_NEURON = "MULTI_NEURON"


class SageMakerDistributedType(BaseEnum):
    """How a SageMaker job distributes its work."""

    NO = "NO"
    DATA_PARALLEL = "DATA_PARALLEL"
    MODEL_PARALLEL = "MODEL_PARALLEL"


class DynamoBackend(BaseEnum):
    """The ``torch.compile`` backends, by the names Accelerate's config files use (``NO`` disables)."""

    NO = "NO"
    EAGER = "EAGER"
    AOT_EAGER = "AOT_EAGER"
    INDUCTOR = "INDUCTOR"
    AOT_TS_NVFUSER = "AOT_TS_NVFUSER"
    NVPRIMS_NVFUSER = "NVPRIMS_NVFUSER"
    CUDAGRAPHS = "CUDAGRAPHS"
    OFI = "OFI"
    FX2TRT = "FX2TRT"
    ONNXRT = "ONNXRT"
    TENSORRT = "TENSORRT"
    AOT_TORCHXLA_TRACE_ONCE = "AOT_TORCHXLA_TRACE_ONCE"
    TORCHXLA_TRACE_ONCE = "TORCHXLA_TRACE_ONCE"
    TVM = "TVM"
    HPU_BACKEND = "HPU_BACKEND"
    NEURON = "NEURON"


class LoggerType(BaseEnum):
    """Experiment trackers."""

    ALL = "all"
    AIM = "aim"
    TENSORBOARD = "tensorboard"
    WANDB = "wandb"
    TRACKIO = "trackio"
    COMETML = "comet_ml"
    MLFLOW = "mlflow"
    CLEARML = "clearml"
    DVCLIVE = "dvclive"
    SWANLAB = "swanlab"


class PrecisionType(BaseEnum):
    """Mixed-precision modes."""

    NO = "no"
    FP8 = "fp8"
    FP16 = "fp16"
    BF16 = "bf16"


class RNGType(BaseEnum):
    """Random-number generators that can be seeded and synchronised."""

    TORCH = "torch"
    CUDA = "cuda"
    MLU = "mlu"
    SDAA = "sdaa"
    MUSA = "musa"
    NPU = "npu"
    XLA = "xla"
    XPU = "xpu"
    HPU = "hpu"
    NEURON = "neuron"
    GENERATOR = "generator"


class DDPCommunicationHookType(BaseEnum):
    """Gradient communication hooks for ``DistributedDataParallel``."""

    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"
    POWER_SGD = "power_sgd"
    BATCHED_POWER_SGD = "batched_power_sgd"


class FP8BackendType(BaseEnum):
    """Engines that implement FP8 training."""

    NO = "NO"
    TE = "TE"
    MSAMP = "MSAMP"
    AO = "AO"


class CustomDtype(BaseEnum):
    """Storage types torch has no dtype for, used when sizing quantized models."""

    FP8 = "fp8"
    INT4 = "int4"
    INT2 = "int2"
