"""Deprecated: `llama3.finetune` moved into the layered packages in llama3 0.2; this alias goes in 0.3.

Import from the new module(s) instead:
`llama3.train.finetune`.
"""

import warnings

from llama3.train.finetune import (  # noqa: F401
    BUCKET_BATCHES,
    CHECKPOINT,
    IGNORE,
    MERGED,
    TRAIN_LOG,
    DataError,
    DivergedError,
    Example,
    TrainConfig,
    collate,
    cosine_with_warmup,
    enable_gradient_checkpointing,
    encode_example,
    evaluate,
    finetune,
    length_grouped_batches,
    load_for_training,
    prepare,
    read_chat_rows,
    role_is_assistant,
    token_loss_sum,
)

warnings.warn(
    "llama3.finetune is deprecated: import from the modules this alias names", DeprecationWarning, stacklevel=2
)
