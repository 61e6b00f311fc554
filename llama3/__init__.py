"""llama3: a small, readable, pure-PyTorch implementation of the Llama 3 family."""

from llama3.config import ModelArgs, RopeScaling

__all__ = ["ModelArgs", "RopeScaling"]
__version__ = "0.1.0"
