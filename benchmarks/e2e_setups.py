"""The end-to-end decode setups of ``bench_decode.py``, by the key of their row in its JSON,
how a row's tokens/s is read, and the plans of ``bench_first_token.py``.  Their own module so
that ``summary.py``, which reads the committed JSON only, shares them without importing
torch."""

from __future__ import annotations

# key: (the label of bench_decode's tables, the shorter one of the README summary)
SETUPS = {"dense": ("DynamicCache + SDPA, eager", "DynamicCache + SDPA, eager"),
          "dense_static": ("StaticCache + SDPA, CUDA graph", "StaticCache + SDPA, graph"),
          "dense_flex": ("StaticCache + flex_attention, CUDA graph",
                         "StaticCache + flex_attention, graph"),
          "moaplan_full": ("MoaplanCache + all-full plan", "moaplan, all-full plan, graph"),
          "moaplan": ("MoaplanCache + mixed plan", "moaplan, mixed plan, graph")}

# bench_first_token's plans: key: label.
FIRST_TOKEN_PLANS = {"mixed": "mixed (density constant in N)",
                     "moa_kv": "MoA-like, per-KV-head rules",
                     "moa_q": "MoA-like, per-query-head spans"}


# A row's graph-replay rates: the decode step as the model runs it, and with its decoder
# layers compiled by torch.compile (moaplan.runtime.compiled.compiled_layers).
GRAPH_RATES = ("graph_tokens_per_s", "compiled_graph_tokens_per_s")


def best_rate(row: dict) -> float:
    """Tokens/s of the faster graph replay where measured, else from the host clock."""
    graphs = [row[key] for key in GRAPH_RATES if key in row]
    return max(graphs) if graphs else row["tokens_per_s"]


# Time to first token, by how the model ran: key of its times in a report.
FIRST_TOKEN_RUNS = {"eager": "ttft_s", "compiled": "ttft_compiled_s"}


def fastest_first_token_run(e2e: dict, side: str, length: str) -> str | None:
    """How ``side`` (``"dense"`` or a plan's key) reached its faster time to first token at
    ``length``: ``"eager"`` (the model as it runs) or ``"compiled"`` (its decoder layers
    compiled), of those measured; None where neither was."""
    times = {run: e2e.get(key, {}).get(side, {}).get(length)
             for run, key in FIRST_TOKEN_RUNS.items()}
    times = {run: t for run, t in times.items() if isinstance(t, float)}
    return min(times, key=times.get) if times else None


def fastest_first_token(e2e: dict, side: str, length: str) -> float | None:
    """``side``'s time to first token at ``length``: the faster of
    :func:`fastest_first_token_run`."""
    run = fastest_first_token_run(e2e, side, length)
    return None if run is None else e2e[FIRST_TOKEN_RUNS[run]][side][length]
