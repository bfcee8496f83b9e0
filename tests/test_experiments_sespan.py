"""The Expansion Span experiment files (conf/experiment/sespan/) compose and run, shrunk, in-process through
hybridlm.runner: pretrain -> adapt (SE-Attn + HyLoRA from the pretrained checkpoint, length report at the end)
-> evaluate; `make repro-sespan` runs the paper's protocol (issue 12) job by job and (slow) builds its tables end to
end; and the reader's needle geometry agrees with the prompts themselves."""
import csv
import fnmatch
import json
import math
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
    se = ["model/attention=se_attn", "model.attn.chunk_sizes=[32,64]", "model.attn.block_size=8",
          "model.attn.top_k=2"]
    overrides = ["+experiment=sespan/adapt", f"init_from={pre['checkpoint']}", *se, "adapter=hylora",
                 *TINY_SESPAN_RUN, "data.seq_len=96", *TINY_EVAL]
    adapt_cfg = compose_config("train", overrides)
    assert adapt_cfg.model.d_model == 128 and adapt_cfg.eval.at_fit_end
    adapted = train(adapt_cfg, tmp_path / "adapt", explicit_model_keys(overrides))
    stored = load_checkpoint_file(adapted["checkpoint"])
    model_cfg = stored["hyper_parameters"]["cfg"]["model"]
    assert model_cfg["d_model"] == 32 and model_cfg["attn"]["kind"] == "se_attn" and model_cfg["attn"]["top_k"] == 2
    adapter = stored["hyper_parameters"]["cfg"]["adapter"]
    assert (adapter["name"], adapter["r"], adapter["alpha"]) == ("hylora", 32, 64)  # the paper's HyLoRA settings
    lora = [k for k in stored["state_dict"] if ".lora_A." in k]
    assert lora and all(".layers.2.mixer." in k for k in lora)  # LoRA on the attention layer only, none on Mamba-2
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


# The paper's protocol (issue 12, deliverable 5), written out here job by job: fine-tuning kinds x recipes in the
# order the stages run them, the evaluation settings, and the per-kind timing.
KINDS = ["full", "swa", "s2", "se_attn"]
FINE_TUNED = [(k, "hylora") for k in KINDS] + [("se_attn", "lora"), ("se_attn", "lora_plus")]
CPUS = os.cpu_count() or 1
HALF = max(1, CPUS // 2)  # the jobs after pretraining: two at a time, cpu_count // 2 threads each


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


def test_the_stages_are_the_protocol(stages):
    by_stage, _ = stages
    assert {s: len(c) for s, c in by_stage.items()} == {"pretrain": 1, "adapt": 2, "eval": 1, "timing": 1,
                                                         "results": 1}


def test_pretrains_a_hybrid_at_T_on_text(stages):
    by_stage, runs = stages
    (pre,) = by_stage["pretrain"]
    assert pre.module == "hybridlm.train" and not pre.multirun and pre.env["OMP_NUM_THREADS"] == str(CPUS)
    (job,) = sweep_jobs(pre)
    cfg = effective("train", job)["config"]
    attn = cfg["model"]["attn"]
    assert cfg["model"]["layer_pattern"] == "MMAM" and (attn["kind"], attn["window"]) == ("swa", 128)
    assert cfg["data"]["seq_len"] == 128 and cfg["data"]["source"] != "synthetic"  # text, with passkey rows
    assert cfg["data"]["synthetic"]["task"] == "passkey" and cfg["data"]["synthetic"]["passkey_filler"] == "mixed"
    assert job_dir(pre, job) == runs / "seed0" / "pretrain"


def fine_tuning_jobs(commands):
    return [(c, job) for c in commands for job in sweep_jobs(c)]


def test_fine_tunes_at_8T_every_kind_with_hylora_and_se_attn_with_each_recipe(stages):
    by_stage, runs = stages
    ckpt = runs / "seed0" / "pretrain" / "checkpoints" / "last.ckpt"
    commands = by_stage["adapt"]
    jobs = fine_tuning_jobs(commands)
    assert all(c.module == "hybridlm.train" and c.multirun and c.env["OMP_NUM_THREADS"] == str(HALF)
               and hydra_value(c, job, "launcher.n_jobs") == 2 for c, job in jobs)
    got = []
    for c, job in jobs:
        eff = effective("train", job)
        cfg = eff["config"]
        kind, adapter = cfg["model"]["attn"]["kind"], cfg["adapter"]["name"]
        got.append((kind, adapter))
        assert cfg["init_from"] == str(ckpt) and cfg["data"]["seq_len"] == 8 * 128
        assert (cfg["adapter"]["r"], cfg["adapter"]["alpha"]) == (32, 64)  # the paper's LoRA settings
        assert not cfg["eval"]["at_fit_end"] and cfg["trainer"]["log_every_n_steps"] == 1
        # Only the attention kind is set on the model: the architecture comes from the checkpoint.
        keys = eff["explicit model keys"]
        assert "attn.kind" in keys and all(k.startswith("attn.") for k in keys), keys
        if kind == "se_attn":  # the paper's chunk sizes {T, 2T}, S = 32, k = 8, its scorer, per-head selection
            attn = cfg["model"]["attn"]
            assert [attn[k] for k in ("chunk_sizes", "eval_chunk_size", "block_size", "top_k", "scorer", "shared")] \
                == [[128, 256], None, 32, 8, "paper", False]
        assert job_dir(c, job) == runs / "seed0" / ("adapt" if adapter == "hylora" else "adapt_recipes") / \
            f"{kind}+{adapter}"
    assert got == FINE_TUNED


def test_evaluates_every_checkpoint_with_full_and_with_the_same_attention(stages):
    by_stage, runs = stages
    (command,) = by_stage["eval"]
    assert command.module == "hybridlm.evaluate" and command.env["OMP_NUM_THREADS"] == str(HALF)
    # The pretrained checkpoint, then what the shell lists: the fine-tuned checkpoints (ls sorts them), nothing else.
    (listed,) = [a.removeprefix("ckpt_path=") for a in command.args if a.startswith("ckpt_path=")]
    pretrained, glob = listed.split(",")
    assert pretrained == str(runs / "seed0" / "pretrain" / "checkpoints" / "last.ckpt")
    tuned = sorted(str(job_dir(c, job) / "checkpoints" / "last.ckpt")
                   for c, job in fine_tuning_jobs(by_stage["adapt"]))
    assert all(fnmatch.fnmatch(c, glob) for c in tuned) and not fnmatch.fnmatch(pretrained, glob)
    command.args = [a if not a.startswith("ckpt_path=") else "ckpt_path=" + ",".join([pretrained, *tuned])
                    for a in command.args]
    assert all(hydra_value(command, job, "launcher.n_jobs") == 2 for job in sweep_jobs(command))
    jobs = [effective("evaluate", job)["config"] for job in sweep_jobs(command)]
    assert [(j["ckpt_path"], j["eval"]["attention"]) for j in jobs] == [
        (c, a) for a in ("full", "same") for c in [pretrained, *tuned]]
    for j in jobs:
        ev = j["eval"]
        assert ev["diagnostics"] == ["loss_by_position", "passkey"]
        assert ev["max_len"] == 32 * 128 and ev["chunk_len"] == 8 * 128  # perplexity up to 32T, streamed by 8T
        assert ev["passkey_lengths"] == [256, 512, 1024] and ev["passkey_haystack"] == "text"  # needle at 2T-8T


def test_times_a_step_of_each_kind_at_8T_alone(stages):
    by_stage, runs = stages
    (command,) = by_stage["timing"]
    assert command.module == "hybridlm.train" and command.env["OMP_NUM_THREADS"] == str(HALF)
    jobs = sweep_jobs(command)
    assert all(hydra_value(command, job, "launcher.n_jobs") == 1 for job in jobs)
    adapted = {(j["config"]["model"]["attn"]["kind"], j["config"]["adapter"]["name"]): j
               for j in (effective("train", job) for _, job in fine_tuning_jobs(by_stage["adapt"]))}
    timed = [effective("train", job) for job in jobs]
    assert [(t["config"]["model"]["attn"]["kind"], t["config"]["adapter"]["name"]) for t in timed] == \
        [(k, "hylora") for k in KINDS]
    for t in timed:
        key = (t["config"]["model"]["attn"]["kind"], "hylora")
        for part in ("model", "adapter", "init_from", "optim"):
            assert t["config"][part] == adapted[key]["config"][part], (key, part)
        assert t["config"]["data"]["seq_len"] == 8 * 128 and t["config"]["trainer"]["max_steps"] == 6


def test_ends_with_the_reader(stages):
    by_stage, runs = stages
    (reader,) = by_stage["results"]
    assert reader.args[:4] == ["sespan", str(runs / "seed0"), "--out", "results/sespan"]


def test_each_seed_is_the_whole_protocol_in_its_own_folder(tmp_path):
    """SEEDS="0 2": seed 0 as the configs give it, seed 2 with seed=2 data.seed=2 in every training stage (the
    evaluation data stays the same), each in runs/seed<N>; the reader gets both folders and SESPAN_PRIOR's files."""
    commands = make_commands("repro-sespan", SESPAN_RUNS=str(tmp_path), SEEDS="0 2", SESPAN_PRIOR="old.json")
    *stages, reader = commands
    assert len(stages) == 2 * 5 and all(c.module != "hybridlm.results" for c in stages)
    for seed, seed_stages in ((0, stages[:5]), (2, stages[5:])):
        for c in seed_stages:
            for job in sweep_jobs(c):
                kind = "evaluate" if c.module == "hybridlm.evaluate" else "train"
                cfg = effective(kind, job)["config"]
                if kind == "train":
                    assert (cfg["seed"], cfg["data"]["seed"]) == ((0, 1234) if seed == 0 else (2, 2))
                    assert cfg["init_from"] in (None, str(tmp_path / f"seed{seed}/pretrain/checkpoints/last.ckpt"))
                else:
                    assert cfg["seed"] == 0 and cfg["eval"]["seed"] == 0 and "data.seed" not in " ".join(job)
            (out,) = [a.partition("=")[2] for a in c.args if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
            assert Path(out).parent == tmp_path / f"seed{seed}"
    assert reader.args[:5] == ["sespan", str(tmp_path / "seed0"), str(tmp_path / "seed2"), "old.json", "--out"]
    assert reader.args[-1] == 'make repro-sespan SEEDS="0 2" SESPAN_PRIOR="old.json"'


# Small enough to run in a test: a tiny pretrained model, 2 fine-tuning steps at 256 tokens, a small needle grid,
# perplexity to 512 tokens.
E2E_PRETRAIN_ARGS = ("model.d_model=32 model.ssm.d_state=16 model.ssm.headdim=16 model.ssm.chunk_size=16 "
                     "data.batch_size=2 data.val_batches=1 trainer.max_steps=2 trainer.val_check_interval=2 "
                     "trainer.limit_val_batches=1")
# top_k 2: a 256-token row's last chunk has only 4 past blocks of 32, and top_k 8 would be refused as full attention
E2E_ADAPT_ARGS = ("data.seq_len=256 model.attn.top_k=2 data.val_batches=1 trainer.max_steps=2 "
                  "trainer.val_check_interval=2 trainer.limit_val_batches=1")
E2E_EVAL_ARGS = ("'eval.passkey_lengths=[192,256]' 'eval.passkey_depths=[0.0,1.0]' eval.passkey_samples=1 "
                 "eval.max_len=512 eval.n_sequences=2 eval.chunk_len=256 eval.batch_size=2 trainer.limit_val_batches=1")


@pytest.mark.slow
def test_make_repro_sespan_end_to_end(tmp_path):
    """The real target, shrunk through its stage variables: every stage's Hydra runs, then the reader's tables,
    checked against the jobs' own files."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    stage_args = [f"PRETRAIN_ARGS={E2E_PRETRAIN_ARGS}", f"ADAPT_ARGS={E2E_ADAPT_ARGS}", f"EVAL_ARGS={E2E_EVAL_ARGS}"]
    proc = subprocess.run(["make", "repro-sespan", f"VENV={VENV}", f"SESPAN_RUNS={runs}", f"SESPAN_OUT={out}",
                           *stage_args], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "FAILED" not in table
    results = json.loads((out / "results.json").read_text())
    rows = {(r["attention"], r["adapter"]): r for r in results["runs"]}
    assert list(rows) == [("none", "none"), *FINE_TUNED]

    row = rows[("se_attn", "hylora")]
    adapt_dir = runs / "seed0" / "adapt" / "se_attn+hylora"
    result = json.loads((adapt_dir / "result.json").read_text())
    assert row["peak_rss_mb"] == result["resources"]["peak_rss_mb"] and result["resources"]["threads"] == HALF
    evals = [json.loads(p.read_text()) for p in (runs / "seed0" / "eval").glob("*/result.json")]
    for attention, used in (("full", "full"), ("same", "se_attn")):
        (ev,) = [r for r in evals if f"ckpt_path={adapt_dir / 'checkpoints' / 'last.ckpt'}" in r["overrides"]
                 and f"eval.attention={attention}" in r["overrides"]]
        report = Path(ev["out_dir"]) / "length_eval"
        passkey = json.loads((report / "passkey.json").read_text())
        assert passkey["meta"]["attention"] == used and passkey["meta"]["haystack"] == "text"
        got = row["evals"][attention]
        assert [[c["context_len"], c["depth"], c["accuracy"]] for c in got["needle_cells"]] == passkey["rows"]
        with open(report / "loss_by_position_per_position.csv") as f:
            loss = [float(r["mean_loss"]) for r in csv.DictReader(f)]
        assert len(loss) == 511
        for n in (128, 256, 512):  # T, 8T (= the fine-tuning length here), 16T
            assert got["ppl"][str(n)] == round(math.exp(sum(loss[:n - 1]) / (n - 1)), 4)
    with open(runs / "seed0" / "timing" / "se_attn+hylora" / "csv" / "metrics.csv") as f:
        rates = [float(r["train/tokens_per_s"]) for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    assert row["step_seconds_isolated"] == round(min(2 * 256 / r for r in rates), 4)
    meta = results["meta"]
    assert (meta["parallel"], meta["threads"], meta["eval_len"], meta["adapt_len"]) == (2, HALF, 512, 256)
    assert meta["ppl_lengths"] == [128, 256, 512]
    # Every pair of the paper's ordering is judged in both tables, and the needle target in both.
    claims = [(o["table"], o["claim"]) for o in meta["orderings"]]
    assert len(claims) == 2 * 4 + 2 and len(set(claims)) == len(claims)
    verdicts = [o["reproduced"] for o in meta["orderings"]]
    assert sum(table.count(f"**{v}**") for v in ("reproduced", "NOT reproduced", "undecided")) == len(claims)
    for o in meta["orderings"]:  # recomputed from the cells / accuracies
        if "cells" in o:
            assert o["reproduced"] == all(c["ours"] == c["paper"] for c in o["cells"])
        else:
            assert o["reproduced"] == (o["se_attn"] >= 0.8 * o["full"] if o["full"] > 0 else None)
    assert len(verdicts) == len(claims)
    assert (out / "figure.png").stat().st_size > 0
