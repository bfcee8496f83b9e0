"""Model-level training step (forward + backward + AdamW) throughput and peak memory.

Tiny config: hidden 128, 4 Mamba-2 layers, vocab 256, d_state 64, head_dim 32 (8 heads), batch 4 x 512.
Models: hybridlm (torch backend), transformers' Mamba2ForCausalLM (its pure torch path; same dims) and a naive
sequential-scan Mamba-2 (benchmarks/naive_mamba2.py). Each (model, chunk size) runs in a fresh subprocess, so its
peak RSS (resource.getrusage) is its own; rounds alternate the configs so a load change on the shared machine
hits all of them, and hybridlm/transformers ratios are taken within each round, then the median.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import child_main, current_rss_mb, median, peak_rss_mb, report, run_child

VOCAB, D_MODEL, N_LAYER, D_STATE, HEADDIM, BATCH, SEQ = 256, 128, 4, 64, 32, 4, 512


def build(model: str, chunk: int) -> tuple[torch.nn.Module, Any]:
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


def child(args: dict[str, Any]) -> dict[str, Any]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module, forward = build(args["model"], args["chunk"])
    module.to(dev)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, args.get("seq", SEQ) + 1), generator=g).to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = forward(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rss_before = current_rss_mb()
    flops = None
    if args.get("count_flops"):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()  # counts matmul/conv/attention FLOPs of forward + backward (elementwise ops are not counted)
        flops = counter.get_total_flops()
    times = []
    for i in range(args["warmup"] + args["steps"]):
        t = time.perf_counter()
        step()
        if i >= args["warmup"]:
            times.append(time.perf_counter() - t)
    out = {"step_s": median(times), "times": times, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before,
           "params": sum(p.numel() for p in module.parameters()), "flops": flops}
    if dev.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run(rounds: int = 3, steps: int = 3, chunks: tuple[int, ...] = (64, 256), naive_seq: int = 128) -> dict:
    """The naive model runs once, on BATCH x naive_seq tokens: its token loop costs the same per token at any
    length, and a full 4 x 512 step takes minutes."""
    configs = [(m, c) for c in chunks for m in ("hybridlm", "transformers")]
    per_round: dict[tuple[str, int], list[dict]] = {cfg: [] for cfg in configs}
    for r in range(rounds):
        for model, chunk in configs:
            per_round[(model, chunk)].append(run_child("benchmarks.train_step", {
                "model": model, "chunk": chunk, "warmup": 1, "steps": steps, "count_flops": r == 0}))
    naive = run_child("benchmarks.train_step", {"model": "naive", "chunk": 0, "warmup": 0, "steps": 1,
                                                "seq": naive_seq})
    tokens = BATCH * SEQ
    rows = []
    for (model, chunk), results in per_round.items():
        rows.append({
            "model": model, "chunk": chunk,
            "tokens/s": median([tokens / r["step_s"] for r in results]),
            "step ms": 1000 * median([r["step_s"] for r in results]),
            "peak RSS MB": max(r["peak_rss_mb"] for r in results),
            "RSS before MB": results[0]["rss_before_mb"],
            "params": results[0]["params"],
            "GFLOP/step": results[0]["flops"] / 1e9,
        })
    rows.append({"model": f"naive sequential (at {BATCH} x {naive_seq})", "chunk": "-",
                 "tokens/s": BATCH * naive_seq / naive["step_s"],
                 "step ms": 1000 * naive["step_s"], "peak RSS MB": naive["peak_rss_mb"],
                 "RSS before MB": naive["rss_before_mb"], "params": naive["params"], "GFLOP/step": ""})
    ratios = {}
    for chunk in chunks:
        ours, theirs = per_round[("hybridlm", chunk)], per_round[("transformers", chunk)]
        ratios[f"chunk {chunk}"] = {
            "throughput x": round(median([t["step_s"] / o["step_s"] for o, t in zip(ours, theirs)]), 2),
            "peak RSS ours/theirs": round(max(o["peak_rss_mb"] for o in ours) / max(t["peak_rss_mb"] for t in theirs),
                                          3),
            "peak RSS above start ours/theirs": round(
                median([(o["peak_rss_mb"] - o["rss_before_mb"]) / (t["peak_rss_mb"] - t["rss_before_mb"])
                        for o, t in zip(ours, theirs)]), 3)}
    best = max(rows[:-1], key=lambda r: r["tokens/s"])
    report("train_step", f"Training step, batch {BATCH} x {SEQ}, fwd+bwd+AdamW (median of {rounds} rounds x "
           f"{steps} steps; one fresh process per run)", rows,
           ["model", "chunk", "tokens/s", "step ms", "peak RSS MB", "RSS before MB", "params", "GFLOP/step"],
           ratios_hybridlm_vs_transformers=ratios,
           raw={f"{m}/{c}": [r["times"] for r in rs] for (m, c), rs in per_round.items()})
    return {"rows": rows, "ratios": ratios, "best": best}


if __name__ == "__main__":
    child_main(child)
