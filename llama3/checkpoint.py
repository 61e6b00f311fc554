"""Deprecated: `llama3.checkpoint` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.checks`,
`llama3.weights.build`,
`llama3.weights.hub`,
`llama3.weights.meta`,
`llama3.weights.safetensors`,
`llama3.weights.save`.
"""

import warnings

from llama3.checks import CheckpointError  # noqa: F401
from llama3.weights.build import (  # noqa: F401
    QUANT_METHOD,
    SUPPORTED_DTYPES,
    build_model,
    gguf_file,
    load_model,
    open_checkpoint,
    stored_quantization,
)
from llama3.weights.hub import HF_ALLOW_PATTERNS, default_device, default_model, parse_device, resolve  # noqa: F401
from llama3.weights.meta import permute_meta_to_hf  # noqa: F401
from llama3.weights.safetensors import HFTensors, check_finite  # noqa: F401
from llama3.weights.save import (  # noqa: F401
    SIDE_FILES,
    atomic_write,
    check_output,
    copy_files,
    save_quantized,
    save_safetensors,
    write_text,
)

warnings.warn(
    "llama3.checkpoint is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2
)
