"""Time of each sequence-mixing op against sequence length (batch 1), forward and forward + backward: the SSD scan,
sliding-window attention, SE-Attn's span attention (the windowed variant) and the paper's SE-Attn (selection
included; its block scoring is O(L^2 / S)) should grow linearly, full causal attention quadratically.

Per op and length: the median of 3 timings; the op's FLOP count (benchmarks/flops.py: the matmul FLOPs of the
useful work); the achieved fraction of the fp32 matmul peak measured in this run (the best of the measurements at
the start and at the end of the section); and the time over full attention's at the same length (the peer, same
run). "Within 3x of the FLOP-count time" is a fraction of peak >= 0.33. The exponent is the slope of log(time) on
log(length) over lengths >= 4K (shorter ones are dominated by fixed overheads). SE-Attn's block selection
(select_blocks, no gradient) is timed on its own: it scores every earlier block, so it is quadratic by design.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import median, report, timeit
from benchmarks.flops import FWD_BWD, attention_flops, matmul_gflops, span_keys, ssd_flops, window_keys

H, P, N, CHUNK = 8, 32, 64, 64  # SSM: as the tiny model (8 heads of 32, d_state 64, one group)
AH, AD, W, M, C, TOP_K = 4, 32, 256, 64, 64, 4  # attention: 4 heads of 32; SE-Attn window/block/chunk/top-k
# The paper's SE-Attn (Nunez et al. 2025): query chunks of PM (the larger of {T, 2T} = {128, 256} of make
# repro-sespan), memory blocks of PS = 32, top PK = 8 (Sec. 4.2), per-head selection, selection included.
PM, PS, PK = 256, 32, 8

# An op at length L: make(L, requires_grad) -> (run: () -> output tensor, forward FLOPs or None)
Maker = Callable[[int, bool], tuple[Callable[[], torch.Tensor], float | None]]


def _ssd(L: int, grad: bool):
    from hybridlm.kernels.ssd.torch_ref import ssd_scan_torch

    g = torch.Generator().manual_seed(0)
    x, Bm, Cm = torch.randn(1, L, H, P, generator=g), torch.randn(1, L, 1, N, generator=g), torch.randn(1, L, 1, N,
                                                                                                        generator=g)
    dt, A = torch.rand(1, L, H, generator=g) * 0.1, -torch.linspace(1, 16, H)
    x, dt, Bm, Cm = (t.requires_grad_(grad) for t in (x, dt, Bm, Cm))
    return lambda: ssd_scan_torch(x, dt, A, Bm, Cm, CHUNK)[0], ssd_flops(1, L, H, P, N, 1, CHUNK)


def _qkv(L: int, grad: bool):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, AH, L, AD, generator=g).requires_grad_(grad) for _ in range(3)]


def _swa(L: int, grad: bool):
    from hybridlm.kernels.window_attention.torch_ref import window_attention_torch

    q, k, v = _qkv(L, grad)
    return lambda: window_attention_torch(q, k, v, W), attention_flops(1, AH, AD, window_keys(L, W))


def _selection(L: int):
    from hybridlm.kernels.span_attention.selection import block_summaries, select_blocks

    q, k, v = _qkv(L, False)
    return q, k, v, lambda: select_blocks(q, block_summaries(k, M), L, W, M, C, TOP_K)


def _span(L: int, grad: bool):
    from hybridlm.kernels.span_attention.torch_ref import span_attention_torch

    q, k, v, select = _selection(L)
    selected = select()
    q, k, v = (t.requires_grad_(grad) for t in (q, k, v))
    return (lambda: span_attention_torch(q, k, v, selected, W, M, C),
            attention_flops(1, 1, AD, span_keys(selected, L, W, M, C)))


def _se_paper(L: int, grad: bool):
    from hybridlm.kernels.se_attention.torch_ref import se_attention_torch

    q, k, v = _qkv(L, grad)
    # Useful work: each query sees its chunk causally plus the chunk's retrieved blocks (chunk i has min(k, i*M/S)
    # eligible blocks); the selection's scoring, O(d L^2 / S), is left out of the count.
    keys, n = 0, -(-L // PM)
    for i in range(n):
        rows = min(PM, L - i * PM)
        keys += rows * (rows + 1) // 2 + rows * min(PK, (i * PM) // PS) * PS
    return (lambda: se_attention_torch(q, k, v, chunk_size=PM, block_size=PS, top_k=PK),
            attention_flops(1, AH, AD, keys))


def _select_only(L: int, grad: bool):
    return _selection(L)[3], None


def _full(L: int, grad: bool):
    q, k, v = _qkv(L, grad)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), attention_flops(1, AH, AD,
                                                                                             window_keys(L, None))


FULL = "full attention (SDPA)"
OPS: dict[str, Maker] = {"SSM (ssd_scan)": _ssd, f"SWA W={W}": _swa, f"SE-Attn W={W}+{TOP_K}x{M}": _span,
                         f"SE-Attn (paper) M={PM} S={PS} k={PK}": _se_paper, FULL: _full}
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


def run(lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536), budget_s: float = 4.0) -> dict:
    """A series stops growing once a forward + backward takes longer than budget_s (full attention at 64K would
    take minutes on 2 cores); its exponent is fitted on the lengths it reached."""
    peaks = [matmul_gflops(torch.float32)]
    times: dict[str, dict[int, tuple[float, float]]] = {}
    flops: dict[str, dict[int, float | None]] = {}
    for name, make in {**OPS, SELECTION: _select_only}.items():
        times[name], flops[name] = {}, {}
        for L in lengths:
            fwd, f = _time(make, L, False)
            fb = _time(make, L, True)[0] if name != SELECTION else float("nan")
            times[name][L], flops[name][L] = (fwd, fb), f
            if max(fwd, fb if fb == fb else 0.0) > budget_s:
                break
    peaks.append(matmul_gflops(torch.float32))
    peak = max(peaks)
    rows = []
    for name in times:
        for L, (fwd, fb) in times[name].items():
            row = {"op": name, "length": L, "fwd ms": 1000 * fwd, "fwd+bwd ms": 1000 * fb if fb == fb else "-"}
            f = flops[name][L]
            if f is not None:
                row["fwd+bwd GFLOP"] = FWD_BWD * f / 1e9
                row["GFLOP/s"] = FWD_BWD * f / fb / 1e9
                row["of fp32 peak"] = row["GFLOP/s"] / peak
            if L in times[FULL] and name != FULL and fb == fb:
                row["/ full attention"] = fb / times[FULL][L][1]
            rows.append(row)
    exponents = {name: {"fwd": round(fit_exponent(list(t), [v[0] for v in t.values()]), 2),
                        "fwd+bwd": round(fit_exponent(list(t), [v[1] for v in t.values()]), 2)}
                 for name, t in times.items()}
    report("scaling", "Time vs sequence length (batch 1; fwd: no grad; fwd+bwd: backward of out.sum())", rows,
           ["op", "length", "fwd ms", "fwd+bwd ms", "fwd+bwd GFLOP", "GFLOP/s", "of fp32 peak", "/ full attention"],
           fitted_exponent_4k_up=exponents, fp32_peak_gflops=[round(p, 1) for p in peaks])
    return {"rows": rows, "exponents": exponents, "peak": peak}
