"""Forward time of one sequence-mixing op against sequence length (batch 1): the SSD scan, sliding-window and
span-expanded attention should grow linearly, full causal attention quadratically. The exponent is the slope of
log(time) on log(length), fitted over lengths >= 4K (shorter ones are dominated by fixed overheads)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks.common import median, report, timeit

H, P, N, CHUNK = 8, 32, 64, 64  # SSM: as the tiny model
AH, AD, W, M, C, TOP_K = 4, 32, 256, 64, 64, 4  # attention: 4 heads of 32


def _ssd(L: int):
    from hybridlm.kernels.ssd.torch_ref import ssd_scan_torch

    x, Bm, Cm = torch.randn(1, L, H, P), torch.randn(1, L, 1, N), torch.randn(1, L, 1, N)
    dt, A = torch.rand(1, L, H) * 0.1, -torch.linspace(1, 16, H)
    return lambda: ssd_scan_torch(x, dt, A, Bm, Cm, CHUNK)


def _qkv(L: int):
    return [torch.randn(1, AH, L, AD) for _ in range(3)]


def _swa(L: int):
    from hybridlm.kernels.window_attention.torch_ref import window_attention_torch

    q, k, v = _qkv(L)
    return lambda: window_attention_torch(q, k, v, W)


def _span(L: int):
    from hybridlm.kernels.span_attention.selection import block_summaries, select_blocks
    from hybridlm.kernels.span_attention.torch_ref import span_attention_torch

    q, k, v = _qkv(L)

    def fn():
        sel = select_blocks(q, block_summaries(k, M), L, W, M, C, TOP_K)
        return span_attention_torch(q, k, v, sel, W, M, C)
    return fn


def _full(L: int):
    q, k, v = _qkv(L)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


OPS = {"SSM (ssd_scan)": _ssd, f"SWA W={W}": _swa, f"SE-Attn W={W}+{TOP_K}x{M}": _span, "full attention": _full}


def fit_exponent(lengths: list[int], times: list[float], min_len: int = 4096) -> float:
    pts = [(math.log(n), math.log(t)) for n, t in zip(lengths, times) if n >= min_len]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def run(lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536), budget_s: float = 3.0) -> dict:
    """Median of 3 forwards per point. A series stops growing once a forward takes longer than budget_s (full
    attention at 64K would take minutes on 2 cores); its exponent is fitted on the lengths it reached."""
    table: dict[str, dict[int, float]] = {name: {} for name in OPS}
    with torch.no_grad():
        for name, make in OPS.items():
            for L in lengths:
                t = median(timeit(make(L), 3, warmup=1 if L <= 8192 else 0))
                table[name][L] = t
                if t > budget_s:
                    break
    rows = []
    for L in lengths:
        row = {"length": L}
        for name in OPS:
            row[f"{name} ms"] = 1000 * table[name][L] if L in table[name] else "-"
        rows.append(row)
    exponents = {name: round(fit_exponent(list(t), list(t.values())), 2) for name, t in table.items()}
    report("scaling", "Forward time vs sequence length (batch 1, no grad)", rows,
           ["length"] + [f"{name} ms" for name in OPS], fitted_exponent_time_vs_length=exponents)
    return {"rows": rows, "exponents": exponents}
