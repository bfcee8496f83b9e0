"""Backend registry: each op (ssd_scan, causal_conv1d, ...) has several implementations ("backends").

A backend declares
- `name` and `priority` (higher wins under `auto`),
- `available()`: None when it can run on this machine, else the reason it cannot,
- `verify(*args, **kwargs)`: None when it accepts this particular call, else the reason it declines
  (dtype, device, shape); a decline falls through to the next backend of the chain and is logged once
  per (op, backend, reason),
- `load()`: returns the implementation, importing its module only then, so e.g. triton is never imported
  unless a triton backend runs (TRITON_INTERPRET must be set before that import).
Each op's folder in hybridlm.kernels (e.g. kernels/ssd/__init__.py) registers its own backends.

`configure()` resolves, once, a chain per op (chosen backend, then torch as the last resort), imports the
chosen functions and stores the chains in a plain dict; a call is a dict read plus the verifiers, so
torch.compile traces straight through it. Call `configure()` at start, before compiling: an op called with
nothing configured resolves `auto` on its first call, which inside a compiled region costs one graph break.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from hybridlm.ops.config import BackendConfig

log = logging.getLogger(__name__)

BACKEND_NAMES = ("torch", "triton", "mamba_ssm")
# Under `auto` the highest-priority backend that can run wins.
PRIORITY = {"torch": 0, "triton": 10, "mamba_ssm": 20}
# Per-op environment overrides: HYBRIDLM_BACKEND_<suffix>=torch|triton|mamba_ssm.
ENV_SUFFIX = {"ssd_scan": "SSD", "causal_conv1d": "CONV", "window_attention": "WINDOW_ATTN",
              "span_attention": "SPAN_ATTN", "se_attention": "SE_ATTN"}
# BackendConfig field holding each op's override.
CONFIG_FIELD = {"ssd_scan": "ssd", "causal_conv1d": "conv", "window_attention": "window_attn",
                "span_attention": "span_attn", "se_attention": "se_attn"}

Reason = Optional[str]


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here; the message says why."""


@dataclass
class Backend:
    op: str
    name: str
    priority: int
    load: Callable[[], Callable]  # returns the implementation; imports its module only when called
    available: Callable[[], Reason] = lambda: None
    verify: Optional[Callable[..., Reason]] = None
    # Reason to skip the backend under `auto` although it can run (e.g. the Triton CPU interpreter: correct
    # but orders of magnitude slower than torch, so only used when asked for by name).
    auto_skip: Callable[[], Reason] = lambda: None
    _fn: Optional[Callable] = field(default=None, repr=False)

    @property
    def fn(self) -> Callable:
        if self._fn is None:
            self.import_fn()
        return self._fn

    def import_fn(self) -> None:
        self._fn = self.load()


_BACKENDS: dict[str, dict[str, Backend]] = {}
_CHAINS: dict[str, tuple[Backend, ...]] = {}  # op -> backends to try, in order; filled by configure()
_DECLINED: set[tuple[str, str, str]] = set()
_NOTES: dict[str, str] = {}  # op -> why the chain is what it is (shown by describe())


def register(backend: Backend) -> None:
    _BACKENDS.setdefault(backend.op, {})[backend.name] = backend
    _CHAINS.clear()  # a new backend changes what `auto` picks


def _requested(cfg: BackendConfig) -> dict[str, tuple[str, str]]:
    """op -> (requested backend name, where the request comes from): env var > per-op config field > cfg.name."""
    out = {}
    for op in _BACKENDS:
        env_var = f"HYBRIDLM_BACKEND_{ENV_SUFFIX.get(op, op.upper())}"
        field_name = CONFIG_FIELD.get(op, "")
        if os.environ.get(env_var):
            out[op] = (os.environ[env_var].strip(), f"{env_var}={os.environ[env_var].strip()}")
        elif getattr(cfg, field_name, None):
            out[op] = (getattr(cfg, field_name).strip(), f"backend.{field_name}={getattr(cfg, field_name)}")
        else:
            out[op] = (cfg.name.strip(), f"backend.name={cfg.name}")
    return out


def configure(cfg: Union[BackendConfig, str, None] = None) -> dict[str, tuple[str, ...]]:
    """Resolve the backend chain of every op. `cfg` is a BackendConfig or just its `name`.

    auto: per op, the highest-priority backend that is available (and not skipped under auto).
    A named backend: used for every op that has it (torch for the others); raises
    BackendUnavailableError, with the reason, if it cannot run here. Returns op -> chain names.
    """
    if cfg is None:
        cfg = BackendConfig()
    elif isinstance(cfg, str):
        cfg = BackendConfig(name=cfg)
    chains: dict[str, tuple[Backend, ...]] = {}
    notes: dict[str, str] = {}
    for op, (want, source) in _requested(cfg).items():
        impls = _BACKENDS[op]
        torch_impl = impls["torch"]
        if want == "auto":
            chosen, skipped = torch_impl, []
            for b in sorted(impls.values(), key=lambda b: -b.priority):
                reason = b.available() or b.auto_skip()
                if reason is None:
                    chosen = b
                    break
                skipped.append(f"{b.name}: {reason}")
            notes[op] = source + (f"; skipped {'; '.join(skipped)}" if skipped else "")
        elif want not in BACKEND_NAMES:
            raise ValueError(f"{source}: unknown backend {want!r} for op {op}; choose auto or one of {BACKEND_NAMES}")
        elif want not in impls:
            if not source.startswith("backend.name"):  # a per-op request must name a backend of that op
                raise BackendUnavailableError(f"{source}: op {op} has no {want!r} backend; it has {sorted(impls)}")
            chosen = torch_impl
            notes[op] = f"{source}; this op has no {want} backend"
        else:
            chosen = impls[want]
            reason = chosen.available()
            if reason is not None:
                raise BackendUnavailableError(f"{source}: backend {want!r} for op {op} cannot run here: {reason}")
            notes[op] = source
        chains[op] = (chosen,) if chosen is torch_impl else (chosen, torch_impl)
        for b in chains[op]:
            b.import_fn()  # now, not inside a call that torch.compile may be tracing
    _CHAINS.clear()
    _CHAINS.update(chains)
    _NOTES.clear()
    _NOTES.update(notes)
    # DEBUG: a run's entry point shows the table once (hybridlm.runner.configure_backends); configure() also runs
    # lazily, and repeatedly in tests and gpu_check.
    log.debug("op backends:\n%s", describe())
    return {op: tuple(b.name for b in chain) for op, chain in chains.items()}


def describe() -> str:
    """Human-readable table op -> backend chain (first that accepts a call runs it) and why."""
    if not _CHAINS:
        configure()
    rows = [("op", "backend chain", "why")]
    rows += [(op, " -> ".join(b.name for b in chain), _NOTES.get(op, "")) for op, chain in _CHAINS.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}".rstrip() for r in rows)


def active(op: str) -> str:
    """Name of the first backend in `op`'s chain."""
    return _chain(op)[0].name


@torch.compiler.disable
def _resolve_default() -> None:
    configure()


@torch.compiler.disable
def _note_decline(op: str, backend: str, reason: str) -> None:
    key = (op, backend, reason)
    if key not in _DECLINED:
        _DECLINED.add(key)
        log.warning("%s: backend %s declined (%s); falling back", op, backend, reason)


def _chain(op: str) -> tuple[Backend, ...]:
    if not _CHAINS:
        _resolve_default()
    return _CHAINS[op]


def call(op: str, *args: Any, **kwargs: Any) -> Any:
    chain = _chain(op)
    for backend in chain[:-1]:
        reason = backend.verify(*args, **kwargs) if backend.verify is not None else None
        if reason is None:
            return backend.fn(*args, **kwargs)
        _note_decline(op, backend.name, reason)
    return chain[-1].fn(*args, **kwargs)  # the last resort is torch, which accepts every call


def declined() -> set[tuple[str, str, str]]:
    """(op, backend, reason) triples logged so far (for tests and reports)."""
    return set(_DECLINED)
