"""The mamba_ssm backend (official CUDA/Triton kernels) against the torch reference ops. Needs a CUDA GPU with
mamba_ssm and causal_conv1d installed: marked `cuda` (skipped when there is no GPU) and skipped, with the
import error, when the packages are missing. On CPU only its refusal is checked."""
import pytest
import torch

from hybridlm.kernels.causal_conv1d.mamba_ssm_adapter import (
    causal_conv1d_mamba_ssm,
    causal_conv1d_mamba_ssm_available,
    verify_causal_conv1d_mamba_ssm,
)
from hybridlm.kernels.causal_conv1d.torch_ref import causal_conv1d_torch
from hybridlm.kernels.ssd.mamba_ssm_adapter import ssd_scan_mamba_ssm, ssd_scan_mamba_ssm_available
from hybridlm.kernels.ssd.torch_ref import ssd_scan_torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_unavailable_without_gpu_and_declines_cpu_tensors():
    assert "CUDA" in ssd_scan_mamba_ssm_available() and "CUDA" in causal_conv1d_mamba_ssm_available()
    x = torch.randn(1, 8, 16)
    assert verify_causal_conv1d_mamba_ssm(x, torch.randn(16, 1, 4), None) == "tensors are not on a CUDA device"


def need(reason):
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.cuda
@pytest.mark.parametrize("with_init", [False, True])
def test_ssd_matches_torch(with_init):
    need(ssd_scan_mamba_ssm_available())
    torch.manual_seed(0)
    dev = "cuda"
    b, l, h, g, p, n = 2, 300, 8, 2, 32, 64  # ragged: not a multiple of the chunk
    x = torch.randn(b, l, h, p, device=dev, requires_grad=True)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, device=dev) - 2).requires_grad_()
    A = (-torch.rand(h, device=dev) - 0.5).requires_grad_()
    B = torch.randn(b, l, g, n, device=dev, requires_grad=True)
    C = torch.randn(b, l, g, n, device=dev, requires_grad=True)
    D = torch.randn(h, device=dev, requires_grad=True)
    h0 = torch.randn(b, h, p, n, device=dev, requires_grad=True) if with_init else None
    inputs = [t for t in (x, dt, A, B, C, D, h0) if t is not None]
    y, s = ssd_scan_mamba_ssm(x, dt, A, B, C, 64, D=D, initial_state=h0)
    y_ref, s_ref = ssd_scan_torch(x, dt, A, B, C, 64, D=D, initial_state=h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(s, s_ref, rtol=1e-3, atol=1e-3)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    g1 = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), inputs)
    g2 = torch.autograd.grad((y_ref * gy).sum() + (s_ref * gs).sum(), inputs)
    for a, r in zip(g1, g2):
        torch.testing.assert_close(a, r, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
def test_conv_matches_torch_with_states():
    need(causal_conv1d_mamba_ssm_available())
    torch.manual_seed(0)
    dev = "cuda"
    b, l, d, k = 2, 37, 64, 4
    x = torch.randn(b, l, d, device=dev, requires_grad=True)
    w = torch.randn(d, 1, k, device=dev, requires_grad=True)
    bias = torch.randn(d, device=dev, requires_grad=True)
    cs = torch.randn(b, k - 1, d, device=dev, requires_grad=True)
    assert verify_causal_conv1d_mamba_ssm(x, w, bias, cs) is None
    y, s = causal_conv1d_mamba_ssm(x, w, bias, cs)
    y_ref, s_ref = causal_conv1d_torch(x, w, bias, cs)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    g1 = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), (x, w, bias, cs))
    g2 = torch.autograd.grad((y_ref * gy).sum() + (s_ref * gs).sum(), (x, w, bias, cs))
    for a, r in zip(g1, g2):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-3)
