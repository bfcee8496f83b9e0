"""Streaming evaluation memory against sequence length: a two-layer hybrid (one Mamba-2 layer, one
sliding-window attention layer; small so that 1M tokens take a minute or two on 2 cores) reads one sequence in
chunks with the recurrent state passed along (hybridlm.eval.streaming.prefill), so its peak memory should stay
flat from 16K to 1M tokens. Each length runs in a fresh subprocess (own peak RSS)."""
from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.common import child_main, current_rss_mb, peak_rss_mb, report, run_child

CHUNK_LEN = 4096


def child(args: dict[str, Any]) -> dict[str, Any]:
    from hybridlm import ops
    from hybridlm.eval.streaming import prefill
    from hybridlm.models import AttentionConfig, HybridLM, ModelConfig, SSMConfig

    ops.configure("torch")
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(d_model=128, layer_pattern="MA", vocab_size=256,
                                 ssm=SSMConfig(d_state=64, headdim=32, chunk_size=64),
                                 attn=AttentionConfig(kind="swa", num_heads=4, window=512))).eval()
    ids = torch.randint(0, 256, (1, args["length"]))
    rss_before = current_rss_mb()
    t = time.perf_counter()
    prefill(model, ids, CHUNK_LEN)
    elapsed = time.perf_counter() - t
    return {"peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before, "seconds": elapsed}


def run(lengths: tuple[int, ...] = (16_384, 131_072, 1_048_576)) -> list[dict]:
    rows = []
    for length in lengths:
        r = run_child("benchmarks.streaming", {"length": length})
        rows.append({"tokens": length, "peak RSS MB": r["peak_rss_mb"], "RSS before MB": r["rss_before_mb"],
                     "peak - before MB": r["peak_rss_mb"] - r["rss_before_mb"], "seconds": r["seconds"],
                     "tokens/s": length / r["seconds"]})
    report("streaming", f"Streaming evaluation (MA hybrid, SWA 512, chunks of {CHUNK_LEN}, one process per length)",
           rows, ["tokens", "peak RSS MB", "RSS before MB", "peak - before MB", "seconds", "tokens/s"])
    return rows


if __name__ == "__main__":
    child_main(child)
