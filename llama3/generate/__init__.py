"""Generation: the sampling settings (`params`) and sampler (`sampling`), the decode step (`step`: eager,
compiled or a CUDA graph, captured by `graphs`, which the server's engine uses too), the `Llama` object
(`llama`), speculative decoding (`speculative`) and the text stream that holds back stop strings (`stream`).
"""
