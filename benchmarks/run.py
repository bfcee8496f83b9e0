"""`make bench`: every benchmark section, each printing a markdown table and appending a JSON record (with the
machine: cpu model, cores, torch version, load average) to benchmarks/results.jsonl.

    python -m benchmarks.run                      # everything (~20 min on 2 idle cores; ~45 min on a busy machine)
    python -m benchmarks.run --sections train ops
    python -m benchmarks.run --quick              # fewer rounds/lengths/steps, a smoke run (~6 min)

Sections: peak (matmul peak), train (hybridlm vs transformers training step), modes (eager/compiled x fp32/bf16
training steps, benchmarks/train_modes.py), ops (op times at the training config), scaling (op time vs length,
FLOP fraction and exponent), streaming (memory of a 1M-token stream), omp (OpenMP's wait policy against the ops,
benchmarks/omp_policy.py).

Timings on a shared machine are noisy: sections report medians, and the headline ratios (hybridlm vs
transformers) are computed within each round before taking the median.
"""
from __future__ import annotations

import argparse
import json

from benchmarks import flops, omp_policy, ops_bench, scaling, streaming, train_modes, train_step
from benchmarks.common import machine_info, report, setup_threads

SECTIONS = ("peak", "train", "modes", "ops", "scaling", "streaming", "omp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    setup_threads()
    print("## hybridlm benchmarks\n")
    print("machine: " + json.dumps(machine_info()))
    peaks = flops.run() if {"peak", "train"} & set(args.sections) else None
    if "train" in args.sections:
        result = train_step.run(pairs=3 if args.quick else 6, chunks=(64,) if args.quick else (64, 256))
        rows = []
        for r in result["rows"]:
            achieved = r["GFLOP/step"] / (r["step ms"] / 1000)
            rows.append({"model": r["model"], "chunk": r["chunk"], "counted GFLOP/step": r["GFLOP/step"],
                         "achieved GFLOP/s": achieved, "of fp32 peak": achieved / peaks["fp32"]})
        report("train_flops", "Achieved FLOP/s of the training step (matmul/conv FLOPs counted by "
               "torch.utils.flop_counter on one step; elementwise ops not counted)", rows,
               ["model", "chunk", "counted GFLOP/step", "achieved GFLOP/s", "of fp32 peak"],
               fp32_peak_gflops=round(peaks["fp32"], 1))
    if "modes" in args.sections:
        train_modes.run(lengthgen_steps=60 if args.quick else 300, tiny_steps=6 if args.quick else 12)
    if "ops" in args.sections:
        ops_bench.run(repeats=3)
    if "scaling" in args.sections:
        scaling.run(lengths=(1024, 4096, 16384) if args.quick else (1024, 2048, 4096, 8192, 16384, 32768, 65536))
    if "streaming" in args.sections:
        streaming.run(lengths=(16_384, 131_072) if args.quick else (16_384, 131_072, 1_048_576))
    if "omp" in args.sections:
        omp_policy.run(pairs=2 if args.quick else 4, length=4096 if args.quick else 16384)


if __name__ == "__main__":
    main()
