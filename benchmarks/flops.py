"""The machine's measured matmul peak (fp32 and bf16), and the FLOP counts the op benchmarks divide by it.

FLOP counts are the matmul FLOPs of the useful work (2 per multiply-add), forward; forward + backward is 3x that
(the backward's gradient products are twice the forward's: dQ, dK, dV and dP for attention, the same pattern for
the scan). Work an implementation adds on top (masked-out scores inside a block, a backward that recomputes the
forward, padding) is not counted, so the fraction of peak says how close the implementation is to the ideal."""
from __future__ import annotations

import time

import torch

from benchmarks.common import report

FWD_BWD = 3  # forward + backward FLOPs over forward FLOPs


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def window_keys(length: int, window: int | None) -> int:
    """Sum over causal queries 0..L-1 of the keys each sees (window None: all earlier ones and itself)."""
    w = length if window is None else min(window, length)
    return w * (w + 1) // 2 + (length - w) * w


def attention_flops(batch: int, heads: int, head_dim: int, keys_seen: int) -> float:
    """Forward: QK^T and PV, 2 * head_dim multiply-adds per (query, visible key) pair and head."""
    return 4.0 * batch * heads * head_dim * keys_seen


def span_keys(selected: torch.Tensor, length: int, window: int, block_size: int, query_chunk: int) -> int:
    """Keys seen, summed over queries and kv heads (selected (b, hkv, n, top_k)), for selections from
    select_blocks (a retrieved block is wholly visible to every query of its chunk); per kv head: window keys
    plus, per chunk, used slots x block_size x queries in the chunk."""
    b, hkv, n, _ = selected.shape
    rows = torch.full((n,), query_chunk)
    rows[-1] = length - (n - 1) * query_chunk
    retrieved = int(((selected >= 0).sum(-1) * rows).sum()) * block_size
    return b * hkv * window_keys(length, window) + retrieved


def ssd_flops(batch: int, length: int, heads: int, headdim: int, d_state: int, groups: int, chunk: int) -> float:
    """Forward of the chunked scan (kernels/ssd/torch_ref.py), per token: C.B^T within the chunk (2 Q N per
    group), the masked (Q x Q) product with dt x (2 Q P per head), the chunk's state contribution and the
    incoming state's output (2 P N each per head). The chunk-to-chunk state pass (2 P N per chunk) is dropped."""
    per_token = groups * 2 * chunk * d_state + heads * (2 * chunk * headdim + 4 * headdim * d_state)
    return float(batch * length * per_token)


def run() -> dict[str, float]:
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    report("matmul_peak", f"Matmul peak ({torch.get_num_threads()} threads, 2048^3, best of 5)",
           [{"dtype": k, "GFLOP/s": v} for k, v in peaks.items()], ["dtype", "GFLOP/s"])
    return peaks
