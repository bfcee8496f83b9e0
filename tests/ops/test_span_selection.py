"""SE-Attn block selection past its score budget: select_blocks scores the query chunks in bounded groups, which
must give the same blocks as scoring all chunks at once (tests/models/test_se_attn.py checks the latter against a
brute-force top-k)."""
import pytest
import torch

import hybridlm.kernels.span_attention.selection as selection


@pytest.mark.parametrize("scorer", ["mean_dot", "max_dot", "mean_dot_shared"])
def test_selection_in_groups_of_one_chunk_equals_one_group(monkeypatch, scorer):
    torch.manual_seed(0)
    b, h, hkv, lq, lk, d, W, M, C, top_k = 2, 4, 2, 41, 41, 8, 5, 3, 4, 3
    q, q_prev = torch.randn(b, h, lq, d), torch.randn(b, h, C - 1, d)
    summaries = selection.block_summaries(torch.randn(b, hkv, lk, d), M)
    args = (q, summaries, lk, W, M, C, top_k, scorer)
    kwargs = dict(max_memory_blocks=6, q_prev=q_prev)
    whole = selection.select_blocks(*args, **kwargs)
    assert (whole >= 0).any() and (whole == -1).any()
    monkeypatch.setattr(selection, "_MAX_SCORES", 1)  # one chunk per group
    torch.testing.assert_close(selection.select_blocks(*args, **kwargs), whole, rtol=0, atol=0)
