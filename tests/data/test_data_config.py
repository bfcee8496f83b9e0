"""DataConfig.validate(): every bad value raises ValueError whose message starts with the offending key."""
from __future__ import annotations

import pytest

from hybridlm.data import DataConfig, HybridDataModule, SyntheticConfig


@pytest.mark.parametrize("kwargs, prefix", [
    (dict(seq_len=0), "data.seq_len: must be > 0"),
    (dict(seq_len=-5), "data.seq_len: must be > 0"),
    (dict(batch_size=0), "data.batch_size: must be > 0"),
    (dict(val_fraction=1.0), "data.val_fraction: must be in [0, 1)"),
    (dict(val_fraction=-0.1), "data.val_fraction: must be in [0, 1)"),
    (dict(source="web"), "data.source: unknown source 'web'"),
    (dict(stream_mode="sorted"), "data.stream_mode: unknown stream_mode 'sorted'"),
    (dict(synthetic=SyntheticConfig(task="sort")), "data.synthetic.task: unknown task 'sort'"),
    (dict(mix_prob=1.5), "data.mix_prob: must be in [0, 1]"),
    (dict(source="files"), "data.paths: source=files needs at least one path"),
    (dict(source="hub"), "data.hub_name: source=hub needs a dataset name"),
    (dict(stream_mode="contiguous", pack=False), "data.pack:"),
    (dict(stream_mode="contiguous", mix_prob=0.1), "data.mix_prob:"),
    (dict(source="synthetic", stream_mode="contiguous"), "data.stream_mode:"),
    (dict(source="synthetic", seq_len=14, synthetic=SyntheticConfig(task="mqar", num_kv_pairs=4)),
     "data.synthetic.num_kv_pairs: 4 pairs need 4*4=16 tokens"),
    (dict(source="synthetic", seq_len=16, synthetic=SyntheticConfig(task="copy", copy_len=9)),
     "data.synthetic.copy_len:"),
    (dict(text_sample_by="word"), "data.text_sample_by: unknown value 'word'"),
    (dict(val_batches=-1), "data.val_batches: must be >= 0"),
])
def test_validate_names_the_key(kwargs, prefix):
    with pytest.raises(ValueError) as err:
        DataConfig(**kwargs).validate()
    assert str(err.value).startswith(prefix), str(err.value)


def test_defaults_are_valid_and_datamodule_validates():
    DataConfig().validate()
    DataConfig(source="synthetic", seq_len=64).validate()
    with pytest.raises(ValueError, match=r"^data\.seq_len: must be > 0"):
        HybridDataModule(DataConfig(seq_len=0))
