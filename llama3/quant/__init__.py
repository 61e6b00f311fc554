"""Quantized weights: int8 / int4 weight-only layers (`weight_only`) and llama.cpp's GGML block formats (`ggml`)."""
