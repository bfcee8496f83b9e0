"""recall_stream: the streams mean what they claim (decoded here pair by pair with plain Python), are a pure function
of the seed, and go through the corpus paths: random windows, contiguous (TBTT) rows, evaluation sequences."""
import numpy as np
import pytest

from hybridlm.data import DataConfig, HybridDataModule
from hybridlm.data.recall_stream import answer_id_range, recall_streams
from hybridlm.eval import eval_sequences

K, V = 8, 5


def cfg(**kw) -> DataConfig:
    c = DataConfig(source="synthetic", seq_len=16, batch_size=4, **kw)
    c.synthetic.task = "recall_stream"
    c.synthetic.num_keys, c.synthetic.num_values = K, V
    c.synthetic.num_streams, c.synthetic.val_streams, c.synthetic.stream_len = 4, 2, 512
    return c


def decode(stream, window: int, p_set_range=(0.1, 0.5)) -> int:
    """Check one stream by walking its pairs; returns the number of GETs."""
    binding, last_set, gets = {}, {}, 0
    toks = [int(t) for t in stream]
    for j in range(len(toks) // 2):
        key_tok, val_tok = toks[2 * j], toks[2 * j + 1]
        if key_tok < K:  # SET: a fresh value in the SET-value range becomes the binding
            assert 2 * K <= val_tok < 2 * K + V
            binding[key_tok], last_set[key_tok] = val_tok - 2 * K, j
        else:  # GET: a key SET within the last `window` pairs, answered with its current binding
            k = key_tok - K
            assert 0 <= k < K and k in last_set
            assert j - last_set[k] <= window, (j, last_set[k])
            assert val_tok == 2 * K + V + binding[k]
            gets += 1
    frac_set = 1 - gets / (len(toks) // 2)
    assert p_set_range[0] < frac_set < p_set_range[1]
    return gets


def test_streams_decode_and_answers_are_in_their_own_range():
    streams = recall_streams(3, 2000, K, V, p_set=0.25, window=6, rng=np.random.default_rng(0))
    assert streams.shape == (3, 2000)
    for s in streams:
        assert decode(s, window=6) > 0
    lo, hi = 2 * K + V, 2 * K + 2 * V
    answers = streams[:, 1::2][streams[:, 0::2] >= K]
    assert ((answers >= lo) & (answers < hi)).all()
    assert not (streams[:, 0::2] >= lo).any()  # key slots never hold answer ids


def test_streams_are_deterministic_and_seeded():
    def gen(seed):
        return recall_streams(2, 400, K, V, 0.25, 6, np.random.default_rng(seed))

    assert np.array_equal(gen(1), gen(1))
    assert not np.array_equal(gen(1), gen(2))


def test_answer_range_matches_config():
    assert answer_id_range(cfg().synthetic) == (2 * K + V, 2 * K + 2 * V)


def test_random_windows_come_from_the_streams_and_default_window_is_half_seq_len():
    dm = HybridDataModule(cfg(seed=3), model_vocab_size=2 * K + 2 * V)
    dm.setup("fit")
    train = dm.corpus.train
    assert list(train.doc_starts) == [0, 512, 1024, 1536, 2048]
    for s in range(4):
        decode(train.tokens[train.doc_starts[s]:train.doc_starts[s + 1]], window=8)  # seq_len 16 -> D = 8 pairs
    b = dm.train_batch(0)
    assert b["input_ids"].shape == (4, 16)
    assert np.array_equal(b["input_ids"][:, 1:].numpy(), b["labels"][:, :-1].numpy())
    again = HybridDataModule(cfg(seed=3), model_vocab_size=2 * K + 2 * V)
    assert np.array_equal(again.train_batch(5)["input_ids"].numpy(), dm.train_batch(5)["input_ids"].numpy())
    other = HybridDataModule(cfg(seed=4), model_vocab_size=2 * K + 2 * V)
    assert not np.array_equal(other.train_batch(0)["input_ids"].numpy(), b["input_ids"].numpy())


def test_contiguous_rows_continue_across_batches():
    dm = HybridDataModule(cfg(stream_mode="contiguous"), model_vocab_size=2 * K + 2 * V)
    dm.setup("fit")
    tokens = dm.corpus.train.tokens.astype(np.int64)
    b0, b1 = dm.train_batch(0), dm.train_batch(1)
    for i in range(4):  # 4 rows over 4 streams of 512: row i reads stream i from its start
        row = np.concatenate([b0["input_ids"][i].numpy(), b1["input_ids"][i].numpy(), b1["labels"][i, -1:].numpy()])
        assert np.array_equal(row, tokens[512 * i:512 * i + 33])
    assert np.array_equal(b1["input_ids"][:, 0].numpy(), b0["labels"][:, -1].numpy())


def test_eval_sequences_are_windows_of_single_validation_streams():
    dm = HybridDataModule(cfg(), model_vocab_size=2 * K + 2 * V)
    seqs, where = eval_sequences(dm, 4, 200)
    assert seqs.shape == (4, 200) and "single validation documents" in where
    val = dm.corpus.val.tokens.astype(np.int64)
    train = dm.corpus.train.tokens.astype(np.int64)
    for row in seqs.numpy():
        hits = [s for s in range(2) for o in range(0, 512 - 200 + 1)
                if np.array_equal(val[512 * s + o:512 * s + o + 200], row)]
        assert len(hits) >= 1
    assert not np.array_equal(val[:512], train[:512])


def test_vocab_and_config_checks():
    with pytest.raises(ValueError, match="recall_stream uses"):
        HybridDataModule(cfg(), model_vocab_size=2 * K + 2 * V - 1)
    bad = cfg()
    bad.synthetic.stream_len = 101
    with pytest.raises(ValueError, match="^data.synthetic.stream_len"):
        bad.validate()


def test_key_gap_never_reuses_a_recent_key_and_default_streams_are_unchanged():
    gap, window = 5, 4
    streams = recall_streams(3, 3000, K, V, p_set=0.5, window=window, rng=np.random.default_rng(7), key_gap=gap)
    for s in streams:
        decode(s, window=window, p_set_range=(0.3, 0.8))
        last_set = {}
        for j, tok in enumerate(s[0::2].tolist()):
            if tok < K:  # a SET: this key was not SET in the previous `gap` pairs
                assert j - last_set.get(tok, -10**9) > gap, (j, tok, last_set[tok])
                last_set[tok] = j
        # every key is used: the gap restricts, it does not freeze the key set
        assert len(last_set) == K
    # key_gap=0 draws exactly what the generator drew before the option existed (same seed, same streams)
    plain = recall_streams(2, 400, K, V, 0.25, 6, np.random.default_rng(1))
    assert np.array_equal(plain, recall_streams(2, 400, K, V, 0.25, 6, np.random.default_rng(1), key_gap=0))
    bad = cfg()
    bad.synthetic.key_gap = K
    with pytest.raises(ValueError, match="^data.synthetic.key_gap"):
        bad.validate()
