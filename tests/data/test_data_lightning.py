"""With a real Lightning Trainer: the checkpoint holds the datamodule's {"next_batch": n} and a run resumed
from it continues with batch n (also across an epoch boundary), while validation batches do not count."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from hybridlm.data import DataConfig, HybridDataModule


class Toy(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(257, 8)
        self.head = torch.nn.Linear(8, 257)
        self.seen: list[tuple[int, torch.Tensor]] = []
        self.val_seen: list[int] = []
        self.epochs: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((int(batch["batch_index"]), batch["input_ids"].clone()))
        self.epochs.append(self.current_epoch)
        logits = self.head(self.emb(batch["input_ids"]))
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    def validation_step(self, batch, batch_idx):
        self.val_seen.append(int(batch["batch_index"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(max_steps: int, root) -> L.Trainer:
    # a checkpoint every 3 steps, taken in the middle of the 4-batch epoch
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(root), every_n_train_steps=3, save_top_k=-1)
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=[ckpt],
                     enable_progress_bar=False, enable_model_summary=False, val_check_interval=2,
                     num_sanity_val_steps=0, default_root_dir=str(root))


def test_checkpoint_resume_continues_the_stream(tmp_path, helpers, jsonl_corpus):
    path = jsonl_corpus(helpers.random_docs(60, 200, 400, seed=5))
    cfg = DataConfig(source="files", paths=[path], seq_len=16, batch_size=2, val_fraction=0.2, val_batches=2,
                     batches_per_epoch=4)
    dm, model = HybridDataModule(cfg, model_vocab_size=257), Toy()
    trainer = _trainer(3, tmp_path)
    trainer.fit(model, datamodule=dm)
    assert [k for k, _ in model.seen] == [0, 1, 2]
    assert model.val_seen == [0, 1]  # validation ran after step 2 and did not move the cursor
    assert dm.state_dict() == {"next_batch": 3}
    ckpt = tmp_path / "epoch=0-step=3.ckpt"
    assert torch.load(str(ckpt), weights_only=False)["HybridDataModule"] == {"next_batch": 3}

    fresh_dm, fresh = HybridDataModule(cfg, model_vocab_size=257), Toy()
    resumed = _trainer(7, tmp_path / "resumed")
    resumed.fit(fresh, datamodule=fresh_dm, ckpt_path=str(ckpt))
    assert [k for k, _ in fresh.seen] == [3, 4, 5, 6]
    assert fresh.epochs == [0, 1, 1, 1]  # epoch 0 is batches 0..3, epoch 1 is 4..7: aligned after the resume
    for k, inputs in fresh.seen:
        torch.testing.assert_close(inputs, dm.train_batch(k)["input_ids"])
    assert fresh_dm.state_dict() == {"next_batch": 7}
