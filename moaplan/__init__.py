"""moaplan: per-head sparse attention plans for Hugging Face causal LMs."""

__version__ = "0.1.0"
