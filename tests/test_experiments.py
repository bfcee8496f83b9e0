"""Every file under conf/experiment/ composes into a valid config and trains a couple of steps."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from hybridlm.config import register_configs, to_config
from hybridlm.runner import train

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix(""))
                     for p in (CONF / "experiment").rglob("*.yaml"))
# Shrink whatever the experiment sets, keeping its structure (layer pattern, intervention, data mode, adapter).
TINY = ["model.d_model=32", "model.ssm.d_state=16", "model.ssm.headdim=16", "model.ssm.chunk_size=16",
        "data.seq_len=32", "data.batch_size=2", "data.val_batches=1", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        "logger=csv", "eval.every_n_val=0", "eval.at_fit_end=false", "checkpoint.save_best=false"]
# Experiments that continue a trained model (`required: [init_from]`), and the experiment that trains it.
STARTS_FROM = {"lengthgen/post_train": "lengthgen/baseline", "sespan/adapt": "sespan/pretrain"}


def compose_experiment(name, extra=()):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={name}", *TINY, *extra])
        syn = cfg.data.synthetic
        if syn.task == "passkey" and (cfg.data.source == "synthetic" or cfg.data.mix_prob > 0):
            # passkey rows need room for the needle, question and answer (79 byte tokens): rows of 96 here
            cfg = compose("train", overrides=[f"+experiment={name}", *TINY, "data.seq_len=96", *extra])
        return cfg


def test_there_are_experiments():
    assert any(e.startswith("lengthgen/") for e in EXPERIMENTS) and any(e.startswith("sespan/") for e in EXPERIMENTS)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """The last.ckpt of an experiment trained for two steps, trained once per module."""
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name.replace("/", "_"))
            done[name] = train(compose_experiment(name), out / "run", set())["checkpoint"]
        return done[name]
    return get


def test_experiments_that_continue_a_model_refuse_to_start_without_one():
    assert {e for e in EXPERIMENTS if "init_from" in compose_experiment(e).required} == set(STARTS_FROM)
    for name in STARTS_FROM:
        with pytest.raises(ValueError, match=r"^init_from: experiment '\w+' needs it; set init_from=\.\.\."):
            to_config(compose_experiment(name))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_trains_two_steps(name, tmp_path, trained_checkpoint):
    start = [f"init_from={trained_checkpoint(STARTS_FROM[name])}"] if name in STARTS_FROM else []
    cfg = compose_experiment(name, start)
    result = train(cfg, tmp_path / "run", set())
    assert Path(result["checkpoint"]).is_file()
    if cfg.adapter.name not in ("none", "full"):  # adapter runs also save the adapter alone, and it loads back
        from hybridlm.adapters import read_adapter_config
        assert read_adapter_config(result["adapter"]).name == cfg.adapter.name
    assert result["metrics"]["train/loss"] == result["metrics"]["train/loss"]  # finite, not NaN


# The arm files of conf/experiment/lengthgen/ and the intervention each one is.
LENGTHGEN_ARMS = {"baseline": "none", "random_noise": "random_noise", "fitted_noise": "fitted_noise",
                  "state_passing": "state_passing", "tbtt": "tbtt"}


@pytest.mark.parametrize("arm", list(LENGTHGEN_ARMS))
def test_a_lengthgen_arm_file_is_the_sweep_with_its_intervention(arm):
    """`+experiment=lengthgen/sweep intervention=X` (the sweep's jobs) trains exactly what the arm file does;
    tbtt gets its contiguous rows from data.stream_mode=auto, the others random windows."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        from_file = to_config(compose("train", overrides=[f"+experiment=lengthgen/{arm}"]))
        from_sweep = to_config(compose("train", overrides=["+experiment=lengthgen/sweep",
                                                           f"intervention={LENGTHGEN_ARMS[arm]}"]))
    assert from_file == from_sweep
    assert from_file.data.stream_mode == ("contiguous" if arm == "tbtt" else "random")
    assert from_file.intervention.name == LENGTHGEN_ARMS[arm] and from_file.intervention.sigma == 0.1


def test_an_explicit_stream_mode_is_kept_and_checked():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=lengthgen/sweep", "intervention=tbtt",
                                          "data.stream_mode=random"])
    with pytest.raises(ValueError, match="^data.stream_mode: intervention=tbtt needs data.stream_mode=contiguous"):
        to_config(cfg)
