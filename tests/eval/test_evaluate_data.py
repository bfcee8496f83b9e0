"""Which data `python -m hybridlm.evaluate` evaluates a checkpoint on: the data it was trained on (from the
checkpoint's run config), with the data.* keys given on the command line on top; a data file chosen on the command
line (data=...) replaces it whole."""
import pytest
from hydra import compose, initialize_config_dir

from hybridlm import runner
from hybridlm.config import register_configs

RUN = ["data=mqar", "data.seq_len=32", "data.batch_size=2", "data.val_batches=1", "model.d_model=32",
       "model.ssm.d_state=16", "model.ssm.headdim=16", "model.attn.window=16", "trainer.max_steps=1",
       "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
       "logger=csv"]


def compose_cfg(name, overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(runner.CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    return runner.train(compose_cfg("train", RUN), out / "run", explicit_keys=set())["checkpoint"]


@pytest.mark.parametrize("extra, source, task, seq_len", [
    ([], "synthetic", "mqar", 32),  # as trained
    (["data.seq_len=64"], "synthetic", "mqar", 64),  # the trained task at another length
    (["data=stdlib", "data.seq_len=48"], "stdlib", None, 48),  # another data file: the user's, whole
])
def test_evaluate_uses_the_checkpoint_data_with_the_given_keys_on_top(ckpt, tmp_path, monkeypatch, extra, source,
                                                                       task, seq_len):
    seen = []
    build = runner.build_datamodule
    monkeypatch.setattr(runner, "build_datamodule", lambda cfg, *a, **k: seen.append(cfg.data) or build(cfg, *a, **k))
    overrides = [f"ckpt_path={ckpt}", "eval=default", "logger=csv", "trainer.enable_progress_bar=false", *extra]
    runner.evaluate(compose_cfg("evaluate", overrides), tmp_path / "eval", overrides)
    (data,) = seen
    assert (data.source, data.seq_len) == (source, seq_len)
    if task:
        assert data.synthetic.task == task
