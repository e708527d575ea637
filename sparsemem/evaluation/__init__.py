"""Evaluation of a KOFF run: perplexity per setting and domain, memory-swap matrix, multiple choice."""
