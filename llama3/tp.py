"""Deprecated: `llama3.tp` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.parallel.tp`.
"""

import warnings

from llama3.parallel.tp import (  # noqa: F401
    T,
    TensorParallel,
    TensorParallelError,
    VocabParallelEmbedding,
    local_device,
    rank,
    rank0_input,
    rank0_value,
    run_on_rank0,
    shutdown,
)

warnings.warn("llama3.tp is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2)
