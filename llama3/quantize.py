"""Deprecated: `llama3.quantize` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.quant.weight_only`.
"""

import warnings

from llama3.quant.weight_only import (  # noqa: F401
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    LAYOUTS,
    MODES,
    QUANTIZED_LAYERS,
    Int4Linear,
    Int8Linear,
    QuantizedWeight,
    QuantizeError,
    check_group_size,
    check_settings,
    dequantize_int4,
    dequantize_int8,
    is_quantized_layer,
    layout_for,
    mode_for,
    pack_int4,
    quantize,
    quantize_model,
    quantized_linear,
    unpack_int4,
)

warnings.warn(
    "llama3.quantize is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2
)
