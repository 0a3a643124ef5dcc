"""The n-D parallelism layout of a training job: data-parallel replicate and shard, tensor, context and
sequence parallel sizes, and the ``DeviceMesh`` that realises it.

Sizes left unset come from the ``PARALLELISM_CONFIG_*`` variables ``accelerate launch`` writes
(else 1). Their product must equal the number of processes. The mesh is built over the current
process group with ``init_device_mesh`` (gloo on CPU, nccl on GPUs), in the dimension order
``dp_replicate, dp_shard, cp, sp, tp``, plus the joint dimensions the engines use: ``dp``
(all data-parallel ranks), ``dp_shard_cp`` (what FSDP shards over) and ``dp_cp`` (what the loss
is averaged over).

Example (4 processes; FSDP over 2 ranks, tensor parallel over 2)::

    config = ParallelismConfig(dp_shard_size=2, tp_size=2)
    mesh = config.get_device_mesh("cpu")
    mesh["tp"].size(), mesh["dp_shard_cp"].size()  # (2, 2)
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from hasten.utils.dataclasses._env import env_field, one_of, positive_int, resolve_fields
from hasten.utils.dataclasses.enums import DistributedType
from hasten.utils.dataclasses.plugins.parallelism import TorchContextParallelConfig, TorchTensorParallelConfig
from hasten.utils.dataclasses.plugins.sequence_parallel import DeepSpeedSequenceParallelConfig
from hasten.utils.errors import ConfigurationError

MESH_ORDER = ["dp_replicate", "dp_shard", "cp", "sp", "tp"]
_HANDLERS: dict[str, type] = {
    "tp": TorchTensorParallelConfig,
    "cp": TorchContextParallelConfig,
    "sp": DeepSpeedSequenceParallelConfig,
}


@dataclass
class ParallelismConfig:
    """How the processes divide the work (see the module docstring).

    Args:
        dp_replicate_size: data-parallel replicas (each holds a whole copy, or a whole FSDP group).
        dp_shard_size: ranks one FSDP group shards the model over. ``dp_replicate_size > 1`` with
            ``dp_shard_size > 1`` is hybrid sharding (HSDP).
        tp_size: ranks each layer's weights are split over (tensor parallel).
        cp_size: ranks the sequence is split over for attention (context parallel, ``cp_backend="torch"``).
        cp_backend: ``"torch"``.
        sp_size: ranks the sequence is split over by DeepSpeed (Ulysses; ``sp_backend="deepspeed"``).
        sp_backend: ``"deepspeed"``.
        tp_handler / cp_handler / sp_handler: the dimension's settings; built with defaults when the
            dimension is larger than 1 and none is given.

    Raises:
        ConfigurationError: a size below 1 or not an integer, an unknown backend, a handler of the
            wrong type, context and sequence parallelism together, or tensor / context parallelism
            with pure replication (no ``dp_shard``).
    """

    dp_replicate_size: int | None = env_field("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", 1, positive_int)
    dp_shard_size: int | None = env_field("PARALLELISM_CONFIG_DP_SHARD_SIZE", 1, positive_int)
    tp_size: int | None = env_field("PARALLELISM_CONFIG_TP_SIZE", 1, positive_int)
    cp_size: int | None = env_field("PARALLELISM_CONFIG_CP_SIZE", 1, positive_int)
    cp_backend: str | None = env_field("PARALLELISM_CONFIG_CP_BACKEND", "torch", one_of(["torch"]))
    sp_size: int | None = env_field("PARALLELISM_CONFIG_SP_SIZE", 1, positive_int)
    sp_backend: str | None = env_field("PARALLELISM_CONFIG_SP_BACKEND", "deepspeed", one_of(["deepspeed"]))
    tp_handler: TorchTensorParallelConfig | None = None
    cp_handler: TorchContextParallelConfig | None = None
    sp_handler: DeepSpeedSequenceParallelConfig | None = None

    device_mesh = None  # the DeviceMesh, once built (not a field: it is not configuration)
    # the flattened "dp", "dp_shard_cp" and "dp_cp" meshes, once the mesh is built
    _joint_meshes: dict[str, Any] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        resolve_fields(self)
        for dimension, kind in _HANDLERS.items():
            handler = getattr(self, f"{dimension}_handler")
            if handler is None and self._sizes[dimension] > 1:
                setattr(self, f"{dimension}_handler", kind())
            elif handler is not None and not isinstance(handler, kind):
                raise ConfigurationError(
                    f"{dimension}_handler={handler!r} must be a {kind.__name__} (for the "
                    f"{'torch' if dimension != 'sp' else 'deepspeed'} backend)."
                )
        sizes = self._sizes
        if sizes["cp"] > 1 and sizes["sp"] > 1:
            raise ConfigurationError(
                f"cp_size={self.cp_size} and sp_size={self.sp_size}: context parallelism and sequence "
                "parallelism "
                "both split the sequence and cannot be combined; set one of them to 1."
            )
        if (sizes["tp"] > 1 or sizes["cp"] > 1) and sizes["dp_replicate"] > 1 and sizes["dp_shard"] == 1:
            raise ConfigurationError(
                f"tp_size={self.tp_size}, cp_size={self.cp_size} with "
                f"dp_replicate_size={self.dp_replicate_size} "
                "and dp_shard_size=1: tensor/context parallelism composes with FSDP, not with pure "
                "replication. "
                "Use dp_shard_size > 1 (FSDP + TP/CP), with dp_replicate_size > 1 too for HSDP + TP/CP."
            )

    @property
    def _sizes(self) -> dict[str, int]:
        return {dimension: int(getattr(self, f"{dimension}_size")) for dimension in MESH_ORDER}

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.init)
        return f"ParallelismConfig({fields}, total_size={self.total_size})"

    def to_json(self) -> dict[str, Any]:
        """The settings as plain data (handlers as dicts); the mesh is left out."""
        return {
            f.name: dataclasses.asdict(value)
            if dataclasses.is_dataclass(value) and not isinstance(value, type)
            else value
            for f in dataclasses.fields(self)
            if f.init
            for value in [getattr(self, f.name)]
        }

    # --- dimensions ---------------------------------------------------------------------------

    @property
    def dp_replicate_enabled(self) -> bool:
        """Whether there is more than one data-parallel replica."""
        return self._sizes["dp_replicate"] > 1

    @property
    def dp_shard_enabled(self) -> bool:
        """Whether the model is sharded (FSDP) over more than one rank."""
        return self._sizes["dp_shard"] > 1

    @property
    def tp_enabled(self) -> bool:
        """Whether tensor parallelism is used."""
        return self._sizes["tp"] > 1

    @property
    def cp_enabled(self) -> bool:
        """Whether context parallelism is used."""
        return self._sizes["cp"] > 1

    @property
    def sp_enabled(self) -> bool:
        """Whether sequence parallelism is used."""
        return self._sizes["sp"] > 1

    def _enabled(self, dimensions: list[str]) -> list[str]:
        return [dimension for dimension in dimensions if self._sizes[dimension] > 1]

    @property
    def dp_dim_names(self) -> list[str]:
        """Enabled dimensions across which the data is split."""
        return self._enabled(["dp_replicate", "dp_shard"])

    @property
    def non_dp_dim_names(self) -> list[str]:
        """Enabled dimensions whose ranks see the same batch."""
        return self._enabled(["tp", "cp", "sp"])

    @property
    def dp_shard_cp_dim_names(self) -> list[str]:
        """Enabled dimensions flattened into ``dp_shard_cp``, over which FSDP shards."""
        return self._enabled(["dp_shard", "cp"])

    @property
    def dp_cp_dim_names(self) -> list[str]:
        """Enabled dimensions flattened into ``dp_cp``, over which the loss is averaged."""
        return self._enabled(["dp_replicate", "dp_shard", "cp"])

    @property
    def fsdp_dim_names(self) -> list[str]:
        """The mesh dimensions FSDP is applied over (``dp_replicate`` too when enabled, for HSDP)."""
        return [*self._enabled(["dp_replicate"]), "dp_shard_cp"]

    @property
    def active_mesh_dims(self) -> list[str]:
        """Every enabled dimension."""
        return self.dp_dim_names + self.non_dp_dim_names

    @property
    def total_size(self) -> int:
        """The product of all sizes: the number of processes this layout needs."""
        return self.data_parallel_size * self.non_data_parallel_size

    @property
    def non_data_parallel_size(self) -> int:
        """``tp_size * cp_size * sp_size``."""
        sizes = self._sizes
        return sizes["tp"] * sizes["cp"] * sizes["sp"]

    @property
    def data_parallel_size(self) -> int:
        """``dp_replicate_size * dp_shard_size``."""
        return self._sizes["dp_replicate"] * self._sizes["dp_shard"]

    # --- mesh ---------------------------------------------------------------------------------

    def _get_mesh(self) -> tuple[tuple[str, ...], tuple[int, ...]] | tuple[()]:
        """The enabled dimensions' names and sizes, in mesh order (empty when all sizes are 1)."""
        active = [dimension for dimension in MESH_ORDER if dimension in self.active_mesh_dims]
        if not active:
            return ()
        return tuple(active), tuple(self._sizes[dimension] for dimension in active)

    def build_device_mesh(self, device_type: str) -> Any:
        """Build the ``DeviceMesh`` on the current process group, with the joint dimensions.

        Returns ``None`` when every size is 1, or when DeepSpeed's sequence parallelism (which
        forms its own groups) is on.

        Raises:
            ConfigurationError: no process group, or the world size is not ``total_size``.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if self.sp_enabled and self.sp_backend == "deepspeed":
            return None
        mesh = self._get_mesh()
        if not mesh:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigurationError(
                f"building the device mesh of {self!r} needs a process group of {self.total_size} ranks; "
                "create PartialState() (or the Accelerator) under a launcher first."
            )
        if dist.get_world_size() != self.total_size:
            raise ConfigurationError(
                f"the parallelism sizes multiply to {self.total_size} but there are {dist.get_world_size()} "
                "processes; adjust dp_replicate_size / dp_shard_size / tp_size / cp_size / sp_size."
            )
        names, shape = mesh
        device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        self._joint_meshes = {}
        for joint, dimensions in (
            ("dp", self.dp_dim_names),
            ("dp_shard_cp", self.dp_shard_cp_dim_names),
            ("dp_cp", self.dp_cp_dim_names),
        ):
            if dimensions:
                self._joint_meshes[joint] = device_mesh[tuple(dimensions)]._flatten(joint)
        return device_mesh

    def _submesh(self, names: list[str], mesh: Any = None) -> Any:
        """The part of ``mesh`` (default: this config's) spanning the dimensions ``names``.

        A joint dimension alone is the mesh kept when it was flattened; ``dp_shard_cp`` without
        context parallelism is ``dp_shard`` itself. torch deprecates slicing flattened dimensions
        out of the root mesh, which only HSDP with context parallelism still needs.
        """
        own = mesh is None or mesh is self.device_mesh
        mesh = self.device_mesh if mesh is None else mesh
        if own and len(names) == 1 and names[0] in self._joint_meshes:
            return self._joint_meshes[names[0]]
        present = tuple(mesh.mesh_dim_names or ())
        if not self.cp_enabled and "dp_shard" in present:
            names = ["dp_shard" if name == "dp_shard_cp" else name for name in names]
        if all(name in present for name in names):
            return mesh[tuple(names)]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Slicing a flattened dim", category=UserWarning)
            return mesh[tuple(names)]

    def get_device_mesh(self, device_type: str | None = None) -> Any:
        """The mesh, built on first use for ``device_type`` (``"cpu"``, ``"cuda"``, ...).

        Raises:
            ValueError: no mesh yet and no ``device_type``, or a mesh of another device type exists.
        """
        if self.device_mesh is None:
            if device_type is None:
                raise ValueError(
                    "get_device_mesh() needs device_type (e.g. 'cpu' or 'cuda') the first time, to build "
                    "the mesh."
                )
            self.device_mesh = self.build_device_mesh(device_type)
        elif device_type is not None and self.device_mesh.device_type != device_type:
            raise ValueError(
                f"the device mesh was built for {self.device_mesh.device_type!r}, not "
                f"device_type={device_type!r}; "
                "one ParallelismConfig has one mesh."
            )
        return self.device_mesh

    def _set_size(self, parallelism: str, size: int) -> None:
        if parallelism not in MESH_ORDER:
            raise ValueError(f"parallelism={parallelism!r} is not a dimension; expected one of {MESH_ORDER}.")
        setattr(self, f"{parallelism}_size", positive_int(size, f"{parallelism}_size"))

    def _validate_accelerator(self, accelerator: Any) -> None:
        """Check this layout against the job (``accelerator``: the Accelerator or its state).

        A layout of size 1 on several processes becomes plain data parallelism over all of them.

        Raises:
            ConfigurationError: the sizes do not multiply to the number of processes, FSDP has no
                dimension to shard over, or the engine cannot use n-D parallelism.
        """
        state = getattr(accelerator, "state", accelerator)
        processes = int(state.num_processes)
        if processes == 1 and self.total_size == 1:
            return
        if self.total_size == 1:
            self._set_size("dp_replicate", processes)
        fsdp_plugin = getattr(state, "fsdp_plugin", None)
        is_fsdp2 = (
            state.distributed_type == DistributedType.FSDP and getattr(fsdp_plugin, "fsdp_version", 1) == 2
        )
        deepspeed_sp = self.sp_enabled and self.sp_backend == "deepspeed"
        if not deepspeed_sp and self.total_size != processes:
            raise ConfigurationError(
                f"ParallelismConfig total_size ({self.total_size}) does not match num_processes "
                f"({processes}); "
                "adjust dp_replicate_size / dp_shard_size / tp_size / cp_size / sp_size so they multiply to "
                "it."
            )
        if is_fsdp2 and not self.dp_shard_enabled and not self.cp_enabled:
            raise ConfigurationError(
                "FSDP is enabled but the parallelism layout has no dimension to shard over (dp_shard_size "
                "and "
                "cp_size are 1); launch without FSDP, or give FSDP ranks with dp_shard_size > 1."
            )
        kind = DistributedType(state.distributed_type)
        if not (is_fsdp2 or kind == DistributedType.DEEPSPEED or kind.value.startswith("MULTI_")):
            raise ConfigurationError(
                "ParallelismConfig works with FSDP version 2, multi-device data parallelism or DeepSpeed, "
                "not "
                f"distributed_type={kind.value!r}."
            )
        ignored = [f"{d}_handler" for d in _HANDLERS if self._sizes[d] == 1 and getattr(self, f"{d}_handler")]
        if ignored and state.is_main_process:
            warnings.warn(
                f"ParallelismConfig: {ignored} set but their dimensions have size 1; they are ignored.",
                UserWarning,
                stacklevel=2,
            )
