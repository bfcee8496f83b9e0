"""Every file under conf/experiment/ composes into a valid config and trains a couple of steps; `make
repro-lengthgen` runs the baseline's seeds and the post-training of each, and end to end (slow) builds its table."""
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import CONF, TINY_MODEL, TWO_STEPS, compose_config
from repro_helpers import VENV, effective, hydra_value, job_dir, make_commands, sweep_jobs

from hybridlm.config import to_config
from hybridlm.runner import train

# The files `make repro-*` runs (*/repro.yaml, */repro/*.yaml) add launcher and logging settings to the files they
# include; their jobs are composed and compared with those files' jobs in test_make_repro_* below.
# The files of a `task/` folder are parts of experiments (the failure map's axis), not experiments.
EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix(""))
                     for p in (CONF / "experiment").rglob("*.yaml")
                     if "repro" not in (p.stem, p.parent.name) and p.parent.name != "task")
# Shrink whatever the experiment sets, keeping its structure (layer pattern, intervention, data mode, adapter).
# compile=false: torch.compile of two steps would cost a minute (tests/test_compile_step.py tests it).
TINY = [*TINY_MODEL, "model.ssm.chunk_size=16", "data.seq_len=32", *TWO_STEPS, "trainer.enable_progress_bar=false",
        "logger=csv", "eval.every_n_val=0", "eval.at_fit_end=false", "checkpoint.save_best=false", "compile=false"]
# Experiments that continue a trained model (`required: [init_from]`), and the experiment that trains it.
STARTS_FROM = {"lengthgen/post_train": "lengthgen/baseline", "sespan/adapt": "sespan/pretrain",
               "lengthgen/mamba2_370m": "lengthgen/passkey"}
# Experiments for a GPU and a hub dataset (neither here): trained on the CPU and the stdlib corpus, the rest as is.
OFFLINE = ["data=stdlib", "data.streaming=false", "data.max_documents=0", "trainer=default"]


def compose_experiment(name, extra=()):
    cfg = compose_config("train", [f"+experiment={name}", *TINY, *extra])
    if cfg.data.source == "hub":
        cfg = compose_config("train", [f"+experiment={name}", *TINY, *OFFLINE, *extra])
    syn = cfg.data.synthetic
    if syn.task == "passkey" and (cfg.data.source == "synthetic" or cfg.data.mix_prob > 0):
        # passkey rows need room for the needle, question and answer (79 byte tokens): rows of 96 here
        cfg = compose_config("train", [f"+experiment={name}", *TINY, "data.seq_len=96", *extra])
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
    from_file = to_config(compose_config("train", [f"+experiment=lengthgen/{arm}"]))
    from_sweep = to_config(compose_config("train", ["+experiment=lengthgen/sweep",
                                                    f"intervention={LENGTHGEN_ARMS[arm]}"]))
    assert from_file == from_sweep
    assert from_file.data.stream_mode == ("contiguous" if arm == "tbtt" else "random")
    assert from_file.intervention.name == LENGTHGEN_ARMS[arm] and from_file.intervention.sigma == 0.1


def test_an_explicit_stream_mode_is_kept_and_checked():
    cfg = compose_config("train", ["+experiment=lengthgen/sweep", "intervention=tbtt", "data.stream_mode=random"])
    with pytest.raises(ValueError, match="^data.stream_mode: intervention=tbtt needs data.stream_mode=contiguous"):
        to_config(cfg)


def test_make_repro_lengthgen_pretrains_three_seeds_then_post_trains_each_with_every_intervention(tmp_path):
    """Stage 1 is the baseline for seeds 0-2; stage 2 is post_train for every intervention x seed, each job reading
    the checkpoint its own seed's pretraining wrote (init_from interpolates ${seed})."""
    runs = tmp_path / "runs"
    pretrain, post, reader = make_commands("repro-lengthgen", LENGTHGEN_RUNS=str(runs))
    assert (pretrain.multirun, post.multirun, reader.module) == (True, True, "hybridlm.results")
    assert pretrain.env["OMP_NUM_THREADS"] == post.env["OMP_NUM_THREADS"] == "1"
    assert hydra_value(pretrain, pretrain.args, "launcher.n_jobs") == 2
    jobs = sweep_jobs(pretrain)
    assert [effective("train", job) for job in jobs] == [
        effective("train", ["+experiment=lengthgen/baseline", f"seed={s}", "logger=csv"]) for s in range(3)]
    assert [job_dir(pretrain, job) for job in jobs] == [runs / "pretrain" / f"seed{s}" for s in range(3)]
    arms = ["none", "random_noise", "fitted_noise", "state_passing", "tbtt"]
    jobs = sweep_jobs(post)
    assert len(jobs) == 15
    for job, (arm, seed) in zip(jobs, [(a, s) for a in arms for s in range(3)]):
        ckpt = runs / "pretrain" / f"seed{seed}" / "checkpoints" / "last.ckpt"
        got = effective("train", job)
        assert got == effective("train", ["+experiment=lengthgen/post_train", f"intervention={arm}", f"seed={seed}",
                                          "logger=csv", f"init_from={ckpt}"])
        assert got["config"]["init_from"] == str(ckpt) and got["config"]["data"]["seed"] == seed
        assert job_dir(post, job) == runs / "post_train" / f"{arm}+seed{seed}"
    assert reader.args[:2] == ["lengthgen", str(runs)]


def test_make_repro_lengthgen_passes_args_to_both_stages_and_post_args_to_the_second(tmp_path):
    pretrain, post, _ = make_commands("repro-lengthgen", LENGTHGEN_RUNS=str(tmp_path), ARGS="seed=3",
                                      POST_ARGS="intervention=none,tbtt")
    assert [effective("train", j)["config"]["seed"] for j in sweep_jobs(pretrain)] == [3]
    assert [(effective("train", j)["config"]["intervention"]["name"], effective("train", j)["config"]["seed"])
            for j in sweep_jobs(post)] == [("none", 3), ("tbtt", 3)]


# Small enough to run in a test: tiny streams, two training steps, a 4x-T length report.
TINY_LENGTHGEN = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                  "data.val_batches=1", "data.synthetic.num_streams=4", "data.synthetic.val_streams=2",
                  "data.synthetic.stream_len=4096", "eval.max_len=256", "eval.n_sequences=4", "eval.batch_size=4"]


@pytest.mark.slow
def test_make_repro_lengthgen_end_to_end(tmp_path):
    """The real target, shrunk through ARGS: one seed pretrained, post-trained with two interventions, then the
    reader's table from their files."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = " ".join(["seed=0", *TINY_LENGTHGEN])
    proc = subprocess.run(["make", "repro-lengthgen", f"VENV={VENV}", f"LENGTHGEN_RUNS={runs}",
                           f"LENGTHGEN_OUT={out}", f"ARGS={args}", "POST_ARGS=intervention=none,tbtt"],
                          cwd=CONF.parent, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline"}, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [a["arm"] for a in results["arms"]] == ["pretrained", "none", "tbtt"]
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == f'Command: `make repro-lengthgen ARGS="{args}" POST_ARGS="intervention=none,tbtt"`'
    for job, arm in ((runs / "pretrain" / "seed0", "pretrained"), (runs / "post_train" / "none+seed0", "none"),
                     (runs / "post_train" / "tbtt+seed0", "tbtt")):
        usage = json.loads((job / "result.json").read_text())["resources"]
        assert usage["threads"] == 1 and usage["peak_rss_since"] == "job start" and usage["peak_rss_mb"] > 100
        assert (out / "logs" / f"{arm}_seed0.log").read_text() == (job / "train.log").read_text()
    assert (out / "figure.png").stat().st_size > 0
