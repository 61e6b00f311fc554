"""Evaluation: perplexity by the strided sliding window (`perplexity`)."""
