"""Compile every Triton kernel of the project for real NVIDIA targets, on any machine (no GPU or driver needed),
and check that it would launch: shared memory per block within the architecture's limit, grid within CUDA's
limits and, in full mode, register spills within SPILL_BUDGET.

    python -m hybridlm.kernels.compile_check [--full] [--arch 80 90] [--json rows.json]

How: each case calls a public kernel wrapper (forward, then backward through autograd) on `meta` tensors at a
realistic shape, with Triton's launch replaced by a recorder. So every kernel is compiled with exactly the grid,
BLOCK sizes and num_warps its wrapper chooses (the wrappers take them from functions such as
kernels.ssd.chunk.ssd_blocks and kernels.window_attention.triton.attention_blocks), and with Triton's own
argument specialisation. Each recorded launch is then compiled by Triton's NVIDIA backend for each target:
fast mode stops at PTX (shared memory is fixed by then; Triton checks it only at the first launch, so a kernel
over the limit compiles fine and fails on the GPU); full mode also runs ptxas and reads registers and the
per-thread stack (spills) from `cuobjdump --dump-resource-usage` on the cubin.

Must run in its own process without TRITON_INTERPRET: the interpreter replaces triton.language when triton is
first imported (tests/kernels/test_compile.py starts it as a subprocess).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("hybridlm.kernels.compile_check compiles for real GPUs: run it without TRITON_INTERPRET=1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import ir  # noqa: E402
from triton.backends.compiler import GPUTarget, Language  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from hybridlm.kernels.causal_conv1d.triton_kernel import causal_conv1d_triton  # noqa: E402
from hybridlm.kernels.se_attention.triton_kernel import attend_selected_triton  # noqa: E402
from hybridlm.kernels.span_attention.triton_kernel import span_attention_triton  # noqa: E402
from hybridlm.kernels.ssd.triton_kernel import ssd_scan_triton  # noqa: E402
from hybridlm.kernels.window_attention.triton_kernel import window_attention_triton  # noqa: E402

TRITON_VERSION = "3.9.0"  # the version these internals (launch binder, backend stages) were written against
# Shared memory per block (bytes, opt-in maximum) by compute capability.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 120: 101_376}
SPILL_BUDGET = 1024  # bytes of stack (spilled registers) per thread
GRID_LIMIT = (2**31 - 1, 65535, 65535)
BATCH, SEQ = 2, 2048

# Official Mamba-2 checkpoints (state-spaces/mamba2-*): d_model; all use d_state 128, headdim 64, ngroups 1,
# expand 2, d_conv 4, chunk_size 256.
MAMBA2_OFFICIAL = {"130m": 768, "370m": 1024, "780m": 1536, "1.3b": 2048, "2.7b": 2560}


# ------------------------------------------------------------------------------------------------ cases

@dataclass(frozen=True)
class Case:
    op: str
    shape: str  # what the table shows
    dtype: torch.dtype  # activations (x, q/k/v, conv input); dt, A, D, biases stay fp32 as in the model
    forward: Callable[[], tuple[torch.Tensor, ...]]  # calls the wrapper on meta tensors, returns its outputs


def _meta(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = True) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=grad)


def ssd_case(tag: str, heads: int, headdim: int, d_state: int, ngroups: int, chunk: int, dtype: torch.dtype,
             with_state: bool = False) -> Case:
    def forward():
        x = _meta(BATCH, SEQ, heads, headdim, dtype=dtype)
        B, C = (_meta(BATCH, SEQ, ngroups, d_state, dtype=dtype) for _ in range(2))
        init = _meta(BATCH, heads, headdim, d_state) if with_state else None
        return ssd_scan_triton(x, _meta(BATCH, SEQ, heads), _meta(heads), B, C, chunk, D=_meta(heads),
                               initial_state=init)
    shape = f"{tag}: b{BATCH} L{SEQ} h{heads} p{headdim} n{d_state} g{ngroups} Q{chunk}" + (" +state" * with_state)
    return Case("ssd_scan", shape, dtype, forward)


def conv_case(tag: str, channels: int, width: int, dtype: torch.dtype, with_state: bool = False) -> Case:
    def forward():
        state = _meta(BATCH, width - 1, channels, dtype=dtype) if with_state else None
        return causal_conv1d_triton(_meta(BATCH, SEQ, channels, dtype=dtype), _meta(channels, 1, width),
                                    _meta(channels), state)
    shape = f"{tag}: b{BATCH} L{SEQ} d{channels} k{width}" + (" +state" * with_state)
    return Case("causal_conv1d", shape, dtype, forward)


def attention_case(tag: str, heads: int, kv_heads: int, head_dim: int, window: Optional[int], dtype: torch.dtype,
                   seq: int = 4096) -> Case:
    def forward():
        q = _meta(BATCH, heads, seq, head_dim, dtype=dtype)
        k, v = (_meta(BATCH, kv_heads, seq, head_dim, dtype=dtype) for _ in range(2))
        return (window_attention_triton(q, k, v, window),)
    kind = "full" if window is None else f"W{window}"
    return Case("window_attention", f"{tag}: b{BATCH} L{seq} h{heads}/{kv_heads} d{head_dim} {kind}", dtype, forward)


def span_case(tag: str, heads: int, kv_heads: int, head_dim: int, window: int, block: int, top_k: int,
              query_chunk: int, dtype: torch.dtype, seq: int = 4096) -> Case:
    def forward():
        q = _meta(BATCH, heads, seq, head_dim, dtype=dtype)
        k, v = (_meta(BATCH, kv_heads, seq, head_dim, dtype=dtype) for _ in range(2))
        selected = _meta(BATCH, kv_heads, -(-seq // query_chunk), top_k, dtype=torch.long, grad=False)
        return (span_attention_triton(q, k, v, selected, window, block, query_chunk),)
    shape = f"{tag}: b{BATCH} L{seq} h{heads}/{kv_heads} d{head_dim} W{window} S{block} k{top_k} C{query_chunk}"
    return Case("span_attention", shape, dtype, forward)


def se_case(tag: str, heads: int, kv_heads: int, head_dim: int, chunk: int, block: int, top_k: int,
            dtype: torch.dtype, seq: int = 4096) -> Case:
    """The paper's SE-Attn attention part (the selection is torch): per-head selection of top_k blocks per chunk."""
    def forward():
        q = _meta(BATCH, heads, seq, head_dim, dtype=dtype)
        k, v = (_meta(BATCH, kv_heads, seq, head_dim, dtype=dtype) for _ in range(2))
        selection = _meta(BATCH, heads, -(-seq // chunk), top_k, dtype=torch.long, grad=False)
        return (attend_selected_triton(q, k, v, selection, chunk_size=chunk, block_size=block),)
    shape = f"{tag}: b{BATCH} L{seq} h{heads}/{kv_heads} d{head_dim} M{chunk} S{block} k{top_k}"
    return Case("se_attention", shape, dtype, forward)


def official_cases(dtype: torch.dtype, sizes: list[str]) -> list[Case]:
    out = []
    for size in sizes:
        d_inner = 2 * MAMBA2_OFFICIAL[size]
        out.append(ssd_case(f"mamba2-{size}", d_inner // 64, 64, 128, 1, 256, dtype))
        out.append(conv_case(f"mamba2-{size}", d_inner + 2 * 128, 4, dtype))
    return out


def attention_cases(dtype: torch.dtype, head_dims: list[int], full: bool) -> list[Case]:
    """Grouped-KV attention as in Llama-style models (4 query heads per KV head); SE-Attn at the paper's block size
    S = 32 and top_k = 8, with the project's window and query chunk."""
    out = []
    for d in head_dims:
        heads = 2048 // d
        out.append(attention_case("gqa", heads, heads // 4, d, 512, dtype))
        if full:
            out.append(attention_case("gqa", heads, heads // 4, d, None, dtype))
        out.append(span_case("se-attn-window", heads, heads // 4, d, 128, 32, 8, 64, dtype))
        out.append(se_case("se-attn", heads, heads // 4, d, 2048, 32, 8, dtype))
    return out


def conf_dir() -> Path:
    import hybridlm
    return Path(hybridlm.__file__).resolve().parent.parent / "conf"  # as hybridlm.runner.CONF_DIR


def project_cases(dtype: torch.dtype) -> list[Case]:
    """The layers of every conf/model/*.yaml (with its default attention kind), streaming state included; none
    when the configs are absent (an installed wheel ships no YAML)."""
    from omegaconf import OmegaConf

    from hybridlm.models.config import ModelConfig

    out = []
    for path in sorted((conf_dir() / "model").glob("*.yaml")):
        node = OmegaConf.load(path)
        attn = {}
        for entry in node.pop("defaults", []):
            if "attention" in entry:
                attn = OmegaConf.load(path.parent / "attention" / f"{entry['attention']}.yaml")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"attn": attn}, node))
        s, a, tag = cfg.ssm, cfg.attn, path.stem
        if "M" in cfg.layer_pattern:
            d_inner = s.expand * cfg.d_model
            out.append(ssd_case(tag, d_inner // s.headdim, s.headdim, s.d_state, s.ngroups, s.chunk_size, dtype,
                                with_state=True))
            out.append(conv_case(tag, d_inner + 2 * s.ngroups * s.d_state, s.d_conv, dtype, with_state=True))
        if "A" in cfg.layer_pattern:
            head_dim = a.head_dim or cfg.d_model // a.num_heads
            kv = a.num_heads_kv or a.num_heads
            if a.kind == "se_attn":
                out.append(span_case(tag, a.num_heads, kv, head_dim, a.window, a.block_size, a.top_k,
                                     a.query_chunk, dtype))
            elif a.kind in ("swa", "full"):  # s2 trains through torch's SDPA, not a Triton kernel
                out.append(attention_case(tag, a.num_heads, kv, head_dim, a.window if a.kind == "swa" else None,
                                          dtype))
    return out


def cases(full: bool) -> list[Case]:
    """Fast mode (the default test suite, about a minute on 2 CPU cores): the largest official Mamba-2 head and
    state sizes at the 130m width, attention and SE-Attn at head dim 128, bf16. Full mode: every official
    size, the project's configs, head dims 64 and 128, full and windowed attention, bf16 and fp32."""
    if not full:
        dtype = torch.bfloat16
        return official_cases(dtype, ["130m"]) + attention_cases(dtype, [128], full=False)
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        out += official_cases(dtype, list(MAMBA2_OFFICIAL)) + attention_cases(dtype, [64, 128], full=True)
        out += project_cases(dtype)
    return out


# ------------------------------------------------------------------------------------- record launches

@dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    phase: str  # fwd | bwd


class _Recorder:
    """While active, `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.phase = "fwd"

    def __enter__(self):
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            recorder.launches.append(Launch(fn, args, dict(kwargs), tuple(grid), recorder.phase))
            return None

        self._saved = JITFunction.run
        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._saved


def record(case: Case) -> list[Launch]:
    with _Recorder() as rec:
        outputs = [t for t in case.forward() if t is not None and t.requires_grad]
        rec.phase = "bwd"
        if outputs:
            torch.autograd.backward(outputs, [torch.empty_like(t) for t in outputs])
    return rec.launches


# -------------------------------------------------------------------------------------------- compile

@dataclass
class Compiled:
    shared: Optional[int] = None
    regs: Optional[int] = None
    spill: Optional[int] = None
    error: Optional[str] = None
    seconds: float = 0.0


def _specialize(launch: Launch, target: GPUTarget):
    """Signature, constexprs, attributes and options exactly as JITFunction.run derives them for this target."""
    fn, kwargs = launch.fn, dict(launch.kwargs)
    knobs = triton.knobs
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as the first lines of run()
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return backend, options, signature, constexprs, attrs


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread from cuobjdump, whose STACK counts the spilled registers."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    return int(m.group(1)), int(m.group(2))


def compile_launch(launch: Launch, arch: int, full: bool, cache: dict) -> Compiled:
    """Compile one recorded launch for sm_<arch>, through PTX (fast) or the cubin (full); identical
    specialisations are compiled once."""
    target = GPUTarget("cuda", arch, 32)
    try:
        backend, options, signature, constexprs, attrs = _specialize(launch, target)
    except Exception as e:  # noqa: BLE001 - reported in the table
        return Compiled(error=f"{type(e).__name__}: {e}")
    key = (launch.fn, arch, full, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
           repr(options))
    if key in cache:
        return cache[key]
    t0 = time.perf_counter()
    result = Compiled()
    try:
        # the stages of triton.compile, without its on-disk cache, up to the last one this mode needs
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        metadata = {"target": target, **options.__dict__}
        module = ASTSource(launch.fn, signature, constexprs, attrs).make_ir(
            target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
        stages: dict = {}
        backend.add_stages(stages, options, Language.TRITON)
        last = "cubin" if full else "ptx"
        for ext, stage in stages.items():
            module = stage(module, metadata)
            if ext == last:
                break
        result.shared = metadata["shared"]
        if full:
            result.regs, result.spill = _resource_usage(module)
    except Exception as e:  # noqa: BLE001 - a compile error is a finding, reported in the table
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    result.seconds = time.perf_counter() - t0
    cache[key] = result
    return result


# ---------------------------------------------------------------------------------------------- check

@dataclass
class Row:
    op: str
    kernel: str
    shape: str
    arch: int
    dtype: str
    shared: Optional[int]
    shared_limit: int
    regs: Optional[int]
    spill: Optional[int]
    grid: tuple
    error: Optional[str] = None
    problems: list[str] = field(default_factory=list)


def _problems(row: Row, spill_budget: int) -> list[str]:
    out = []
    if row.error:
        out.append(f"compile error: {row.error}")
    if row.shared is not None and row.shared > row.shared_limit:
        out.append(f"shared memory {row.shared} B > {row.shared_limit} B per block on sm_{row.arch}")
    if row.spill is not None and row.spill > spill_budget:
        out.append(f"spills {row.spill} B/thread > budget {spill_budget} B")
    for axis, (n, limit) in enumerate(zip(row.grid, GRID_LIMIT)):
        if n > limit:
            out.append(f"grid dimension {axis} = {n} > {limit}")
    return out


def check(case_list: list[Case], archs: list[int], full: bool, spill_budget: int = SPILL_BUDGET,
          progress: Callable[[str], None] = lambda s: None) -> list[Row]:
    cache: dict = {}
    rows = []
    for case in case_list:
        seen = set()
        for launch in record(case):
            folder = launch.fn.fn.__module__.split(".")[-2]  # kernels.<op>.<file>: two ops both have _fwd_kernel
            name = f"{folder}.{launch.fn.__name__} ({launch.phase})"
            for arch in archs:
                res = compile_launch(launch, arch, full, cache)
                ident = (launch.fn, arch, id(res))  # the same compiled kernel launched twice in one case: one row
                if ident in seen:
                    continue
                seen.add(ident)
                row = Row(case.op, name, case.shape, arch, str(case.dtype).removeprefix("torch."), res.shared,
                          SHARED_LIMIT[arch], res.regs, res.spill, launch.grid, res.error)
                row.problems = _problems(row, spill_budget)
                rows.append(row)
                progress(f"{name:44s} sm_{arch} {case.shape} {row.dtype}: {res.seconds:.1f} s")
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "shape", "arch", "dtype", "shared B", "% limit", "regs", "spill B", "status")
    lines = [head]
    for r in rows:
        pct = f"{100 * r.shared / r.shared_limit:.0f}%" if r.shared is not None else "-"
        lines.append((r.kernel, r.shape, f"sm_{r.arch}", r.dtype, "-" if r.shared is None else f"{r.shared:,}", pct,
                      "-" if r.regs is None else str(r.regs), "-" if r.spill is None else f"{r.spill:,}",
                      "FAIL: " + "; ".join(r.problems) if r.problems else "ok"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybridlm.kernels.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every shape and dtype; run ptxas for registers and spills")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT),
                   help="compute capabilities to compile for (default: 80 90)")
    p.add_argument("--spill-budget", type=int, default=SPILL_BUDGET, help="bytes per thread (full mode)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("-v", "--verbose", action="store_true", help="print each compile's time to stderr")
    args = p.parse_args(argv)
    if triton.__version__ != TRITON_VERSION:
        print(f"warning: written for triton {TRITON_VERSION}, running {triton.__version__}", file=sys.stderr)
    t0 = time.perf_counter()
    progress = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else (lambda s: None)
    rows = check(cases(args.full), args.arch, args.full, args.spill_budget, progress)
    print(format_table(rows))
    failed = [r for r in rows if r.problems]
    mode = "full (ptxas)" if args.full else "fast (PTX: shared memory only)"
    print(f"\n{len(rows)} kernel builds, {mode}, {time.perf_counter() - t0:.0f} s: "
          + (f"{len(failed)} FAILED" if failed else "all fit"))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
