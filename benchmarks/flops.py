"""The machine's measured matmul peak (fp32 and bf16): best of several square matmuls."""
from __future__ import annotations

import time

import torch

from benchmarks.common import report


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def run() -> dict[str, float]:
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    report("matmul_peak", f"Matmul peak ({torch.get_num_threads()} threads, 2048^3, best of 5)",
           [{"dtype": k, "GFLOP/s": v} for k, v in peaks.items()], ["dtype", "GFLOP/s"])
    return peaks
