"""One prepared GPU check: `python -m hybridlm.gpu_check [--out gpu_check.json] [--budget 480] [--cpu]`.

Sections, each with a share of the time budget (a section past its share stops and says how much it left out):
  small  every backend against a naive fp64 reference written here (explicit masks, token-by-token scan) at small
         shapes, fp64 (torch only) / fp32 / bf16, outputs and the gradients of every input. Runs on CPU too.
  ops    every backend against the torch backend run in fp64 on the same (rounded) inputs, at real shapes: Mamba-2
         130m and 2.7b (headdim 64, d_state 128, chunk 256, ngroups 1), attention head dim 64 / 128 with grouped KV,
         windows 256 / 1024, SE-Attn with blocks of S = 32 and top k = 8. GPU only.
  train  three fwd+bwd+AdamW steps of a small MMAM hybrid per backend: losses finite and equal across backends.
  bench  ms per fwd+bwd (CUDA events, warmup, median) per backend, beside mamba_ssm's mamba_chunk_scan_combined,
         SDPA's flash backend and flash_attn where importable. GPU only.
Errors are max|got - ref| / max|ref| over outputs and input gradients. fp32 on GPU: the torch backend runs with
TF32 matmuls off (torch.set_float32_matmul_precision("highest")); Triton compiles fp32 tl.dot to TF32 on sm_80+
(unless TRITON_F32_DEFAULT=ieee), so triton and mamba_ssm (Triton kernels) get the "tf32" tolerance there.
Only the public ops API and the model classes are used, so the check does not depend on where kernels live.
Exit code 0 when no check failed (skipped sections and declined backends are not failures), 1 otherwise.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm import ops
from hybridlm.models.config import AttentionConfig, ModelConfig, SSMConfig
from hybridlm.models.hybrid_lm import HybridLM
from hybridlm.ops.config import BackendConfig

BACKENDS = ("torch", "triton", "mamba_ssm")
# Normalized max error allowed per precision; "tf32" is fp32 through TF32 tensor-core products (10-bit mantissa).
TOL = {"fp64": 1e-9, "fp32": 3e-4, "tf32": 1e-2, "bf16": 5e-2}
TRAIN_TOL = {"fp32": 2e-3, "bf16-mixed": 2e-2}  # |loss - torch backend's loss| per step
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}
SHARE = {"small": 0.15, "ops": 0.4, "train": 0.15, "bench": 0.3}  # of --budget seconds
CONFIG_FIELD = {"ssd_scan": "ssd", "causal_conv1d": "conv", "window_attention": "window_attn",
                "span_attention": "span_attn"}
IN_NAMES = {"ssd_scan": "x dt A B C D init", "causal_conv1d": "x weight bias state", "window_attention": "q k v",
            "span_attention": "q k v"}
OUT_NAMES = {"ssd_scan": "y final", "causal_conv1d": "y state", "window_attention": "o", "span_attention": "o"}

SMALL = [
    ("ssd_scan", dict(b=2, L=70, h=4, p=16, n=16, g=2, Q=16)),
    ("causal_conv1d", dict(b=2, L=37, d=24, k=4)),
    ("window_attention", dict(b=2, h=4, kv=2, Lq=50, Lk=50, d=16, W=8)),
    ("window_attention", dict(b=2, h=4, kv=2, Lq=20, Lk=50, d=16, W=None)),
    ("span_attention", dict(b=2, h=4, kv=2, Lq=60, Lk=60, d=16, W=8, M=4, k=2, C=8)),
    ("span_attention", dict(b=1, h=4, kv=1, Lq=24, Lk=64, d=16, W=8, M=4, k=3, C=8)),
]
REAL = [
    ("ssd_scan", dict(b=2, L=2048, h=24, p=64, n=128, g=1, Q=256)),  # Mamba-2 130m (d_model 768)
    ("ssd_scan", dict(b=1, L=4096, h=80, p=64, n=128, g=1, Q=256)),  # Mamba-2 2.7b (d_model 2560)
    ("causal_conv1d", dict(b=2, L=2048, d=1792, k=4)),  # 130m: conv over x, B, C = 1536 + 2 * 128 channels
    ("causal_conv1d", dict(b=1, L=4096, d=5376, k=4)),  # 2.7b
    ("window_attention", dict(b=2, h=16, kv=4, Lq=4096, Lk=4096, d=64, W=256)),
    ("window_attention", dict(b=1, h=32, kv=8, Lq=4096, Lk=4096, d=128, W=1024)),
    ("window_attention", dict(b=1, h=32, kv=8, Lq=2048, Lk=2048, d=128, W=None)),
    ("window_attention", dict(b=1, h=16, kv=4, Lq=1024, Lk=4096, d=64, W=1024)),  # a chunk after a key cache
    ("span_attention", dict(b=2, h=16, kv=4, Lq=4096, Lk=4096, d=64, W=256, M=32, k=8, C=64)),
    ("span_attention", dict(b=1, h=32, kv=8, Lq=4096, Lk=4096, d=128, W=1024, M=32, k=8, C=64)),
]


def label(s: dict) -> str:
    return " ".join(f"{k}{v}" for k, v in s.items())


# ---------------------------------------------------------------- inputs, the op calls, the naive references
def make_inputs(op: str, s: dict, dtype: torch.dtype, device: torch.device, seed: int) -> list[Tensor]:
    """Random inputs made on CPU from a seeded generator (the same for every backend), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32  # A, D, states stay fp32 as in the model

    def rn(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    if op == "ssd_scan":
        b, L, h, p, n, gr = (s[k] for k in "b L h p n g".split())
        dt = torch.exp(torch.rand(b, L, h, generator=g) * math.log(100.0) + math.log(1e-3))  # 1e-3 .. 1e-1
        A = -(1.0 + 15.0 * torch.rand(h, generator=g))  # -exp(A_log), A_init_range (1, 16)
        ts = [rn(b, L, h, p), dt.to(dtype), A.to(pdt), rn(b, L, gr, n), rn(b, L, gr, n), rn(h, dt=pdt),
              rn(b, h, p, n, dt=pdt, scale=0.1)]
    elif op == "causal_conv1d":
        b, L, d, k = s["b"], s["L"], s["d"], s["k"]
        ts = [rn(b, L, d), rn(d, 1, k, scale=0.5), rn(d), rn(b, k - 1, d)]
    else:
        b, h, kv, Lq, Lk, d = (s[k] for k in "b h kv Lq Lk d".split())
        ts = [rn(b, h, Lq, d), rn(b, kv, Lk, d), rn(b, kv, Lk, d)]
        if op == "span_attention":
            ts.append(random_selection(s, g))
    return [t.to(device) for t in ts]


def random_selection(s: dict, g: torch.Generator) -> Tensor:
    """(b, kv, ceil(Lq/C), k) distinct random blocks per query chunk among the blocks that end before the window of
    the chunk's first query (the rule the op's callers obey), ascending, -1 for empty slots."""
    n_chunks, nb = -(-s["Lq"] // s["C"]), s["Lk"] // s["M"]
    first = torch.arange(n_chunks) * s["C"] + s["Lk"] - s["Lq"]  # key index of each chunk's first query
    cand = torch.arange(nb)[None, :] < torch.div(first - s["W"] + 1, s["M"], rounding_mode="floor")[:, None]
    scores = torch.rand(s["b"], s["kv"], n_chunks, nb, generator=g).masked_fill(~cand, -1.0)
    top = scores.topk(min(s["k"], nb), dim=-1)
    idx = torch.where(top.values >= 0, top.indices, nb).sort(dim=-1).values
    idx = torch.where(idx == nb, -1, idx)
    return F.pad(idx, (0, s["k"] - idx.shape[-1]), value=-1)


def call_op(op: str, s: dict, t: list[Tensor]) -> tuple[Tensor, ...]:
    if op == "ssd_scan":
        return tuple(ops.ssd_scan(*t[:5], s["Q"], D=t[5], initial_state=t[6]))
    if op == "causal_conv1d":
        return tuple(ops.causal_conv1d(*t))
    if op == "window_attention":
        return (ops.window_attention(*t, window=s["W"]),)
    return (ops.span_attention(*t, s["W"], s["M"], s["C"]),)


def naive_op(op: str, s: dict, t: list[Tensor]) -> tuple[Tensor, ...]:
    """Straight from the definitions, independent of every backend."""
    if op == "ssd_scan":  # h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t
        x, dt, A, B, C, D, state = t
        Bh, Ch = (u.repeat_interleave(x.shape[2] // B.shape[2], dim=2) for u in (B, C))
        ys = []
        for i in range(x.shape[1]):
            write = (dt[:, i, :, None] * x[:, i])[..., None] * Bh[:, i, :, None, :]
            state = torch.exp(dt[:, i] * A)[..., None, None] * state + write
            ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, i]))
        return torch.stack(ys, dim=1) + x * D[:, None], state
    if op == "causal_conv1d":  # a depthwise F.conv1d over [state, x]
        x, w, bias, state = t
        xs = torch.cat([state, x], dim=1)
        y = F.conv1d(xs.transpose(1, 2), w, bias, groups=x.shape[-1]).transpose(1, 2)
        return y, xs[:, xs.shape[1] - (w.shape[-1] - 1):]
    q, k, v = t[:3]
    (h, Lq), (kv, Lk) = q.shape[1:3], k.shape[1:3]
    tq = torch.arange(Lk - Lq, Lk, device=q.device)[:, None]  # key index of each query
    j = torch.arange(Lk, device=q.device)[None, :]
    allowed = (j <= tq) & ((j > tq - s["W"]) if s["W"] is not None else True)
    if op == "span_attention":  # plus the keys of the chunk's selected blocks that lie before the window
        sel = t[3][:, :, torch.arange(Lq, device=q.device) // s["C"], None, :]  # (b, kv, Lq, 1, k)
        hit = (((j // s["M"])[..., None] == sel) & (sel >= 0)).any(-1)  # (b, kv, Lq, Lk)
        allowed = allowed | (hit & (j <= tq - s["W"]))
    allowed = allowed.repeat_interleave(h // kv, dim=1) if allowed.dim() == 4 else allowed
    logits = q @ k.repeat_interleave(h // kv, dim=1).transpose(-1, -2) * q.shape[-1] ** -0.5
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return (p @ v.repeat_interleave(h // kv, dim=1),)


def forward(op: str, s: dict, args: list[Tensor], impl: Callable = call_op) -> tuple[list[Tensor], tuple]:
    leaves = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
    return leaves, impl(op, s, leaves)


def backward(leaves: list[Tensor], outs: tuple, cots: list[Tensor]) -> list[Optional[Tensor]]:
    need = [t for t in leaves if t.requires_grad]
    return list(torch.autograd.grad(outs, need, [c.to(o.dtype) for c, o in zip(cots, outs)], allow_unused=True))


# ---------------------------------------------------------------- comparison
def compare(got: Optional[Tensor], ref: Optional[Tensor], tol: float) -> tuple[bool, float]:
    """(ok, max|got - ref| / max|ref|); a missing tensor, a shape mismatch or a non-finite value fails (err inf)."""
    if got is None or ref is None:
        return got is None and ref is None, 0.0 if got is None and ref is None else math.inf
    if got.shape != ref.shape or not torch.isfinite(got).all():
        return False, math.inf
    if got.numel() == 0:
        return True, 0.0
    g, r = got.detach().double(), ref.detach().double()
    scale = r.abs().max().item()
    err = (g - r).abs().max().item() / (scale if scale > 0 else 1.0)
    return err <= tol, err


def compare_all(names: list[str], gots: list, refs: list, tol: float) -> tuple[bool, float, str, dict]:
    errs = {n: compare(g, r, tol) for n, g, r in zip(names, gots, refs, strict=True)}
    worst = max(errs, key=lambda n: errs[n][1])
    return all(ok for ok, _ in errs.values()), errs[worst][1], worst, {n: e for n, (_, e) in errs.items()}


# ---------------------------------------------------------------- bookkeeping
class Section:
    def __init__(self, name: str, seconds: float):
        self.name, self.seconds, self.end = name, seconds, time.monotonic() + seconds
        self.rows: list[dict] = []
        self.note: Optional[str] = None
        self._skipped: set = set()

    def over(self, left: int) -> bool:
        if time.monotonic() <= self.end:
            return False
        self.note = f"past its {self.seconds:.0f} s share of the budget, {left} item(s) not run"
        return True

    def add(self, op, backend, shape, dtype, status, note="", **extra) -> None:
        self.rows.append(dict(section=self.name, op=op, backend=backend, shape=shape, dtype=dtype, status=status,
                              note=note, **extra))

    def skip_backend(self, op: str, backend: str, reason: str) -> None:
        if (op, backend) not in self._skipped:  # one row per (op, backend), not per case
            self._skipped.add((op, backend))
            self.add(op, backend, "-", "-", "skipped", reason)


def use(op: str, backend: str) -> Optional[str]:
    """Make `backend` run `op`; None, or why it cannot."""
    try:
        ops.configure(BackendConfig(name="torch", **{CONFIG_FIELD[op]: backend}))
    except (ops.BackendUnavailableError, ValueError) as e:
        return str(e)
    return None if ops.active(op) == backend else f"configure left {ops.active(op)} active"


def declined_now(op: str, backend: str, before: set, outs: tuple, torch_outs: Optional[list]) -> Optional[str]:
    """Why `backend` handed this call to torch, or None if it ran it. The registry logs each (op, backend, reason)
    once, so a reason seen before shows only as an output bit-identical to the torch backend's."""
    new = sorted(r for o, b, r in ops.declined() - before if (o, b) == (op, backend))
    if new:
        return new[0]
    old = sorted(r for o, b, r in before if (o, b) == (op, backend))
    if old and torch_outs is not None and all(torch.equal(a, b) for a, b in zip(outs, torch_outs)):
        return old[0] + " (logged before; output bit-identical to the torch backend's)"
    return None


def error_note(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- sections
def check_ops(sec: Section, ctx: dict, cases: list, dtypes: tuple, reference: str) -> None:
    """Every backend on every case against `reference` ("naive": naive_op in fp64; "torch64": the torch backend in
    fp64), on the same inputs rounded to each dtype."""
    dev = ctx["device"]
    work = [(i, op, s, dt) for i, (op, s) in enumerate(cases) for dt in dtypes]
    for w, (i, op, s, dname) in enumerate(work):
        if sec.over(len(work) - w):
            return
        shape, names = label(s), OUT_NAMES[op].split() + ["d" + n for n in IN_NAMES[op].split()]
        args = make_inputs(op, s, DTYPES[dname], dev, seed=i)
        try:
            if reference == "torch64" and use(op, "torch"):
                raise RuntimeError("the torch backend cannot be configured")
            args64 = [a.double() if a.is_floating_point() else a for a in args]
            leaves, ref_outs = forward(op, s, args64, naive_op if reference == "naive" else call_op)
            g = torch.Generator().manual_seed(1000 + i)  # upstream gradients, rounded to the case's dtype
            cots = [torch.randn(o.shape, generator=g).to(DTYPES[dname]).to(dev) for o in ref_outs]
            refs = [o.detach() for o in ref_outs] + backward(leaves, ref_outs, cots)
            del leaves, ref_outs
        except Exception as e:
            sec.add(op, f"reference ({reference})", shape, dname, "error", error_note(e))
            continue
        torch_outs = None
        for backend in ctx["backends"]:
            if dname == "fp64" and backend != "torch":
                continue
            reason = use(op, backend)
            if reason:
                sec.skip_backend(op, backend, reason)
                continue
            tname = "tf32" if dname == "fp32" and backend != "torch" and ctx["tf32"] else dname
            before = ops.declined()
            try:
                leaves, outs = forward(op, s, args)
                gots = [o.detach() for o in outs] + backward(leaves, outs, cots)
            except Exception as e:
                sec.add(op, backend, shape, dname, "error", error_note(e))
                free(dev)
                continue
            fell = declined_now(op, backend, before, outs, torch_outs)
            if backend == "torch":
                torch_outs = [o.detach() for o in outs]
            ok, err, worst, errs = compare_all(names, gots, refs, TOL[tname])
            status = "FAIL" if not ok else ("declined" if fell else "ok")
            ctx["declines"][(op, shape, dname, backend)] = fell
            sec.add(op, backend, shape, dname, status, fell or (f"worst {worst}" if not ok else ""), err=err,
                    tol=f"{tname} {TOL[tname]:g}", errs=errs)
            del leaves, outs, gots
        del args, refs, cots, torch_outs
        free(dev)


def train_losses(cfg: ModelConfig, dev: torch.device, prec: str, b: int, L: int, steps: int = 3) -> list[float]:
    torch.manual_seed(0)  # same initial weights for every backend
    model = HybridLM(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    tokens = torch.randint(0, cfg.vocab_size, (b, L + 1), generator=torch.Generator().manual_seed(1)).to(dev)
    losses = []
    for _ in range(steps):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16-mixed"):
            logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def section_train(sec: Section, ctx: dict) -> None:
    dev, gpu = ctx["device"], ctx["device"].type == "cuda"
    d, hd, ds, q, nh, W, M, k, C, b, L = ((512, 64, 128, 256, 8, 256, 32, 8, 64, 2, 2048) if gpu else
                                          (64, 16, 16, 32, 4, 32, 8, 2, 16, 2, 128))
    precs = ("bf16-mixed", "fp32") if gpu else ("fp32",)
    work = [(kind, prec) for kind in ("swa", "se_attn") for prec in precs]
    for w, (kind, prec) in enumerate(work):
        if sec.over(len(work) - w):
            return
        cfg = ModelConfig(d_model=d, layer_pattern="MMAM", vocab_size=257,
                          ssm=SSMConfig(d_state=ds, headdim=hd, chunk_size=q),
                          attn=AttentionConfig(kind=kind, num_heads=nh, num_heads_kv=nh // 4, window=W, block_size=M,
                                               top_k=k, query_chunk=C))
        op, shape, ref = f"HybridLM MMAM {kind}", f"d{d} b{b} L{L}", None
        for backend in ctx["backends"]:
            try:
                ops.configure(backend)
                before = ops.declined()
                losses = train_losses(cfg, dev, prec, b, L)
            except ops.BackendUnavailableError as e:
                sec.add(op, backend, shape, prec, "skipped", str(e))
                continue
            except Exception as e:
                sec.add(op, backend, shape, prec, "error", error_note(e))
                free(dev)
                continue
            fell = sorted({f"{o}: {r}" for o, bk, r in ops.declined() - before if bk == backend})
            ref = losses if backend == "torch" else ref
            diff = max(abs(x - y) for x, y in zip(losses, ref)) if ref is not None and ref is not losses else math.nan
            ok = all(math.isfinite(x) for x in losses) and (math.isnan(diff) or diff <= TRAIN_TOL[prec])
            sec.add(op, backend, shape, prec, "ok" if ok else "FAIL",
                    "; ".join(["declined " + f for f in fell]), losses=losses, diff=diff, tol=TRAIN_TOL[prec])
            free(dev)


def cuda_ms(step: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median over `reps` of the CUDA-event time of one step, after `warmup` steps (compilation, autotuning)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd_step(fn: Callable[[list], tuple], args: list[Tensor]) -> Callable[[], object]:
    leaves = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
    need = [t for t in leaves if t.requires_grad]
    cots = [torch.randn_like(o) for o in fn(leaves)]
    return lambda: torch.autograd.grad(fn(leaves), need, cots, allow_unused=True)


def baselines(op: str, s: dict, dev: torch.device) -> list[tuple[str, Optional[Callable], list, str]]:
    """(name, fn, args, why not) of the reference implementations timed beside our op."""
    bf = dict(device=dev, dtype=torch.bfloat16)
    if op == "ssd_scan":
        try:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        except Exception as e:
            return [("mamba_chunk_scan_combined", None, [], f"not importable: {error_note(e)}")]
        args = make_inputs(op, s, torch.bfloat16, dev, seed=0)
        return [("mamba_chunk_scan_combined", lambda t: tuple(mamba_chunk_scan_combined(
            *t[:5], s["Q"], D=t[5], initial_states=t[6], return_final_states=True)), args, "")]
    if op == "causal_conv1d":
        return []  # causal_conv1d_fn is the mamba_ssm backend of the op, timed above when importable
    out = []
    b, h, kv, Lq, Lk, d = (s[k] for k in "b h kv Lq Lk d".split())
    if Lq == Lk:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(t):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return (F.scaled_dot_product_attention(*t, is_causal=True),)
        out.append(("sdpa-flash (full causal, kv expanded)", sdpa, [torch.randn(b, h, Lq, d, **bf) for _ in "qkv"], ""))
    try:
        from flash_attn import flash_attn_func
    except Exception as e:
        return out + [("flash_attn", None, [], f"not importable: {error_note(e)}")]
    win = (s["W"] - 1, 0) if s["W"] is not None else (-1, -1)
    name = "flash_attn (window only)" if op == "span_attention" else "flash_attn"
    args = [torch.randn(b, Lq, h, d, **bf), torch.randn(b, Lk, kv, d, **bf), torch.randn(b, Lk, kv, d, **bf)]
    return out + [(name, lambda t: (flash_attn_func(*t, causal=True, window_size=win),), args, "")]


def section_bench(sec: Section, ctx: dict) -> None:
    dev = ctx["device"]
    for w, (op, s) in enumerate(REAL):
        if sec.over(len(REAL) - w):
            return
        shape, args = label(s), make_inputs(op, s, torch.bfloat16, dev, seed=w)
        runs = []
        for backend in ctx["backends"]:
            reason = use(op, backend)
            if reason:
                sec.skip_backend(op, backend, reason)
            else:
                runs.append((backend, lambda t, op=op, s=s: call_op(op, s, t), args, ""))
        for name, fn, bargs, why in runs + baselines(op, s, dev):
            if fn is None:
                sec.skip_backend(op, name, why)
                continue
            if name in BACKENDS:
                use(op, name)
            before = ops.declined()
            try:
                ms = cuda_ms(fwd_bwd_step(fn, bargs))
            except Exception as e:
                sec.add(op, name, shape, "bf16", "error", error_note(e))
                free(dev)
                continue
            fell = [r for o, b, r in ops.declined() - before if (o, b) == (op, name)]
            fell = fell[0] if fell else ctx["declines"].get((op, shape, "bf16", name))
            sec.add(op, name, shape, "bf16", "fallback" if fell else "ms", f"ran torch: {fell}" if fell else "", ms=ms)
            free(dev)
        del args
        free(dev)


# ---------------------------------------------------------------- report
def result_text(r: dict) -> str:
    if "ms" in r:
        return f"{r['ms']:.3f} ms" + (" (declined, torch ran)" if r["status"] == "fallback" else "")
    if "err" in r:
        return f"{r['status']} err {r['err']:.1e} (tol {r['tol']})" + (f": {r['note']}" if r["note"] else "")
    if "losses" in r:
        d = "" if math.isnan(r["diff"]) else f", max |diff| vs torch {r['diff']:.1e} (tol {r['tol']:g})"
        return f"{r['status']} loss " + " -> ".join(f"{x:.4f}" for x in r["losses"]) + d
    return f"{r['status']}: {r['note']}"


def print_table(rows: list[dict]) -> None:
    cols = ("section", "op", "backend", "shape", "dtype", "result")
    cells = [cols] + [tuple(str(r[c]) for c in cols[:-1]) + (result_text(r)[:160],) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols) - 1)]
    for c in cells:
        print("  ".join(f"{v:<{w}}" for v, w in zip(c, widths)) + "  " + c[-1])


def env_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    for pkg in ("triton", "mamba_ssm", "causal_conv1d", "flash_attn"):
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = None
    return info


def write_report(report: dict, path: str) -> int:
    """Write the JSON report; returns the number of failed checks (status FAIL or error)."""
    report["failed"] = sum(r["status"] in ("FAIL", "error") for s in report["sections"].values() for r in s["rows"])
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    return report["failed"]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="JSON report path")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all sections together")
    p.add_argument("--cpu", action="store_true", help="run on CPU even where a GPU is present")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--sections", nargs="+", default=list(SHARE), choices=list(SHARE))
    a = p.parse_args(argv)
    notes = []
    for var in [v for v in os.environ if v.startswith("HYBRIDLM_BACKEND_")]:  # they would override configure()
        notes.append(f"ignored {var}={os.environ.pop(var)}")
    gpu = torch.cuda.is_available() and not a.cpu
    dev = torch.device("cuda" if gpu else "cpu")
    torch.set_float32_matmul_precision("highest")  # the torch backend's fp32 matmuls without TF32
    ctx = {"device": dev, "backends": ["torch"] + [b for b in a.backends if b != "torch"], "declines": {},
           "tf32": gpu and torch.cuda.get_device_capability(dev) >= (8, 0)
           and os.environ.get("TRITON_F32_DEFAULT", "") != "ieee"}
    no_gpu = "--cpu given" if a.cpu else "no CUDA GPU (torch.cuda.is_available() is False)"
    runners = {"small": lambda s: check_ops(s, ctx, SMALL, ("fp64", "fp32", "bf16"), "naive"),
               "ops": lambda s: check_ops(s, ctx, REAL, ("fp32", "bf16"), "torch64"),
               "train": lambda s: section_train(s, ctx), "bench": lambda s: section_bench(s, ctx)}
    report = {"env": env_info(dev), "notes": notes, "tolerances": {"ops": TOL, "train": TRAIN_TOL},
              "fp32_products_tf32": ctx["tf32"], "sections": {}}
    for name in SHARE:
        if name not in a.sections:
            report["sections"][name] = {"status": "skipped", "reason": "not in --sections", "rows": []}
            continue
        if name in ("ops", "bench") and not gpu:
            report["sections"][name] = {"status": "skipped", "reason": no_gpu, "rows": []}
            continue
        sec = Section(name, SHARE[name] * a.budget)
        t0 = time.monotonic()
        try:
            runners[name](sec)
        except Exception as e:  # a bug or a dead CUDA context: the section ends, the report is still written
            sec.add("-", "-", "-", "-", "error", error_note(e))
        report["sections"][name] = {"status": "stopped early" if sec.note else "ran", "reason": sec.note,
                                    "seconds": round(time.monotonic() - t0, 1), "rows": sec.rows}
        write_report(report, a.out)  # after every section, so a run killed later still leaves its results
        print(f"[gpu_check] {name}: {report['sections'][name]['status']} in {report['sections'][name]['seconds']} s",
              file=sys.stderr, flush=True)
    ops.configure()  # leave the registry as a fresh process would have it
    rows = []
    for name, s in report["sections"].items():
        rows += s["rows"] or [dict(section=name, op="-", backend="-", shape="-", dtype="-", status=s["status"],
                                   note=s["reason"])]
        if s["rows"] and s["reason"]:
            rows.append(dict(section=name, op="-", backend="-", shape="-", dtype="-", status=s["status"],
                             note=s["reason"]))
    print_table(rows)
    failed = write_report(report, a.out)
    print(f"{failed} check(s) failed; report written to {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
