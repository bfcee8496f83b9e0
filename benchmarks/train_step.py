"""Model-level training step (forward + backward + AdamW): throughput and peak memory.

Tiny config: hidden 128, 4 Mamba-2 layers, vocab 256, d_state 64, head_dim 32 (8 heads), batch 4 x 512.
Models: hybridlm (torch backend), transformers' Mamba2ForCausalLM (its pure torch path; same dims) and a naive
sequential-scan Mamba-2 (benchmarks/naive_mamba2.py).

The machine is shared and noisy, so:
- throughput: hybridlm and transformers (same chunk size) live in one process and alternate step by step; the
  speed ratio is taken per pair of neighbouring steps, then the median (a load spike hits both sides of a pair);
- peak memory: each (model, chunk) runs a few steps alone in a fresh process (own peak RSS, common.peak_rss_mb, own
  allocator; torch.cuda.max_memory_allocated on a GPU), which also counts the step's FLOPs.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.common import child_main, current_rss_mb, median, peak_rss_mb, report, run_child

VOCAB, D_MODEL, N_LAYER, D_STATE, HEADDIM, BATCH, SEQ = 256, 128, 4, 64, 32, 4, 512


def build(model: str, chunk: int) -> tuple[torch.nn.Module, Callable]:
    """-> (module, forward(ids) -> logits)."""
    torch.manual_seed(0)
    if model == "hybridlm":
        from hybridlm import ops
        from hybridlm.models import HybridLM, ModelConfig, SSMConfig

        ops.configure("torch")
        m = HybridLM(ModelConfig(d_model=D_MODEL, layer_pattern="M" * N_LAYER, vocab_size=VOCAB,
                                 ssm=SSMConfig(d_state=D_STATE, headdim=HEADDIM, chunk_size=chunk)))
        return m, lambda ids: m(ids)[0]
    if model == "transformers":
        from transformers import Mamba2Config, Mamba2ForCausalLM

        logging.getLogger("transformers").setLevel(logging.ERROR)  # "falling back to the torch path" notices
        cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYER, state_size=D_STATE,
                           head_dim=HEADDIM, num_heads=2 * D_MODEL // HEADDIM, n_groups=1, expand=2,
                           chunk_size=chunk, use_cache=False, tie_word_embeddings=True)
        m = Mamba2ForCausalLM(cfg)
        return m, lambda ids: m(input_ids=ids, use_cache=False).logits
    if model == "naive":
        from benchmarks.naive_mamba2 import NaiveMamba2LM

        m = NaiveMamba2LM(VOCAB, D_MODEL, N_LAYER, D_STATE, HEADDIM)
        return m, m
    raise ValueError(model)


def make_step(model: str, chunk: int, seq: int) -> tuple[Callable[[], None], torch.nn.Module]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module, forward = build(model, chunk)
    module.to(dev)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (BATCH, seq + 1), generator=torch.Generator().manual_seed(1)).to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = forward(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return step, module


def _timed(step: Callable[[], None]) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def child(args: dict[str, Any]) -> dict[str, Any]:
    if args["kind"] == "pairs":  # throughput: hybridlm and transformers alternate
        ours, _ = make_step("hybridlm", args["chunk"], SEQ)
        theirs, _ = make_step("transformers", args["chunk"], SEQ)
        ours(), theirs()  # warm up
        pairs = [(_timed(ours), _timed(theirs)) for _ in range(args["pairs"])]
        return {"ours": [a for a, _ in pairs], "theirs": [b for _, b in pairs]}
    # memory (+ FLOPs, + time for the naive model): one model alone in this process
    step, module = make_step(args["model"], args["chunk"], args.get("seq", SEQ))
    rss_before = current_rss_mb()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()  # counts matmul/conv/attention FLOPs of forward + backward (not elementwise ops); not timed
    times = [_timed(step) for _ in range(args["steps"])]
    out = {"peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before, "flops": counter.get_total_flops(),
           "params": sum(p.numel() for p in module.parameters()), "times": times}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run(pairs: int = 8, chunks: tuple[int, ...] = (64, 256), naive_seq: int = 64) -> dict:
    """The naive model runs one step on BATCH x naive_seq tokens: its token loop costs the same per token at any
    length, and a full 4 x 512 step takes minutes."""
    tokens = BATCH * SEQ
    rows, ratios = [], {}
    for chunk in chunks:
        t = run_child("benchmarks.train_step", {"kind": "pairs", "chunk": chunk, "pairs": pairs})
        mem = {m: run_child("benchmarks.train_step", {"kind": "memory", "model": m, "chunk": chunk, "steps": 2})
               for m in ("hybridlm", "transformers")}  # a counted step + 2 more
        for m, key in (("hybridlm", "ours"), ("transformers", "theirs")):
            step_s = median(t[key])
            rows.append({"model": m, "chunk": chunk, "tokens/s": tokens / step_s, "step ms": 1000 * step_s,
                         "peak RSS MB": mem[m]["peak_rss_mb"], "RSS before MB": mem[m]["rss_before_mb"],
                         "peak - before MB": mem[m]["peak_rss_mb"] - mem[m]["rss_before_mb"],
                         "params": mem[m]["params"], "GFLOP/step": mem[m]["flops"] / 1e9, "raw step s": t[key]})
        o, h = mem["hybridlm"], mem["transformers"]
        ratios[f"chunk {chunk}"] = {
            "throughput x (median of per-pair ratios)": round(median([b / a for a, b in zip(t["ours"], t["theirs"])]),
                                                             2),
            "peak RSS ours/theirs": round(o["peak_rss_mb"] / h["peak_rss_mb"], 3),
            "peak RSS above start ours/theirs": round(
                (o["peak_rss_mb"] - o["rss_before_mb"]) / (h["peak_rss_mb"] - h["rss_before_mb"]), 3)}
    naive = run_child("benchmarks.train_step", {"kind": "memory", "model": "naive", "chunk": 0, "steps": 1,
                                                "seq": naive_seq})
    rows.append({"model": f"naive sequential (at {BATCH} x {naive_seq})", "chunk": "-",
                 "tokens/s": BATCH * naive_seq / naive["times"][0], "step ms": 1000 * naive["times"][0],
                 "peak RSS MB": naive["peak_rss_mb"], "RSS before MB": naive["rss_before_mb"],
                 "peak - before MB": naive["peak_rss_mb"] - naive["rss_before_mb"], "params": naive["params"],
                 "GFLOP/step": naive["flops"] / 1e9})
    report("train_step", f"Training step, batch {BATCH} x {SEQ}, fwd+bwd+AdamW (throughput: median over {pairs} "
           "alternating steps in one process; memory: a fresh process per model)", rows,
           ["model", "chunk", "tokens/s", "step ms", "peak RSS MB", "RSS before MB", "peak - before MB", "params",
            "GFLOP/step"], ratios_hybridlm_vs_transformers=ratios)
    return {"rows": rows, "ratios": ratios}


if __name__ == "__main__":
    child_main(child)
