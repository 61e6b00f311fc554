"""Deprecated: `llama3.lora` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.model.lora`, `llama3.train.merge`.
"""

import warnings

from llama3.model.lora import (  # noqa: F401
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TARGET_MODULES,
    FrozenQuantizedLinear,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    add_lora,
    dequantized_weight,
    dropout_masks,
    int4_codes,
    load_adapter,
    lora_deltas,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    read_adapter,
    save_adapter,
    set_adapter_weights,
    unmerge_lora,
)
from llama3.train.merge import save_merged  # noqa: F401

warnings.warn("llama3.lora is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2)
