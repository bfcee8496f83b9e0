"""eval.target_id_range: loss_by_position restricted to positions whose target id is in [lo, hi), checked against a
masked cross-entropy computed here in one pass (no streaming), and its column / scalar / curve in the report."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import tiny_model

from hybridlm.eval import EvalConfig, loss_by_position, run_length_report


def seqs(n, L, vocab=23, seed=0):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def masked_reference(model, x, lo, hi):
    """From one full pass: mean(a, b), the masked mean loss over positions [a, b); the per-token loss (n, L-1);
    the mask of targets in [lo, hi) (n, L-1)."""
    logits, _ = model(x[:, :-1])
    targets = x[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double()  # (n, L-1)
    m = ((targets >= lo) & (targets < hi)).double()

    def mean(a, b):
        return ((ce[:, a:b] * m[:, a:b]).sum() / m[:, a:b].sum()).item()

    return mean, ce, m


@pytest.mark.parametrize("chunk_len, batch_size", [(5, 2), (64, 4)])
def test_target_loss_equals_masked_cross_entropy(chunk_len, batch_size):
    model = tiny_model()
    x = seqs(6, 41)
    lo, hi, T = 3, 11, 8
    r = loss_by_position(model, x, chunk_len, T, batch_size, target_range=(lo, hi))
    mean, ce, m = masked_reference(model, x, lo, hi)
    tg = r.target
    assert r.edges == [0, 1, 2, 4, 8, 16, 32, 40]
    for (a, b), got in zip(zip(r.edges[:-1], r.edges[1:]), tg.bucket_loss):
        if m[:, a:b].sum() == 0:
            assert math.isnan(got)
        else:
            assert math.isclose(got, mean(a, b), rel_tol=1e-9)
    assert math.isclose(tg.summary, mean(32, 40) / mean(4, 8), rel_tol=1e-9)
    assert math.isclose(tg.loss_within_train_len, mean(0, T), rel_tol=1e-9)
    assert math.isclose(tg.loss_beyond_train_len, mean(T, 40), rel_tol=1e-9)
    torch.testing.assert_close(tg.count, m.sum(0))
    # the all-token numbers are unchanged by asking for a target range
    plain = loss_by_position(model, x, chunk_len, T, batch_size)
    torch.testing.assert_close(r.per_position, plain.per_position)
    assert plain.target is None and [row[:3] for row in r.rows()] == plain.rows()
    torch.testing.assert_close(r.per_position, ce.mean(0), rtol=1e-9, atol=1e-9)


def test_report_has_target_column_scalar_and_curve(tmp_path):
    model = tiny_model(double=False)
    x = seqs(4, 65)
    cfg = EvalConfig(diagnostics=["loss_by_position"], max_len=65, n_sequences=4, target_id_range=[3, 11],
                     attention="same")  # the reference below runs the (swa) model itself
    res = run_length_report(model, x, cfg, tmp_path, train_len=8)
    mean, _, _ = masked_reference(model.double(), x, 3, 11)
    assert math.isclose(res["loss_by_position"]["target_last_bucket_over_train_half"], mean(32, 64) / mean(4, 8),
                        rel_tol=1e-4)
    table = json.loads((tmp_path / "loss_by_position.json").read_text())
    assert table["columns"] == ["bucket_start", "bucket_end", "mean_loss", "target_mean_loss"]
    assert table["meta"]["target_id_range"] == [3, 11]
    header = (tmp_path / "loss_by_position_per_position.csv").read_text().splitlines()[0]
    assert header == "position,mean_loss,target_mean_loss,target_count"
    assert (tmp_path / "loss_by_position.png").stat().st_size > 0


def test_target_range_is_validated():
    for bad in ([5], [4, 4], [-1, 3]):
        with pytest.raises(ValueError, match="^eval.target_id_range"):
            EvalConfig(target_id_range=bad).validate()
