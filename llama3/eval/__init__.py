"""Evaluation: perplexity by the strided sliding window (`perplexity`), lm-evaluation-harness's LM interface
(`harness`, the eval extra), and speed over a llama-bench grid (`bench`, `bench_systems`, `bench_report`,
`bench_random`)."""
