"""Triton SE-Attn attention (kernels/se_attention/triton_kernel.py) against the torch op, which test_se_attention.py
checks against a dense-mask reference: outputs and gradients of q, k, v, fp32 on CPU under the Triton interpreter
(see conftest.py)."""
import pytest
import torch
from helpers import assert_close_with_grads

from hybridlm.kernels.se_attention import attend_selected, select_blocks
from hybridlm.kernels.se_attention.triton_kernel import attend_selected_triton


def check(q, k, v, sel, M, S, scale=None):
    o = attend_selected_triton(q, k, v, sel, chunk_size=M, block_size=S, scale=scale)
    o_ref = attend_selected(q, k, v, sel, chunk_size=M, block_size=S, scale=scale)
    assert_close_with_grads(o, o_ref, (q, k, v), rtol=1e-5, atol=1e-5)


def inputs(b, h, hkv, L, d, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, L, d, generator=g).requires_grad_() for n in (h, hkv, hkv))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("b,h,hkv,L,d,M,S,top_k", [
    (1, 4, 2, 45, 16, 12, 4, 3),  # GQA; ragged last chunk; chunk not a multiple of the 16-row tile; empty slots
    (2, 2, 1, 50, 8, 20, 3, 2),  # S does not divide M; head dim below the 16-wide tile
    (1, 2, 2, 70, 12, 32, 20, 2),  # blocks longer than the 16-key tile; head dim not a power of two
    (1, 2, 2, 40, 16, 16, 4, 0),  # top_k = 0: chunk-local causal attention
])
def test_matches_torch_op_with_selected_blocks(b, h, hkv, L, d, M, S, top_k, shared):
    q, k, v = inputs(b, h, hkv, L, d, seed=L + M)
    sel = select_blocks(q, k, v, chunk_size=M, block_size=S, top_k=top_k, shared=shared)
    check(q, k, v, sel, M, S)


def test_block_chosen_by_many_chunks_and_heads():
    """Block 0 is chosen by every chunk of both heads: its dk/dv add up over (chunk, head) programs."""
    q, k, v = inputs(1, 2, 1, 24, 16, seed=1)
    sel = torch.tensor([[[[-1, -1], [0, -1], [0, 2]], [[-1, -1], [0, 1], [3, 0]]]])  # (1, 2, T=3, 2); M=8, S=2
    check(q, k, v, sel, 8, 2, scale=0.3)


def test_transposed_inputs():
    """q/k/v as an attention mixer makes them: transposed views of (b, L, h, d)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 33, 2, 16, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    sel = select_blocks(q, k, v, chunk_size=10, block_size=4, top_k=2, scorer="quest")
    check(q, k, v, sel, 10, 4)
