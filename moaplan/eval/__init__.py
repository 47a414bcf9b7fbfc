"""Long-context evaluation tasks: passkey and key-value retrieval, perplexity on held-out text."""

from moaplan.eval.perplexity import PerplexityResult, perplexity
from moaplan.eval.retrieval import (
    RetrievalResult,
    kv_accuracy,
    passkey_accuracy,
    retrieval_accuracy,
)

__all__ = ["PerplexityResult", "RetrievalResult", "kv_accuracy", "passkey_accuracy", "perplexity",
           "retrieval_accuracy"]
