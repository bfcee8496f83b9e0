"""Functional ops used by the model. Each op lives in its own folder of hybridlm.kernels (kernels/<op>/ in the
repository): the function below, its backends (torch reference, Triton kernel, mamba_ssm adapter) registered
beside them, and a naive reference. The backend registry (registry.py) decides which implementation runs.

    from hybridlm import ops
    ops.configure("auto")   # or a BackendConfig; once at start
    print(ops.describe())   # op -> backend chain
"""
from __future__ import annotations

from hybridlm.ops.registry import BackendUnavailableError, active, configure, declined, describe

# Importing an op's folder registers its backends; this order is the order of the ops.describe() table.
# isort: off
from hybridlm.kernels.ssd import ssd_scan
from hybridlm.kernels.causal_conv1d import causal_conv1d
from hybridlm.kernels.window_attention import window_attention
from hybridlm.kernels.span_attention import span_attention
from hybridlm.kernels.se_attention import se_attention
# isort: on

__all__ = ["ssd_scan", "causal_conv1d", "window_attention", "span_attention", "se_attention", "configure", "describe",
           "active", "declined", "BackendUnavailableError"]
