"""The diagnostics against references written here: one-pass losses, direct bucket means, closed-form EffRem,
per-prefix state norms, re-reading greedy decoding, and oracle models for passkey / copy scoring."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import CountLM, HistoryLM, copier, induction, tiny_model

from hybridlm.data.tokenizers import ByteTokenizer
from hybridlm.eval import (
    EvalConfig,
    copy_accuracy,
    default_grid,
    effrem,
    greedy_generate,
    log_bucket_edges,
    loss_by_position,
    passkey_grid,
    per_position_loss,
    state_norms,
)
from hybridlm.eval.position import summarize


def seqs(n, L, vocab=23, seed=0):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


# ---- loss by position ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_len, batch_size", [(5, 2), (7, 8), (64, 3)])
def test_streamed_loss_equals_one_pass(chunk_len, batch_size):
    model = tiny_model()
    x = seqs(5, 40)
    streamed = per_position_loss(model, x, chunk_len, batch_size)
    logits, _ = model(x[:, :-1])  # one pass, no state handling
    ref = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(0)  # (39,)
    assert streamed.shape == (39,)
    torch.testing.assert_close(streamed, ref.double(), rtol=1e-9, atol=1e-9)


def test_bucket_edges():
    assert log_bucket_edges(1) == [0, 1]
    assert log_bucket_edges(2) == [0, 1, 2]
    assert log_bucket_edges(3) == [0, 1, 2, 3]
    assert log_bucket_edges(8) == [0, 1, 2, 4, 8]
    assert log_bucket_edges(9) == [0, 1, 2, 4, 8, 9]
    assert log_bucket_edges(1000)[-3:] == [256, 512, 1000]


def test_bucket_means_and_summary_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    per_pos = torch.rand(100, generator=g, dtype=torch.float64) + torch.linspace(0, 2, 100, dtype=torch.float64)
    r = summarize(per_pos, train_len=12)
    expect = {(0, 1): per_pos[0], (1, 2): per_pos[1], (2, 4): (per_pos[2] + per_pos[3]) / 2,
              (4, 8): per_pos[4:8].sum() / 4, (8, 16): per_pos[8:16].sum() / 8, (16, 32): per_pos[16:32].sum() / 16,
              (32, 64): per_pos[32:64].sum() / 32, (64, 100): per_pos[64:].sum() / 36}
    assert [(a, b) for a, b, _ in r.rows()] == list(expect)
    for (_, _, got), want in zip(r.rows(), expect.values()):
        assert math.isclose(got, want.item(), rel_tol=1e-12)
    assert math.isclose(r.summary, (per_pos[64:].sum() / 36 / (per_pos[6:12].sum() / 6)).item(), rel_tol=1e-12)
    assert math.isclose(r.loss_within_train_len, per_pos[:12].mean().item(), rel_tol=1e-12)
    assert math.isclose(r.loss_beyond_train_len, per_pos[12:].mean().item(), rel_tol=1e-12)
    with pytest.raises(ValueError, match="training length T=200"):
        summarize(per_pos, train_len=200)


def test_loss_by_position_end_to_end():
    model = tiny_model()
    r = loss_by_position(model, seqs(3, 33), chunk_len=8, train_len=8, batch_size=2)
    assert r.edges == [0, 1, 2, 4, 8, 16, 32] and len(r.bucket_loss) == 6 and r.per_position.shape == (32,)


# ---- EffRem ---------------------------------------------------------------------------------------------------
def test_effrem_closed_form_on_count_model():
    V = 6
    W = torch.randn(V, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = CountLM(W)
    x = seqs(4, 12, vocab=V, seed=2)
    T, grid = 10, [0, 1, 3, 9]
    got = effrem(model, x, T, grid, chunk_len=3, batch_size=3)
    for k, t in enumerate(grid):
        tv = []
        for r in range(4):
            full = torch.bincount(x[r, :T], minlength=V).double()  # counts of x[0:T]
            cut = torch.bincount(x[r, t:T], minlength=V).double()  # counts of x[t:T]
            p, q = torch.softmax(W @ full, 0), torch.softmax(W @ cut, 0)
            tv.append(0.5 * (p - q).abs().sum())
        assert math.isclose(got[k].item(), torch.stack(tv).mean().item(), rel_tol=1e-12, abs_tol=1e-15)
    assert got[0].item() == 0.0


def test_effrem_on_hybrid_model_matches_direct_softmaxes():
    model = tiny_model(pattern="M")
    x = seqs(3, 20)
    T, grid = 16, default_grid(16, 5)
    assert grid == [0, 4, 8, 11, 15]
    got = effrem(model, x, T, grid, chunk_len=5)
    p = torch.softmax(model(x[:, :T])[0][:, -1], -1)
    for k, t in enumerate(grid):
        q = torch.softmax(model(x[:, t:T])[0][:, -1], -1)
        torch.testing.assert_close(got[k], (0.5 * (p - q).abs().sum(-1)).mean(), rtol=1e-9, atol=1e-12)
    assert got[0] == 0 and (got[1:] > 0).all()
    with pytest.raises(ValueError, match=r"eval.effrem_grid: t must be in \[0, T-1=15\], got \[16\]"):
        effrem(model, x, T, [16], chunk_len=5)


# ---- state norms ------------------------------------------------------------------------------------------------
def test_state_norms_match_per_prefix_forward():
    model = tiny_model()
    x = seqs(3, 23)
    r = state_norms(model, x, every=6, batch_size=2)
    assert r.positions == [6, 12, 18, 23] and r.layers == [0, 2]
    for j, pos in enumerate(r.positions):
        _, st = model(x[:, :pos])  # one pass over the prefix
        for i, layer in enumerate(r.layers):
            want = torch.linalg.vector_norm(st[layer]["ssm"].reshape(3, -1), dim=1).mean()
            torch.testing.assert_close(r.norms[i, j], want, rtol=1e-9, atol=1e-12)


# ---- decoding ---------------------------------------------------------------------------------------------------
def test_greedy_generate_matches_rereading_loop():
    model = tiny_model()
    prompt = seqs(2, 11)
    got = greedy_generate(model, prompt, 6, chunk_len=4)
    ids = prompt.clone()
    for _ in range(6):  # reference: re-read everything each step, no state
        nxt = model(ids)[0][:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    assert torch.equal(got, ids[:, 11:])


def test_passkey_grid_scores_an_oracle_and_a_constant_model():
    tok = ByteTokenizer()
    lengths, depths = [80, 120], [0.0, 0.5, 1.0]
    oracle = HistoryLM(257, induction(k=8))  # reads the key after the second "...pass key is"
    acc = passkey_grid(oracle, tok, lengths, depths, n_samples=2, chunk_len=32, seed=0)
    assert acc.shape == (2, 3) and torch.equal(acc, torch.ones(2, 3))
    assert max(oracle.calls) <= 32  # the prompt was streamed in chunks, then one token per step
    const = HistoryLM(257, lambda h: ord("7"))
    assert torch.equal(passkey_grid(const, tok, lengths, depths, 2, 32, seed=0), torch.zeros(2, 3))


def test_passkey_grid_runs_on_tiny_model():
    model = tiny_model(vocab=257, double=False)
    acc = passkey_grid(model, ByteTokenizer(), [80, 100], [0.0, 1.0], n_samples=2, chunk_len=16, seed=1)
    assert acc.shape == (2, 2) and ((acc >= 0) & (acc <= 1)).all()
    with pytest.raises(ValueError, match="eval.passkey_lengths: passkey: context_len=10"):
        passkey_grid(model, ByteTokenizer(), [10], [0.0], 1, 16)


@pytest.mark.parametrize("mode", ["teacher_forced", "greedy"])
def test_copy_accuracy_scores_oracles(mode):
    V = 12
    right = copy_accuracy(HistoryLM(V, copier(sep=V - 1)), [3, 8], V, n_samples=4, chunk_len=5, mode=mode)
    assert torch.equal(right, torch.ones(2, dtype=torch.float64))
    # off by one: predicts the token just copied; right only where the random content repeats a token
    wrong = copy_accuracy(HistoryLM(V, copier(sep=V - 1, shift=-1)), [8], V, n_samples=4, chunk_len=5, mode=mode)
    assert wrong[0] < 0.5


def test_copy_accuracy_teacher_forced_matches_direct_argmax():
    model = tiny_model(vocab=20)
    acc = copy_accuracy(model, [5], 20, n_samples=3, chunk_len=4, seed=3)
    from hybridlm.eval.tasks import copy_batch

    rows = copy_batch(5, 20, 3, np.random.default_rng(3))  # the same rows: same seed, first length
    pred = model(rows)[0].argmax(-1)[:, 5:10]
    assert math.isclose(acc[0].item(), (pred == rows[:, :5]).double().mean().item())
    from hybridlm.data.errors import DataError  # one line from the entry points, naming the key

    with pytest.raises(DataError, match=r"^eval\.diagnostics: copy \(eval\.copy_vocab_size\): token id 29 is "
                                        r"outside the model's vocabulary \(model\.vocab_size=20\)"):
        copy_accuracy(model, [5], 30, 1, 4)


# ---- config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(diagnostics=["loss_by_position", "ppl"]), "eval.diagnostics: unknown diagnostic(s) ['ppl']"),
    (dict(max_len=-1), "eval.max_len: must be >= 0, got -1"),
    (dict(n_sequences=0), "eval.n_sequences: must be > 0, got 0"),
    (dict(passkey_depths=[0.5, 1.5]), "eval.passkey_depths: values must be in [0, 1]"),
    (dict(copy_mode="free"), "eval.copy_mode: must be one of"),
    (dict(effrem_grid=[-1]), "eval.effrem_grid: values must be >= 0"),
])
def test_eval_config_validate(kwargs, message):
    with pytest.raises(ValueError) as e:
        EvalConfig(**kwargs).validate()
    assert str(e.value).startswith(message)
    EvalConfig().validate()
