"""Op-level times at the tiny training config (batch 4 x 512): the SSD scan (hybridlm's torch op, transformers'
torch reference, the token-by-token loop) and attention (full causal, sliding window, span-expanded), with each
op's FLOP count (benchmarks/flops.py) and the fraction of the fp32 matmul peak its forward + backward reaches,
against the peak measured right after the op's timings (the load moves the peak by 1.5x within minutes here)."""
from __future__ import annotations

import logging

import torch

from benchmarks.common import median, report, timeit
from benchmarks.flops import FWD_BWD, attention_flops, matmul_gflops, span_keys, ssd_flops, window_keys

B, L, H, P, N = 4, 512, 8, 32, 64  # SSD: 8 heads of 32, d_state 64, one group
AH, AD, W, M, C, TOP_K = 4, 32, 128, 32, 64, 4  # attention: 4 heads of 32; SE-Attn window/block/chunk/top-k


def _ssd_inputs(requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, H, P, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(B, L, H, generator=g) - 3)
    A = -torch.linspace(1, 16, H)
    Bm, Cm = torch.randn(B, L, 1, N, generator=g), torch.randn(B, L, 1, N, generator=g)
    D = torch.ones(H)
    return [t.requires_grad_(requires_grad) for t in (x, dt, A, Bm, Cm, D)]


def _time(fn, args, backward: bool, repeats: int) -> float:
    """Median seconds of fn(*args) (forward only, no grad) or of forward + backward of a squared-sum loss."""
    def run():
        out = fn(*args)
        if backward:
            out.square().sum().backward()
    if not backward:
        with torch.no_grad():
            return median(timeit(run, repeats))
    return median(timeit(run, repeats))


def _of_peak(row: dict) -> dict:
    """Adds the fp32 matmul peak measured now (adjacent to the row's timings) and the fraction of it reached."""
    row["adjacent peak"] = matmul_gflops(torch.float32, repeats=3)
    row["of fp32 peak"] = FWD_BWD * row["GFLOP"] / (row["fwd+bwd ms"] / 1000) / row["adjacent peak"]
    return row


def ssd_rows(repeats: int) -> list[dict]:
    from transformers.models.mamba2 import modeling_mamba2

    from hybridlm.kernels.ssd.naive import ssd_scan_naive
    from hybridlm.kernels.ssd.torch_ref import ssd_scan_torch

    logging.getLogger("transformers").setLevel(logging.ERROR)
    def ours(x, dt, A, Bm, Cm, D, chunk):
        return ssd_scan_torch(x, dt, A, Bm, Cm, chunk, D=D)[0]

    def theirs(x, dt, A, Bm, Cm, D, chunk):  # dt is already softplus'd; dt_softplus=False keeps the same math
        return modeling_mamba2.mamba2_chunk_scan(x, dt, A, Bm, Cm, chunk_size=chunk, D=D)

    rows = []
    for chunk in (64, 256):
        for name, fn in (("hybridlm ssd_scan_torch", ours), ("transformers mamba2_chunk_scan", theirs)):
            row = {"op": "ssd", "impl": name, "chunk": chunk, "GFLOP": ssd_flops(B, L, H, P, N, 1, chunk) / 1e9}
            for bwd in (False, True):
                row["fwd+bwd ms" if bwd else "fwd ms"] = 1000 * _time(fn, _ssd_inputs(bwd) + [chunk], bwd, repeats)
            rows.append(_of_peak(row))
    row = {"op": "ssd", "impl": "token-by-token loop (kernels/ssd/naive.py)", "chunk": "-"}
    row["fwd ms"] = 1000 * _time(lambda *a: ssd_scan_naive(*a)[0], _ssd_inputs(False), False, 1)
    rows.append(row)
    return rows


def attention_rows(repeats: int) -> list[dict]:
    import torch.nn.functional as F

    from hybridlm.kernels.span_attention.selection import block_summaries, select_blocks
    from hybridlm.kernels.span_attention.torch_ref import span_attention_torch
    from hybridlm.kernels.window_attention.torch_ref import window_attention_torch

    def inputs(requires_grad):
        g = torch.Generator().manual_seed(1)
        return [torch.randn(B, AH, L, AD, generator=g).requires_grad_(requires_grad) for _ in range(3)]

    def span(q, k, v):
        sel = select_blocks(q, block_summaries(k, M), L, W, M, C, TOP_K)
        return span_attention_torch(q, k, v, sel, W, M, C)

    q, k, _ = inputs(False)
    selected = select_blocks(q, block_summaries(k, M), L, W, M, C, TOP_K)
    impls = {  # name: (fn, forward FLOPs)
        "full causal (SDPA)": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               attention_flops(B, AH, AD, window_keys(L, None))),
        f"sliding window W={W}": (lambda q, k, v: window_attention_torch(q, k, v, W),
                                  attention_flops(B, AH, AD, window_keys(L, W))),
        f"SE-Attn W={W} + {TOP_K}x{M} (incl. selection)": (span, attention_flops(1, 1, AD,
                                                                                   span_keys(selected, L, W, M, C))),
    }
    rows = []
    for name, (fn, flops) in impls.items():
        row = {"op": "attention", "impl": name, "chunk": "-", "GFLOP": flops / 1e9}
        for bwd in (False, True):
            row["fwd+bwd ms" if bwd else "fwd ms"] = 1000 * _time(fn, inputs(bwd), bwd, repeats)
        rows.append(_of_peak(row))
    return rows


def run(repeats: int = 5) -> list[dict]:
    rows = ssd_rows(repeats) + attention_rows(repeats)
    report("ops", f"Op-level times, batch {B} x {L} (median of {repeats}; GFLOP: forward, useful work)", rows,
           ["op", "impl", "chunk", "fwd ms", "fwd+bwd ms", "GFLOP", "adjacent peak", "of fp32 peak"])
    return rows
