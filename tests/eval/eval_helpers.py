from types import SimpleNamespace

import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from hybridlm.models import AttentionConfig, HybridLM, ModelConfig, SSMConfig


class RecordingWandb(WandbLogger):
    """A WandbLogger that records what it is asked to log instead of starting a W&B run (an offline run takes
    ~30 s to start here; test_report.py's test_real_wandb_offline does that once, marked slow)."""

    def __init__(self):
        super().__init__(project="test", offline=True)
        self.tables, self.images, self.metrics = {}, {}, {}

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables[key] = (columns, data, step)

    def log_image(self, key, images, step=None, **kwargs):
        self.images[key] = (images, step)

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def save(self):
        pass


def tiny_model(pattern="MAM", vocab=23, seed=0, double=True):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, layer_pattern=pattern, vocab_size=vocab,
                      ssm=SSMConfig(d_state=4, d_conv=4, expand=2, headdim=8, chunk_size=8),
                      attn=AttentionConfig(kind="swa", num_heads=2, window=6))
    model = HybridLM(cfg)
    with torch.no_grad():  # non-trivial dt / D / norms so the state matters
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return (model.double() if double else model).eval()


class HistoryLM(nn.Module):
    """Stand-in model for the decoding tasks: the state is the token history (b, t); `predict(history)` returns
    the next token. Logits are one-hot (10 for the prediction, 0 elsewhere)."""

    def __init__(self, vocab: int, predict):
        super().__init__()
        self.cfg = SimpleNamespace(vocab_size=vocab)
        self.predict = predict
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.calls = []  # lengths of the pieces it was fed

    def forward(self, ids, state=None):
        hist = ids if state is None else torch.cat([state, ids], 1)
        self.calls.append(ids.shape[1])
        b, l = ids.shape
        logits = torch.zeros(b, l, self.cfg.vocab_size)
        start = hist.shape[1] - l
        for r in range(b):
            for j in range(l):
                logits[r, j, self.predict(hist[r, :start + j + 1].tolist())] = 10.0
        return logits, hist


def induction(k: int):
    """Predict the token that followed the most recent earlier occurrence of the last k tokens (0 if none)."""
    def predict(h):
        key = h[-k:]
        for s in range(len(h) - k - 1, -1, -1):
            if h[s:s + k] == key:
                return h[s + k]
        return 0
    return predict


def copier(sep: int, shift: int = 0):
    """After the separator at index s, the token at index len - s - 1 (+ shift) is the next one to copy."""
    def predict(h):
        if sep not in h:
            return 0
        s = h.index(sep)
        i = len(h) - s - 1 + shift
        return h[i] if 0 <= i < len(h) else 0
    return predict


class CountLM(nn.Module):
    """logits = W @ counts of every token seen so far; state = the counts (b, V). Closed form for EffRem."""

    def __init__(self, W):
        super().__init__()
        self.W = nn.Parameter(W)  # (V, V)
        self.cfg = SimpleNamespace(vocab_size=W.shape[0])

    def forward(self, ids, state=None):
        V = self.W.shape[0]
        counts = torch.zeros(ids.shape[0], V, dtype=self.W.dtype) if state is None else state
        running = counts[:, None, :] + torch.nn.functional.one_hot(ids, V).to(self.W.dtype).cumsum(1)  # (b, l, V)
        return running @ self.W.T, running[:, -1]
