"""The chunk sizes the paper's SE-Attn draws in training (torch's global CPU generator, reseeded per batch by the
RunStateCallback) survive a resume: an in-process run resumed from its step-4 checkpoint draws, at every later
step and in every SE-Attn layer, the sizes the uninterrupted run drew."""
from helpers import train_in_process
from lightning.pytorch.callbacks import Callback

SE_ATTN = ["model/attention=se_attn", "model.layer_pattern=MAMA", "model.attn.chunk_sizes=[4,8,16]",
           "model.attn.block_size=4", "model.attn.top_k=2"]


class RecordChunkSizes(Callback):
    """The chunk size each attention layer used in each training step."""

    def __init__(self):
        self.sizes = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = pl_module.model.attention_layers()
        self.sizes[trainer.global_step - 1] = tuple(m.last_chunk_size for _, m in layers)


def test_a_resumed_run_draws_the_same_chunk_sizes(tmp_path, monkeypatch):
    common = [*SE_ATTN, "trainer.max_steps=8", "checkpoint.every_n_steps=4", "trainer.val_check_interval=4"]
    full = RecordChunkSizes()
    train_in_process(tmp_path / "full", common, monkeypatch, [full])
    monkeypatch.undo()
    resumed = RecordChunkSizes()
    ckpt = tmp_path / "full" / "checkpoints" / "step000004.ckpt"
    train_in_process(tmp_path / "resumed", [*common, f"resume={ckpt}"], monkeypatch, [resumed])
    assert sorted(full.sizes) == list(range(8)) and sorted(resumed.sizes) == [4, 5, 6, 7]
    assert all(resumed.sizes[s] == full.sizes[s] for s in resumed.sizes)
    drawn = [m for sizes in full.sizes.values() for m in sizes]
    assert set(drawn) <= {4, 8, 16} and len(set(drawn)) > 1  # drawn from the set, not one fixed size
    assert len(set(full.sizes.values())) > 1  # the draws change from step to step
