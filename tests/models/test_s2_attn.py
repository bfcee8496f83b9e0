"""S2-Attn (LongLoRA shifted sparse attention, docs/design.md §5) against naive per-group loops;
eval = full attention."""
import math

import pytest
import torch

from hybridlm.models import AttentionConfig
from hybridlm.models.attention import Attention, S2Attention, shifted_sparse_attention


def naive_group_attention(q, k, v, groups):
    """q, k, v: (L, d); groups: list of position lists. Causal softmax attention inside each group, with loops."""
    out = torch.zeros_like(q)
    for members in groups:
        for i in members:
            keys = [j for j in members if j <= i]
            logits = torch.stack([q[i] @ k[j] for j in keys]) / math.sqrt(q.shape[-1])
            p = torch.softmax(logits, 0)
            out[i] = sum(pj * v[j] for pj, j in zip(p, keys))
    return out


def groups_of(L, G, shift):
    """Plain: [0,G), [G,2G), ...; shifted by s = G//2: [0,s), [s, s+G), [s+G, s+2G), ... (no wrap-around)."""
    starts = [0] + list(range(shift, L, G)) if shift else list(range(0, L, G))
    starts = sorted(set(starts))
    bounds = starts + [L]
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:]) if a < b]


def naive_s2(q, k, v, G):
    b, h, L, _ = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            shift = G // 2 if hi >= h // 2 else 0
            out[bi, hi] = naive_group_attention(q[bi, hi], k[bi, hi], v[bi, hi], groups_of(L, G, shift))
    return out


@pytest.mark.parametrize("h,L,G", [(4, 16, 4), (4, 18, 4), (3, 13, 5), (2, 9, 1), (2, 12, 12), (4, 10, 3)])
def test_matches_naive_per_group_loop(h, L, G):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, L, 6, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(shifted_sparse_attention(q, k, v, G), naive_s2(q, k, v, G))


def longlora_rolled(q, k, v, G):
    """LongLoRA's causal-LM code path: roll the second half of the heads by -G/2, causal attention inside each
    group of the rolled sequence, roll back (L % G == 0)."""
    b, h, L, d = q.shape
    h2, s = h // 2, G // 2
    roll = lambda x: torch.cat([x[:, :h2], x[:, h2:].roll(-s, 2)], 1)
    qr, kr, vr = roll(q), roll(k), roll(v)
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            out[bi, hi] = naive_group_attention(qr[bi, hi], kr[bi, hi], vr[bi, hi], groups_of(L, G, 0))
    return torch.cat([out[:, :h2], out[:, h2:].roll(s, 2)], 1)


def test_differs_from_longlora_rolling_only_where_it_leaked():
    torch.manual_seed(1)
    h, L, G = 4, 16, 8
    q, k, v = (torch.randn(1, h, L, 6, dtype=torch.float64) for _ in range(3))
    ours, theirs = shifted_sparse_attention(q, k, v, G), longlora_rolled(q, k, v, G)
    leaked = torch.zeros(h, L, dtype=torch.bool)
    leaked[h // 2:, : G // 2] = True  # shifted heads, first G/2 tokens: they saw the final tokens in LongLoRA
    torch.testing.assert_close(ours[0][~leaked], theirs[0][~leaked])
    assert (ours[0][leaked] - theirs[0][leaked]).abs().min() > 1e-6


def make(kind, kv=2, seed=0):
    torch.manual_seed(seed)
    cls = S2Attention if kind == "s2" else Attention
    return cls(16, AttentionConfig(kind=kind, num_heads=4, num_heads_kv=kv, group_ratio=0.25)).double()


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_mixer_training_uses_s2_and_eval_uses_full(kv):
    m = make("s2", kv)
    u = torch.randn(2, 20, 16, dtype=torch.float64)
    m.train()
    y = m(u)[0]
    # Reference: the same projections by hand, kv heads repeated, naive groups of G = 0.25 * 20 = 5.
    qkv = m.in_proj(u)
    hd = 4  # d_model 16 / 4 heads
    q, k, v = qkv.split([4 * hd, kv * hd, kv * hd], -1)
    q = q.view(2, 20, 4, hd).transpose(1, 2)
    k = k.view(2, 20, kv, hd).transpose(1, 2).repeat_interleave(4 // kv, 1)
    v = v.view(2, 20, kv, hd).transpose(1, 2).repeat_interleave(4 // kv, 1)
    o = naive_s2(q, k, v, 5).transpose(1, 2).reshape(2, 20, 4 * hd)
    torch.testing.assert_close(y, m.out_proj(o))
    full = make("full", kv)
    full.load_state_dict(m.state_dict())
    m.eval()
    torch.testing.assert_close(m(u)[0], full(u)[0])
    assert (y - full(u)[0]).abs().max() > 1e-4  # training really differs from full attention


def test_training_output_is_causal():
    m = make("s2").train()
    u = torch.randn(1, 24, 16, dtype=torch.float64)
    y = m(u)[0]
    for i in (0, 2, 5, 11, 20):
        u2 = u.clone()
        u2[:, i + 1:] += torch.randn_like(u2[:, i + 1:])
        torch.testing.assert_close(m(u2)[0][:, : i + 1], y[:, : i + 1], rtol=0, atol=0)


def test_training_with_cached_keys_is_rejected():
    m = make("s2").train()
    u = torch.randn(1, 8, 16, dtype=torch.float64)
    _, state = m(u)
    with pytest.raises(ValueError, match="S2-Attn trains on whole sequences"):
        m(u, state)
