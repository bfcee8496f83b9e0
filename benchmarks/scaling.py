"""Time of each sequence-mixing op against sequence length (batch 1), forward and forward + backward: the SSD scan,
sliding-window attention, SE-Attn's span attention (the windowed variant) and the paper's SE-Attn (selection
included; its block scoring is O(L^2 / S)) should grow linearly, full causal attention quadratically.

Per op and length: the median of 3 timings; the op's FLOP count (benchmarks/flops.py: the matmul FLOPs of the
useful work); the achieved fraction of the fp32 matmul peak measured right after the op's timings (`adjacent
peak`: on a shared machine the peak moves by 1.5x within minutes, so one peak for the whole section would make
the fraction follow the load rather than the op); and the time over full attention's of the same shape at the
same length (the peer, same run).

Two shapes: the tiny models' (SSM 8 heads of 32, d_state 64, chunk 64; attention 4 heads of 32), and the
published models' (SSM as the official Mamba-2 130m: 24 heads of 64, d_state 128, chunk 256; attention 8 heads of
64 with 2 kv heads). "Within 3x of the FLOP-count time" is a fraction of peak >= 0.33. The exponent is the slope
of log(time) on log(length) over lengths >= 4K (shorter ones are dominated by fixed overheads). SE-Attn's block
selection (select_blocks, no gradient) is timed on its own: it scores every earlier block, quadratic by design.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import median, report, timeit
from benchmarks.flops import FWD_BWD, attention_flops, matmul_gflops, span_keys, ssd_flops, window_keys


@dataclass(frozen=True)
class Shape:
    label: str
    heads: int  # SSM heads
    headdim: int
    d_state: int
    chunk: int
    attn_heads: int
    kv_heads: int
    attn_dim: int


TINY = Shape("tiny", 8, 32, 64, 64, 4, 4, 32)  # as the tiny models
OFFICIAL = Shape("130m", 24, 64, 128, 256, 8, 2, 64)  # the official Mamba-2 130m SSM; attention of 64-dim GQA heads
W, M, C, TOP_K = 256, 64, 64, 4  # SE-Attn window/block/chunk/top-k
# The paper's SE-Attn (Nunez et al. 2025): query chunks of PM (the larger of {T, 2T} = {128, 256} of make
# repro-sespan), memory blocks of PS = 32, top PK = 8 (Sec. 4.2), per-head selection, selection included.
PM, PS, PK = 256, 32, 8

# An op at length L: make(L, requires_grad) -> (run: () -> output tensor, forward FLOPs or None)
Maker = Callable[[int, bool], tuple[Callable[[], torch.Tensor], float | None]]


def _ssd(sh: Shape) -> Maker:
    def make(L: int, grad: bool):
        from hybridlm.kernels.ssd.torch_ref import ssd_scan_torch

        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, L, sh.heads, sh.headdim, generator=g)
        Bm, Cm = (torch.randn(1, L, 1, sh.d_state, generator=g) for _ in range(2))
        dt, A = torch.rand(1, L, sh.heads, generator=g) * 0.1, -torch.linspace(1, 16, sh.heads)
        x, dt, Bm, Cm = (t.requires_grad_(grad) for t in (x, dt, Bm, Cm))
        return (lambda: ssd_scan_torch(x, dt, A, Bm, Cm, sh.chunk)[0],
                ssd_flops(1, L, sh.heads, sh.headdim, sh.d_state, 1, sh.chunk))
    return make


def _qkv(sh: Shape, L: int, grad: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, sh.attn_heads, L, sh.attn_dim, generator=g)
    k, v = (torch.randn(1, sh.kv_heads, L, sh.attn_dim, generator=g) for _ in range(2))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _swa(sh: Shape) -> Maker:
    def make(L: int, grad: bool):
        from hybridlm.kernels.window_attention.torch_ref import window_attention_torch

        q, k, v = _qkv(sh, L, grad)
        return (lambda: window_attention_torch(q, k, v, W),
                attention_flops(1, sh.attn_heads, sh.attn_dim, window_keys(L, W)))
    return make


def _selection(sh: Shape, L: int):
    from hybridlm.kernels.span_attention.selection import block_summaries, select_blocks

    q, k, v = _qkv(sh, L, False)
    return q, k, v, lambda: select_blocks(q, block_summaries(k, M), L, W, M, C, TOP_K)


def _span(sh: Shape) -> Maker:
    def make(L: int, grad: bool):
        from hybridlm.kernels.span_attention.torch_ref import span_attention_torch

        q, k, v, select = _selection(sh, L)
        selected = select()
        q, k, v = (t.requires_grad_(grad) for t in (q, k, v))
        # span_keys counts per kv head; each of the h / hkv query heads of a kv head does that work
        return (lambda: span_attention_torch(q, k, v, selected, W, M, C),
                attention_flops(1, sh.attn_heads // sh.kv_heads, sh.attn_dim, span_keys(selected, L, W, M, C)))
    return make


def _se_paper(sh: Shape) -> Maker:
    def make(L: int, grad: bool):
        from hybridlm.kernels.se_attention.torch_ref import se_attention_torch

        q, k, v = _qkv(sh, L, grad)
        # Useful work: each query sees its chunk causally plus the chunk's retrieved blocks (chunk i has
        # min(k, i*M/S) eligible blocks); the selection's scoring, O(d L^2 / S), is left out of the count.
        keys, n = 0, -(-L // PM)
        for i in range(n):
            rows = min(PM, L - i * PM)
            keys += rows * (rows + 1) // 2 + rows * min(PK, (i * PM) // PS) * PS
        return (lambda: se_attention_torch(q, k, v, chunk_size=PM, block_size=PS, top_k=PK),
                attention_flops(1, sh.attn_heads, sh.attn_dim, keys))
    return make


def _select_only(L: int, grad: bool):
    return _selection(TINY, L)[3], None


def _full(sh: Shape) -> Maker:
    def make(L: int, grad: bool):
        q, k, v = _qkv(sh, L, grad)
        gqa = sh.kv_heads != sh.attn_heads
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
                attention_flops(1, sh.attn_heads, sh.attn_dim, window_keys(L, None)))
    return make


def _series(sh: Shape) -> dict[str, Maker]:
    """The ops of one shape; the last entry is the shape's full attention, the peer of the others."""
    attn = f"{sh.attn_heads}x{sh.attn_dim}" + (f", {sh.kv_heads} kv" if sh.kv_heads != sh.attn_heads else "")
    ops = {f"SSM (ssd_scan) {sh.heads}x{sh.headdim}, N {sh.d_state}, chunk {sh.chunk}": _ssd(sh),
           f"SWA W={W}, {attn}": _swa(sh)}
    if sh == TINY:  # the windowed span op of the tiny model config; the paper's op at both shapes
        ops[f"SE-Attn W={W}+{TOP_K}x{M}, {attn}"] = _span(sh)
    ops[f"SE-Attn (paper) M={PM} S={PS} k={PK}, {attn}"] = _se_paper(sh)
    ops[f"full attention (SDPA), {attn}"] = _full(sh)
    return ops


SELECTION = f"SE-Attn selection (select_blocks, C={C})"


def fit_exponent(lengths: list[int], times: list[float], min_len: int = 4096) -> float:
    pts = [(math.log(n), math.log(t)) for n, t in zip(lengths, times) if n >= min_len]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def _time(make: Maker, L: int, backward: bool) -> tuple[float, float | None]:
    run, flops = make(L, backward)

    def step():
        out = run()
        if backward:
            out.sum().backward()
    warmup = 1 if L <= 8192 else 0
    if backward:
        return median(timeit(step, 3, warmup)), flops
    with torch.no_grad():
        return median(timeit(step, 3, warmup)), flops


def run(lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536), budget_s: float = 4.0,
        shapes: tuple[Shape, ...] = (TINY, OFFICIAL)) -> dict:
    """A series stops growing once a forward + backward takes longer than budget_s (full attention at 64K would
    take minutes on 2 cores); its exponent is fitted on the lengths it reached."""
    series: dict[str, tuple[Maker, str]] = {}  # name -> (maker, its peer's name)
    for sh in shapes:
        ops = _series(sh)
        peer = list(ops)[-1]
        series.update({name: (make, peer) for name, make in ops.items()})
    series[SELECTION] = (_select_only, "")
    times: dict[str, dict[int, tuple[float, float]]] = {}
    rows = []
    for name, (make, _) in series.items():
        times[name] = {}
        for L in lengths:
            fwd, f = _time(make, L, False)
            fb = _time(make, L, True)[0] if name != SELECTION else float("nan")
            times[name][L] = (fwd, fb)
            row = {"op": name, "length": L, "fwd ms": 1000 * fwd, "fwd+bwd ms": 1000 * fb if fb == fb else "-"}
            if f is not None:
                peak = matmul_gflops(torch.float32, repeats=3)  # adjacent: the load the op just ran under
                row.update({"fwd+bwd GFLOP": FWD_BWD * f / 1e9, "GFLOP/s": FWD_BWD * f / fb / 1e9,
                            "adjacent peak": peak, "of fp32 peak": FWD_BWD * f / fb / 1e9 / peak})
            rows.append(row)
            if max(fwd, fb if fb == fb else 0.0) > budget_s:
                break
    for row in rows:
        peer = series[row["op"]][1]
        if peer and peer != row["op"] and row["length"] in times[peer] and row["fwd+bwd ms"] != "-":
            row["/ full attention"] = row["fwd+bwd ms"] / 1000 / times[peer][row["length"]][1]
    exponents = {name: {"fwd": round(fit_exponent(list(t), [v[0] for v in t.values()]), 2),
                        "fwd+bwd": round(fit_exponent(list(t), [v[1] for v in t.values()]), 2)}
                 for name, t in times.items()}
    peaks = [r["adjacent peak"] for r in rows if "adjacent peak" in r]
    report("scaling", "Time vs sequence length (batch 1; fwd: no grad; fwd+bwd: backward of out.sum())", rows,
           ["op", "length", "fwd ms", "fwd+bwd ms", "fwd+bwd GFLOP", "GFLOP/s", "adjacent peak", "of fp32 peak",
            "/ full attention"], fitted_exponent_4k_up=exponents,
           fp32_peak_gflops_min_median_max=[round(min(peaks), 1), round(median(peaks), 1), round(max(peaks), 1)])
    return {"rows": rows, "exponents": exponents}
