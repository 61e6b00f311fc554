"""Deprecated: `llama3.finetune` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.train.finetune`, `llama3.train.data`.
"""

import warnings

from llama3.train.data import (  # noqa: F401
    BUCKET_BATCHES,
    IGNORE,
    DataError,
    Example,
    collate,
    encode_example,
    length_grouped_batches,
    prepare,
    read_chat_rows,
    role_is_assistant,
)
from llama3.train.finetune import (  # noqa: F401
    CHECKPOINT,
    MERGED,
    TRAIN_LOG,
    DivergedError,
    TrainConfig,
    cosine_with_warmup,
    enable_gradient_checkpointing,
    evaluate,
    finetune,
    load_for_training,
    token_loss_sum,
)

warnings.warn(
    "llama3.finetune is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2
)
