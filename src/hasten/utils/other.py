"""``accelerate.utils.other`` at its path: a facade only (never imported inside hasten).

Accelerate's ``other`` module gathers unrelated helpers; hasten keeps each with its concept and
re-exports them here so that ``from accelerate.utils.other import X`` works as
``from hasten.utils.other import X``.
"""

from hasten.utils.attributes import get_pretty_name, recursive_getattr
from hasten.utils.compilation import (
    compile_regions,
    compile_regions_deepspeed,
    compile_regions_fsdp2,
    has_compiled_regions,
    has_repeated_blocks,
    is_compiled_module,
    is_repeated_blocks,
)
from hasten.utils.config_file import write_basic_config
from hasten.utils.environment import check_os_kernel
from hasten.utils.memory_budget import convert_bytes
from hasten.utils.modeling import get_module_children_bottom_up
from hasten.utils.parallel import (
    clean_state_dict_for_safetensors,
    extract_model_from_parallel,
    get_model_tp_size,
    load,
    model_has_dtensor,
    save,
    wait_for_everyone,
)
from hasten.utils.ports import get_free_port, is_port_in_use
from hasten.utils.tree import merge_dicts

__all__ = [
    "check_os_kernel",
    "clean_state_dict_for_safetensors",
    "compile_regions",
    "compile_regions_deepspeed",
    "compile_regions_fsdp2",
    "convert_bytes",
    "extract_model_from_parallel",
    "get_free_port",
    "get_model_tp_size",
    "get_module_children_bottom_up",
    "get_pretty_name",
    "has_compiled_regions",
    "has_repeated_blocks",
    "is_compiled_module",
    "is_port_in_use",
    "is_repeated_blocks",
    "load",
    "merge_dicts",
    "model_has_dtensor",
    "recursive_getattr",
    "save",
    "wait_for_everyone",
    "write_basic_config",
]
