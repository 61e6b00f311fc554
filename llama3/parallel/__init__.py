"""Tensor parallelism over torch.distributed (`tp`): each rank builds an ordinary Transformer with its share."""
