"""Triton kernels for llama3, one op per file, each beside its PyTorch reference.

Importing this package has no side effects and does not import Triton (transformers probes for a
top-level module named `kernels`); each kernel module imports Triton itself.
"""
