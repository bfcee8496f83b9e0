"""The SE-Attn scorer diagnostic (eval=block_recall, docs/design.md §4) on a model trained for a few steps: its
table against block_recall called directly on q, k, v projected here by hand, its files and W&B table, its
refusals, and `python -m hybridlm.evaluate ... eval=block_recall` in-process on a trained checkpoint."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import RecordingWandb
from hydra import compose, initialize_config_dir

from hybridlm.config import register_configs
from hybridlm.eval import EvalConfig, captured_qkv, run_length_report
from hybridlm.kernels.se_attention import block_recall
from hybridlm.models import AttentionConfig, HybridLM, ModelConfig, SSMConfig
from hybridlm.runner import evaluate, train

CONF = Path(__file__).resolve().parents[2] / "conf"
SCORERS = ["paper", "moba", "quest", "nsa", "oracle"]
GEOMETRY = dict(recall_seq_len=96, recall_chunk_size=16, recall_block_size=8, recall_top_k=3)


def seqs(n, L, vocab=40, seed=0):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def trained_model(pattern="MAMA"):
    """Mamba-2 and swa layers (window 8, 4 heads of 8 channels, no conv or rotary on q/k/v), 4 SGD steps."""
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(d_model=32, layer_pattern=pattern, vocab_size=40,
                                 ssm=SSMConfig(d_state=8, headdim=8, chunk_size=8),
                                 attn=AttentionConfig(kind="swa", num_heads=4, window=8)))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for s in range(4):
        x = seqs(4, 49, seed=10 + s)
        logits, _ = model(x[:, :-1])
        F.cross_entropy(logits.transpose(1, 2), x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def qkv_by_hand(model, x, layer):
    """q (b, h, L, d), k, v of attention layer `layer` from the model's weights: the layers before it, the block's
    norm, the fused in_proj split into heads (this config has no conv and no rotary)."""
    with torch.no_grad():
        h = model.backbone.embedding(x)
        for block in model.backbone.layers[:layer]:
            h, _ = block(h, None)
        mixer = model.backbone.layers[layer].mixer
        q, k, v = mixer.in_proj(model.backbone.layers[layer].norm(h)).split(32, dim=-1)
    return [t.view(x.shape[0], x.shape[1], 4, 8).transpose(1, 2) for t in (q, k, v)]


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_block_recall_table_files_and_wandb(tmp_path):
    model = trained_model()
    x = seqs(3, 100)
    wb = RecordingWandb()
    cfg = EvalConfig(diagnostics=["block_recall"], n_sequences=3, batch_size=2, **GEOMETRY)
    res = run_length_report(model, x, cfg, tmp_path, [wb], train_len=16, step=5)["block_recall"]
    for ext in ("csv", "json", "png"):
        assert (tmp_path / f"block_recall.{ext}").stat().st_size > 0
    rows = read_rows(tmp_path / "block_recall.csv")
    assert [(int(r["layer"]), int(r["head"]), r["scorer"]) for r in rows] == [
        (layer, h, s) for layer in (1, 3) for h in range(4) for s in SCORERS]
    for r in rows:
        for key in ("recall", "captured_mass", "past_mass"):
            assert 0.0 <= float(r[key]) <= 1.0 + 1e-6, r
        assert float(r["captured_mass"]) <= float(r["past_mass"]) + 1e-6
        if r["scorer"] == "oracle":
            assert float(r["recall"]) == pytest.approx(1.0, abs=1e-6)
    assert any(float(r["recall"]) < 0.99 for r in rows if r["scorer"] == "paper")  # the scorers do differ

    # one value against block_recall on q, k, v projected by hand; layer 1 sees only a Mamba-2 layer before it,
    # so the evaluated kind (full, the default) does not enter its inputs
    q, k, v = qkv_by_hand(model, x[:, :96], layer=1)
    per_seq = [block_recall(q[b:b + 1], k[b:b + 1], v[b:b + 1], chunk_size=16, block_size=8, top_k=3,
                            scorers=("paper", "nsa")) for b in range(3)]
    got = {(r["head"], r["scorer"]): r for r in rows if r["layer"] == "1"}
    for h in range(4):
        assert float(got[(str(h), "paper")]["recall"]) == pytest.approx(
            sum(p.recall["paper"][h].item() for p in per_seq) / 3, rel=1e-5)
        assert float(got[(str(h), "nsa")]["captured_mass"]) == pytest.approx(
            sum(p.captured_mass["nsa"][h].item() for p in per_seq) / 3, rel=1e-5)
        assert float(got[(str(h), "oracle")]["past_mass"]) == pytest.approx(
            sum(p.past_mass[h].item() for p in per_seq) / 3, rel=1e-5)

    js = json.loads((tmp_path / "block_recall.json").read_text())
    assert js["meta"]["attention"] == "full" and js["meta"]["seq_len"] == 96 and js["meta"]["chunk_size"] == 16
    mean_paper = sum(float(r["recall"]) for r in rows if r["scorer"] == "paper") / 8
    assert res["recall_paper"] == pytest.approx(mean_paper, rel=1e-9) and res["recall_oracle"] == pytest.approx(1.0)
    paper = [(float(r["recall"]), float(r["past_mass"])) for r in rows if r["scorer"] == "paper"]
    assert res["recall_paper_mass_weighted"] == pytest.approx(sum(a * m for a, m in paper) / sum(m for _, m in paper))
    cols, data, step = wb.tables["length_eval/block_recall"]
    assert cols == js["columns"] and data == js["rows"] and step == 5
    assert wb.images["length_eval/block_recall_plot"][0] == [str(tmp_path / "block_recall.png")]
    assert wb.metrics["length_eval/block_recall/recall_paper"] == res["recall_paper"]


def test_captured_qkv_is_what_attention_sees_and_is_removed():
    model = trained_model()
    x = seqs(2, 40)
    with captured_qkv(model) as got, torch.no_grad():
        model(x)
    for captured, want in zip(got[1][0], qkv_by_hand(model, x, layer=1)):  # q, k, v
        torch.testing.assert_close(captured, want, rtol=1e-6, atol=1e-6)
    assert sorted(got) == [1, 3] and all(len(calls) == 1 for calls in got.values())
    assert all("attend" not in mixer.__dict__ for _, mixer in model.attention_layers())


@pytest.mark.parametrize("kwargs, message", [
    (dict(recall_seq_len=64, recall_chunk_size=64), "eval.recall_chunk_size: must be < eval.recall_seq_len"),
    (dict(recall_seq_len=64, recall_chunk_size=16, recall_block_size=8, recall_top_k=6), "eval.recall_top_k:"),
    (dict(recall_scorers=["paper", "bm25"]), "eval.recall_scorers: unknown scorer(s) ['bm25']"),
    (dict(recall_scorers=[]), "eval.recall_scorers: must name each scorer once"),
    (dict(recall_top_k=0), "eval.recall_top_k: must be > 0"),
])
def test_bad_geometry_is_refused_naming_the_key(kwargs, message):
    with pytest.raises(ValueError) as e:
        EvalConfig(diagnostics=["block_recall"], **kwargs).validate()
    assert str(e.value).startswith(message)


def test_refusals_at_run_time(tmp_path):
    # 8T = 64 tokens in chunks of M = T = 8: the last chunk has 7 past blocks of 8, so top_k = 7 takes them all
    cfg = EvalConfig(diagnostics=["block_recall"], recall_block_size=8, recall_top_k=7)
    with pytest.raises(ValueError, match="^eval.recall_top_k: the last chunk .* has 7 complete past blocks"):
        run_length_report(trained_model(), seqs(2, 64), cfg, tmp_path, train_len=8)
    cfg.recall_top_k = 3
    with pytest.raises(ValueError, match="^eval.recall_seq_len: block_recall needs sequences of 128 tokens"):
        run_length_report(trained_model(), seqs(2, 100), cfg, tmp_path, train_len=16)
    with pytest.raises(ValueError, match="this model has none"):
        run_length_report(trained_model("MM"), seqs(2, 96), EvalConfig(diagnostics=["block_recall"], **GEOMETRY),
                          tmp_path, train_len=16)


def compose_cfg(config_name, overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def test_evaluate_a_checkpoint_with_eval_block_recall_and_eval_attention(tmp_path):
    """The command line's path, in-process: a checkpoint trained with swa for 2 steps; eval=block_recall writes
    its table; val/loss under eval.attention=full is that of the checkpoint loaded as full attention."""
    run = ["model.d_model=32", "model.ssm.d_state=16", "model.ssm.headdim=16", "model.ssm.chunk_size=16",
           "model.attn.window=16", "data.seq_len=32", "data.batch_size=2", "data.val_batches=1",
           "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
           "trainer.enable_progress_bar=false", "logger=csv"]
    ckpt = train(compose_cfg("train", run), tmp_path / "train", set())["checkpoint"]

    overrides = [f"ckpt_path={ckpt}", "eval=block_recall", "eval.recall_seq_len=128", "eval.recall_block_size=8",
                 "eval.n_sequences=2", "trainer.enable_progress_bar=false", "logger=csv"]
    result = evaluate(compose_cfg("evaluate", overrides), tmp_path / "recall", overrides)
    rows = read_rows(Path(result["report"]) / "block_recall.csv")
    assert len(rows) == 4 * 5  # one attention layer (hybrid_tiny: MMAM), 4 heads, 5 scorers
    assert all(math.isclose(float(r["recall"]), 1.0, abs_tol=1e-6) for r in rows if r["scorer"] == "oracle")
    assert result["metrics"]["length_eval/block_recall/recall_oracle"] == pytest.approx(1.0)

    def val_loss(extra):
        ov = [f"ckpt_path={ckpt}", "eval=default", "trainer.enable_progress_bar=false", "logger=csv", *extra]
        return evaluate(compose_cfg("evaluate", ov), tmp_path / "_".join(extra), ov)["metrics"]["val/loss"]

    full = val_loss(["eval.attention=full"])
    assert full == val_loss(["model/attention=full", "eval.attention=same"])  # loaded as full attention
    assert full != val_loss(["eval.attention=same"])  # 32-token rows through a 16-token window
