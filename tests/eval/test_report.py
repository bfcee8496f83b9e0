"""The report runner (files, plots, loggers), sequences from the data module, and LengthEvalCallback in a real
Lightning fit."""
import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eval_helpers import RecordingWandb, tiny_model
from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader

from hybridlm.config import Config, OptimConfig, TrainerConfig
from hybridlm.data import DataConfig, HybridDataModule
from hybridlm.eval import EvalConfig, LengthEvalCallback, eval_sequences, per_position_loss, run_length_report
from hybridlm.eval.position import summarize
from hybridlm.lit import HybridLMModule

ALL = ["loss_by_position", "effrem", "state_norms", "passkey", "copy"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small_cfg(**kw) -> EvalConfig:
    # attention=same: these tests compare the report with direct computations on the (swa) model itself;
    # tests/eval/test_eval_attention.py covers the other settings.
    base = dict(diagnostics=ALL, max_len=64, n_sequences=3, chunk_len=16, batch_size=2, effrem_points=4,
                passkey_lengths=[80, 100], passkey_depths=[0.0, 1.0], passkey_samples=1, copy_lengths=[4, 8],
                copy_samples=2, copy_vocab_size=50, attention="same")
    base.update(kw)
    return EvalConfig(**base)


def read_csv(path):
    with open(path) as f:
        return list(csv.reader(f))


def test_run_length_report_writes_and_logs_everything(tmp_path):
    model = tiny_model(vocab=257, double=False).train()
    seqs = torch.randint(0, 257, (4, 80), generator=torch.Generator().manual_seed(0))
    csv_logger, wb = CSVLogger(str(tmp_path), name="csv", version=""), RecordingWandb()
    out = tmp_path / "report"
    results = run_length_report(model, seqs, small_cfg(), out, [csv_logger, wb], train_len=8, step=3)
    assert model.training  # restored after evaluating in eval mode
    assert set(results) == set(ALL)
    for name in ALL:
        for ext in ("csv", "json", "png"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        js = json.loads((out / f"{name}.json").read_text())
        assert js["scalars"] == results[name]
        table = read_csv(out / f"{name}.csv")
        assert table[0] == js["columns"] and len(table) - 1 == len(js["rows"])
        # W&B: the same table and the plot, at the given step
        cols, rows, step = wb.tables[f"length_eval/{name}"]
        assert cols == js["columns"] and rows == js["rows"] and step == 3
        images, step = wb.images[f"length_eval/{name}_plot"]
        assert images == [str(out / f"{name}.png")] and step == 3
        for k, v in results[name].items():
            assert wb.metrics[f"length_eval/{name}/{k}"] == v

    # the loss table is what summarize() gives on the streamed per-position losses of the first 3 x 64 tokens
    direct = summarize(per_position_loss(model, seqs[:3, :64], 16), 8)
    js = json.loads((out / "loss_by_position.json").read_text())
    assert js["rows"] == direct.rows() and js["meta"]["eval_len"] == 64
    assert np.allclose([float(r[1]) for r in read_csv(out / "loss_by_position_per_position.csv")[1:]],
                       direct.per_position.numpy(), rtol=1e-6)
    passkey = json.loads((out / "passkey.json").read_text())
    assert [r[:2] for r in passkey["rows"]] == [[80, 0.0], [80, 1.0], [100, 0.0], [100, 1.0]]
    assert all(0 <= r[2] <= 1 for r in passkey["rows"])

    # scalars reach the CSV logger too
    header = read_csv(tmp_path / "csv" / "metrics.csv")[0]
    assert "length_eval/loss_by_position/last_bucket_over_train_half" in header
    assert "length_eval/copy/mean_accuracy" in header


def test_run_length_report_needs_train_len_with_sequences(tmp_path):
    with pytest.raises(ValueError, match="give train_len"):
        run_length_report(tiny_model(), torch.zeros(2, 10, dtype=torch.long), small_cfg(), tmp_path)


def test_default_eval_length_is_16x_training_length(tmp_path):
    seqs = torch.randint(0, 23, (2, 200), generator=torch.Generator().manual_seed(1))
    run_length_report(tiny_model(), seqs, small_cfg(diagnostics=["loss_by_position"], max_len=0), tmp_path,
                      train_len=4)
    assert json.loads((tmp_path / "loss_by_position.json").read_text())["meta"]["eval_len"] == 64


def files_datamodule(tmp_path, doc_lengths, seq_len=8):
    rng = np.random.default_rng(0)
    d = tmp_path / "docs"
    d.mkdir()
    docs = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=n)) for n in doc_lengths]
    for i, doc in enumerate(docs):
        (d / f"doc{i:03d}.txt").write_text(doc)
    cfg = DataConfig(source="files", paths=[str(d / "*.txt")], val_fraction=0.5, seq_len=seq_len, batch_size=2,
                     val_batches=1)
    return HybridDataModule(cfg, model_vocab_size=257), docs


def test_eval_sequences_from_datamodule(tmp_path):
    dm, docs = files_datamodule(tmp_path, [300] * 30)
    seqs, where = eval_sequences(dm, 4, 120)
    assert seqs.shape == (4, 120) and where == "4 windows of single validation documents"
    for row in seqs:
        text = bytes(row.tolist()).decode()
        assert any(text in doc for doc in docs)  # inside one document: no EOD, a real substring
    seqs, where = eval_sequences(dm, 2, 500)  # longer than any document: the packed validation stream
    assert seqs.shape == (2, 500) and where.endswith("the packed validation stream")
    assert (seqs == 256).any()  # crosses document boundaries (EOD)


def test_run_length_report_from_datamodule(tmp_path):
    dm, _ = files_datamodule(tmp_path, [300] * 30, seq_len=8)
    res = run_length_report(tiny_model(vocab=257, double=False), dm, small_cfg(diagnostics=["loss_by_position"],
                            max_len=0, n_sequences=2), tmp_path / "r")
    js = json.loads((tmp_path / "r" / "loss_by_position.json").read_text())
    assert js["meta"]["eval_len"] == 128 and js["meta"]["train_len"] == 8  # 16 x data.seq_len
    assert js["meta"]["sequences"] == "2 windows of single validation documents"
    assert "last_bucket_over_train_half" in res["loss_by_position"]


def test_length_eval_callback_in_lightning_fit(tmp_path):
    cfg = Config(model=tiny_model(vocab=257, double=False).cfg, data=DataConfig(seq_len=8, batch_size=2),
                 trainer=TrainerConfig(max_steps=4), optim=OptimConfig(warmup_steps=0))
    module = HybridLMModule(cfg)
    rows = torch.randint(0, 257, (8, 9), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r[:-1], "labels": r[1:]} for r in rows]
    cb = LengthEvalCallback(small_cfg(diagnostics=["loss_by_position", "state_norms"], every_n_val=1),
                            sequences=torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(1)))
    trainer = Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=1,
                      logger=CSVLogger(str(tmp_path), name="csv", version=""), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                      default_root_dir=str(tmp_path), callbacks=[cb])
    trainer.fit(module, DataLoader(data, batch_size=2), DataLoader(data[:2], batch_size=2))
    # two validations (steps 2 and 4; the sanity check does not count) and the end of training
    assert cb.validations == 2 and [r["step"] for r in cb.reports] == [2, 4, 4]
    n_params = sum(p.numel() for p in module.model.parameters())
    for step in (2, 4):
        d = tmp_path / "length_eval" / f"step{step:07d}"
        assert (d / "loss_by_position.png").exists() and (d / "state_norms.csv").exists()
        # batches of 2 rows x 8 tokens: 16 training tokens per step
        assert json.loads((d / "progress.json").read_text()) == {
            "step": step, "train_tokens": 16 * step, "seq_len": 8, "parameters": n_params,
            "non_embedding_parameters": module.model.num_params(non_embedding=True)}
    assert "length_eval/state_norms/final_over_at_T" in read_csv(tmp_path / "csv" / "metrics.csv")[0]
    assert cb.state_dict() == {"validations": 2}


def test_length_eval_callback_setup_refuses_missing_sequences():
    cb = LengthEvalCallback(small_cfg(diagnostics=["passkey", "effrem"]))
    with pytest.raises(ValueError, match=r"^eval.diagnostics: \['effrem'\] need evaluation sequences"):
        cb.setup(SimpleNamespace(datamodule=None), None, "fit")
    synthetic = SimpleNamespace(cfg=DataConfig(source="synthetic"))
    with pytest.raises(ValueError, match=r"^eval.diagnostics: \['effrem'\] need validation text"):
        cb.setup(SimpleNamespace(datamodule=synthetic), None, "fit")
    LengthEvalCallback(small_cfg(diagnostics=["passkey", "copy"])).setup(SimpleNamespace(datamodule=None), None, "fit")


def test_length_eval_failure_does_not_stop_training(tmp_path, caplog):
    cfg = Config(model=tiny_model(vocab=257, double=False).cfg, data=DataConfig(seq_len=8, batch_size=2),
                 trainer=TrainerConfig(max_steps=2), optim=OptimConfig(warmup_steps=0))
    rows = torch.randint(0, 257, (4, 9), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r[:-1], "labels": r[1:]} for r in rows]
    cb = LengthEvalCallback(small_cfg(diagnostics=["passkey"], passkey_lengths=[10]))  # too short for a prompt
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                      callbacks=[cb])
    trainer.fit(HybridLMModule(cfg), DataLoader(data, batch_size=2))
    assert trainer.global_step == 2
    assert cb.reports[0]["error"].startswith("ValueError: eval.passkey_lengths: passkey: context_len=10")
    assert "length eval at step 2 failed" in caplog.text


@pytest.mark.slow
def test_real_wandb_offline(tmp_path):
    wb = WandbLogger(project="test", save_dir=str(tmp_path), offline=True)
    seqs = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    run_length_report(tiny_model(vocab=257, double=False), seqs, small_cfg(), tmp_path / "r", [wb], train_len=8)
    wb.finalize("success")
    files = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/length_eval/*.table.json"))
    assert {p.name.split("_")[0] for p in files} >= {"effrem", "passkey", "copy"}
