"""The Expansion Span experiment files (conf/experiment/sespan/) compose and run, shrunk, in-process through
hybridlm.runner: pretrain -> adapt (SE-Attn + HyLoRA from the pretrained checkpoint, length report at the end)
-> evaluate; `make repro-sespan` runs the jobs its script used to run and (slow) builds its table end to end; and
the reader's passkey geometry agrees with the prompts themselves."""
import csv
import fnmatch
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import CONF, REPO, TINY_MODEL, TWO_STEPS
from repro_helpers import VENV, effective, hydra_value, job_dir, make_commands, sweep_jobs

from hybridlm.checkpointing.io import load_checkpoint_file
from hybridlm.data.synthetic import passkey_prompt
from hybridlm.data.tokenizers import ByteTokenizer
from hybridlm.results.sespan import key_placement
from hybridlm.runner import evaluate, explicit_model_keys, train

FILES = sorted(p.stem for p in (CONF / "experiment" / "sespan").glob("*.yaml"))
# Passkey rows need room for the needle, question and answer (79 byte tokens), so rows are 96 tokens here.
TINY_SESPAN_MODEL = [*TINY_MODEL, "model.ssm.chunk_size=16", "model.attn.window=32"]
TINY_SESPAN_RUN = [*TWO_STEPS, "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "logger=csv"]
TINY_EVAL = ["eval.passkey_lengths=[96,192]", "eval.passkey_depths=[0.0,1.0]", "eval.passkey_samples=1",
             "eval.max_len=192", "eval.n_sequences=2", "eval.chunk_len=64", "eval.batch_size=2"]


def test_the_files_under_test_are_the_experiment():
    assert FILES == ["adapt", "eval", "pretrain"]


def test_pretrain_adapt_evaluate(tmp_path, compose_config):
    pre_cfg = compose_config("train", ["+experiment=sespan/pretrain", *TINY_SESPAN_MODEL, *TINY_SESPAN_RUN,
                                       "data.seq_len=96"])
    assert pre_cfg.model.layer_pattern == "MMAM" and pre_cfg.model.attn.kind == "swa"
    assert pre_cfg.data.mix_prob > 0 and pre_cfg.data.synthetic.task == "passkey"
    pre = train(pre_cfg, tmp_path / "pretrain", set())
    assert Path(pre["checkpoint"]).is_file() and torch.isfinite(torch.tensor(pre["metrics"]["train/loss"]))

    # Adaptation: the architecture (d_model 32) comes from the checkpoint, not from the composed default (128);
    # the attention kind and its sizes are explicit overrides, as on the command line.
    se = ["model/attention=se_attn", "model.attn.window=32", "model.attn.block_size=8", "model.attn.top_k=2",
          "model.attn.query_chunk=16"]
    overrides = ["+experiment=sespan/adapt", f"init_from={pre['checkpoint']}", *se, "adapter=hylora",
                 *TINY_SESPAN_RUN, "data.seq_len=96", *TINY_EVAL]
    adapt_cfg = compose_config("train", overrides)
    assert adapt_cfg.model.d_model == 128 and adapt_cfg.eval.at_fit_end
    adapted = train(adapt_cfg, tmp_path / "adapt", explicit_model_keys(overrides))
    stored = load_checkpoint_file(adapted["checkpoint"])
    model_cfg = stored["hyper_parameters"]["cfg"]["model"]
    assert model_cfg["d_model"] == 32 and model_cfg["attn"]["kind"] == "se_attn" and model_cfg["attn"]["top_k"] == 2
    assert stored["hyper_parameters"]["cfg"]["adapter"]["name"] == "hylora"
    lora = [k for k in stored["state_dict"] if ".lora_A." in k]
    assert any(".layers.2.mixer." in k for k in lora) and any(".layers.0.mixer." in k for k in lora)  # A and M
    passkey = json.loads(next((tmp_path / "adapt" / "length_eval").glob("step*/passkey.json")).read_text())
    assert [r[:2] for r in passkey["rows"]] == [[96, 0.0], [96, 1.0], [192, 0.0], [192, 1.0]]

    ev_overrides = ["+experiment=sespan/eval", f"ckpt_path={adapted['checkpoint']}", *TINY_EVAL,
                    "trainer.enable_progress_bar=false"]
    result = evaluate(compose_config("evaluate", ev_overrides), tmp_path / "eval", ev_overrides)
    assert 0.0 <= result["metrics"]["length_eval/passkey/mean_accuracy"] <= 1.0
    per_position = (Path(result["report"]) / "loss_by_position_per_position.csv").read_text().splitlines()
    assert len(per_position) == 1 + 191  # header + one row per position of a 192-token window


@pytest.mark.parametrize("window", [128, 300])
def test_key_placement_matches_the_prompt_text(window):
    """Reference: find the needle sentence in the decoded prompt and classify its digits by hand."""
    where = key_placement(window, digits=5)
    tok = ByteTokenizer()
    for n in (256, 512, 1024):
        for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
            text = tok.decode(passkey_prompt(tok, n, depth, key=12345).input_ids)
            first = text.index("The pass key is 12345") + len("The pass key is")  # the space before the digits
            last = first + len(" 12345") - 1
            visible = range(n - window, n)  # keys seen by the query at n-1 (the last prompt token)
            expected = ("within" if first in visible and last in visible
                        else "beyond" if last < visible.start else "partial")
            assert where(n, depth) == expected, (n, depth)


# What scripts/repro_sespan.py ran before `make repro-sespan` became Hydra runs. Attention variants (model overrides
# on the pretrained checkpoint), in its order; adapters; the variants the pretrained model was evaluated with.
OLD_VARIANTS = {"swa": ["model/attention=swa"], "full": ["model/attention=full"], "s2": ["model/attention=s2"],
                "se_attn": ["model/attention=se_attn"],
                "se_attn_c16": ["model/attention=se_attn", "model.attn.query_chunk=16"]}
OLD_ADAPTERS = ["lora_plus", "hylora"]
OLD_ZERO_SHOT = ["swa", "full", "se_attn", "se_attn_c16"]
CPUS = os.cpu_count() or 1
HALF = max(1, CPUS // 2)  # its jobs after pretraining: two at a time, cpu_count // 2 threads each


def old_adapt(ckpt, kind, adapter):
    return ["+experiment=sespan/adapt", f"init_from={ckpt}", *OLD_VARIANTS[kind], f"adapter={adapter}", "logger=csv",
            "eval.at_fit_end=false", "trainer.enable_progress_bar=false"]


def old_eval(ckpt, model=()):
    return ["+experiment=sespan/eval", f"ckpt_path={ckpt}", *model, "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """{stage: [commands]} of `make repro-sespan` with its runs in a temporary folder, and that folder."""
    runs = tmp_path_factory.mktemp("sespan")
    by_stage = {}
    for command in make_commands("repro-sespan", SESPAN_RUNS=str(runs)):
        stage = command.args[0].removeprefix("+experiment=sespan/repro/") if command.module != "hybridlm.results" \
            else "results"
        by_stage.setdefault(stage, []).append(command)
    return by_stage, runs


def test_make_repro_sespan_pretrains_as_the_old_script(stages):
    by_stage, runs = stages
    (pre,) = by_stage["pretrain"]
    assert pre.module == "hybridlm.train" and not pre.multirun and pre.env["OMP_NUM_THREADS"] == str(CPUS)
    (job,) = sweep_jobs(pre)
    assert effective("train", job) == effective("train", ["+experiment=sespan/pretrain", "logger=csv",
                                                          "trainer.enable_progress_bar=false"])
    assert job_dir(pre, job) == runs / "pretrain"


def test_make_repro_sespan_adapts_as_the_old_script(stages):
    by_stage, runs = stages
    ckpt = runs / "pretrain" / "checkpoints" / "last.ckpt"
    commands = by_stage["adapt"]
    assert all(c.module == "hybridlm.train" and c.multirun and c.env["OMP_NUM_THREADS"] == str(HALF)
               and hydra_value(c, c.args, "launcher.n_jobs") == 2 for c in commands)
    jobs = [(c, job) for c in commands for job in sweep_jobs(c)]
    expected = [(kind, adapter) for kind in OLD_VARIANTS for adapter in OLD_ADAPTERS]
    assert len(jobs) == len(expected)
    for (_, job), (kind, adapter) in zip(jobs, expected):
        assert effective("train", job) == effective("train", old_adapt(ckpt, kind, adapter)), (kind, adapter)
    # The directories scripts/diagnose_sespan.py reads: adapt/<kind>+<adapter>
    assert [job_dir(c, job) for c, job in jobs[:8]] == [runs / "adapt" / f"{k}+{a}" for k, a in expected[:8]]


def adapted_checkpoints(by_stage):
    return sorted(str(job_dir(c, job) / "checkpoints" / "last.ckpt")
                  for c in by_stage["adapt"] for job in sweep_jobs(c))


def test_make_repro_sespan_evaluates_as_the_old_script(stages):
    by_stage, runs = stages
    (adapted,) = by_stage["eval"]
    assert adapted.module == "hybridlm.evaluate" and adapted.env["OMP_NUM_THREADS"] == str(HALF)
    assert hydra_value(adapted, adapted.args, "launcher.n_jobs") == 2
    # The shell lists the checkpoints the adaptation wrote (ls sorts them) and nothing else.
    (listed,) = [a.removeprefix("ckpt_path=") for a in adapted.args if a.startswith("ckpt_path=")]
    ckpts = adapted_checkpoints(by_stage)
    pretrained = runs / "pretrain" / "checkpoints" / "last.ckpt"
    assert all(fnmatch.fnmatch(c, listed) for c in ckpts) and not fnmatch.fnmatch(str(pretrained), listed)
    adapted.args = [a if not a.startswith("ckpt_path=") else "ckpt_path=" + ",".join(ckpts) for a in adapted.args]
    jobs = sweep_jobs(adapted)
    assert [effective("evaluate", job) for job in jobs] == [effective("evaluate", old_eval(c)) for c in ckpts]

    zero_shot = by_stage["zero_shot"]
    assert all(c.module == "hybridlm.evaluate" and c.env["OMP_NUM_THREADS"] == str(HALF) for c in zero_shot)
    jobs = [job for c in zero_shot for job in sweep_jobs(c)]
    assert [effective("evaluate", job) for job in jobs] == [
        effective("evaluate", old_eval(pretrained, OLD_VARIANTS[kind])) for kind in OLD_ZERO_SHOT]


def test_make_repro_sespan_times_each_adapted_model_alone(stages):
    """The old script timed a step of the model that `+experiment=sespan/adapt init_from=... <variant>
    adapter=<recipe>` builds, on batches of its shape, one configuration at a time, with cpu_count // 2 threads."""
    by_stage, runs = stages
    ckpt = runs / "pretrain" / "checkpoints" / "last.ckpt"
    commands = by_stage["timing"]
    assert all(c.module == "hybridlm.train" and c.env["OMP_NUM_THREADS"] == str(HALF)
               and hydra_value(c, c.args, "launcher.n_jobs") == 1 for c in commands)
    jobs = [job for c in commands for job in sweep_jobs(c)]
    expected = [(kind, adapter) for kind in OLD_VARIANTS for adapter in OLD_ADAPTERS]
    assert len(jobs) == len(expected)
    for job, (kind, adapter) in zip(jobs, expected):
        new = effective("train", job)
        # The old adaptation job's overrides add only logging and evaluation settings to the timed configuration.
        old = effective("train", old_adapt(ckpt, kind, adapter))
        assert new["explicit model keys"] == old["explicit model keys"]
        for key in ("model", "adapter", "init_from", "optim"):
            assert new["config"][key] == old["config"][key], (kind, adapter, key)
        for key in ("seq_len", "batch_size"):
            assert new["config"]["data"][key] == old["config"]["data"][key]
        assert new["config"]["trainer"]["max_steps"] == 6 and new["config"]["trainer"]["log_every_n_steps"] == 1


def test_make_repro_sespan_ends_with_the_reader(stages):
    by_stage, runs = stages
    (reader,) = by_stage["results"]
    assert reader.args[:4] == ["sespan", str(runs), "--out", "results/sespan"]


# Small enough to run in a test: a tiny pretrained model, 3 adaptation steps at 256 tokens (hylora only), a small
# evaluation grid, evaluated to 512 tokens.
E2E_PRETRAIN_ARGS = " ".join([*TINY_MODEL, "model.ssm.chunk_size=16", *TWO_STEPS])
E2E_ADAPT_ARGS = ("adapter=hylora data.seq_len=256 data.val_batches=1 trainer.max_steps=3 "
                  "trainer.val_check_interval=3 trainer.limit_val_batches=1")
E2E_EVAL_ARGS = ("'eval.passkey_lengths=[192,256]' 'eval.passkey_depths=[0.0,1.0]' eval.passkey_samples=1 "
                 "eval.max_len=512 eval.n_sequences=2 eval.chunk_len=256 eval.batch_size=2 trainer.limit_val_batches=1")


@pytest.mark.slow
def test_make_repro_sespan_end_to_end(tmp_path):
    """The real target, shrunk through its stage variables: every stage's Hydra runs, then the reader's table,
    checked against the jobs' own files."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    stage_args = [f"PRETRAIN_ARGS={E2E_PRETRAIN_ARGS}", f"ADAPT_ARGS={E2E_ADAPT_ARGS}", f"EVAL_ARGS={E2E_EVAL_ARGS}"]
    proc = subprocess.run(["make", "repro-sespan", f"VENV={VENV}", f"SESPAN_RUNS={runs}", f"SESPAN_OUT={out}",
                           *stage_args], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "FAILED" not in table
    rows = {(r["attention"], r["adapter"]): r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(rows) == {(k, "none (pretrained)") for k in OLD_ZERO_SHOT} | {(k, "hylora") for k in OLD_VARIANTS}

    row = rows[("se_attn_c16", "hylora")]
    adapt_dir = runs / "adapt_c16" / "se_attn+hylora"
    result = json.loads((adapt_dir / "result.json").read_text())
    assert row["peak_rss_mb"] == result["resources"]["peak_rss_mb"] and result["resources"]["threads"] == HALF
    evals = [json.loads(p.read_text()) for p in (runs / "eval").glob("*/result.json")]
    (eval_result,) = [r for r in evals if f"ckpt_path={adapt_dir / 'checkpoints' / 'last.ckpt'}" in r["overrides"]]
    passkey = json.loads((Path(eval_result["out_dir"]) / "length_eval" / "passkey.json").read_text())
    assert [[c["context_len"], c["depth"], c["accuracy"]] for c in row["passkey_cells"]] == passkey["rows"]
    with open(runs / "timing_c16" / "se_attn+hylora" / "csv" / "metrics.csv") as f:
        rates = [float(r["train/tokens_per_s"]) for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    assert row["step_seconds_isolated"] == round(min(2 * 256 / r for r in rates), 4)
    line = next(line for line in table.splitlines() if line.startswith("| se_attn_c16 | hylora |"))
    assert line.endswith(f"| {row['step_seconds_isolated']:.2f} | {result['resources']['peak_rss_mb']:.0f} |")
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert (meta["parallel"], meta["threads"], meta["eval_len"], meta["adapt_len"]) == (2, HALF, 512, 256)
    assert (out / "figure.png").stat().st_size > 0
