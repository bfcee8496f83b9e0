"""Functional ops used by the model. Each name here is the op the model calls; the backend registry
(ops/registry.py) decides which implementation runs."""
from hybridlm.ops.attention import window_attention_torch as window_attention
from hybridlm.ops.conv import causal_conv1d_torch as causal_conv1d
from hybridlm.ops.ssd import ssd_scan_torch as ssd_scan

__all__ = ["ssd_scan", "causal_conv1d", "window_attention"]
