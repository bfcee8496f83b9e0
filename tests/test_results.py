"""The reader of finished runs (hybridlm.results) on hand-made job directories: the files run_job, Hydra and the
length report write, with numbers chosen here, so every cell of the output can be checked by hand."""
import json
import math
from pathlib import Path

import pytest
import yaml

from hybridlm.results import Job, read_jobs, wall_span_seconds
from hybridlm.results import lengthgen as lengthgen_results
from hybridlm.results.__main__ import main
from hybridlm.results.sespan import stage


def write_job(job_dir: Path, overrides: list[str], config: dict, *, num=None, status="ok", error=None,
              metrics=None, resources=None, n_jobs=2, log="") -> None:
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    hydra = {"mode": "RUN" if num is None else "MULTIRUN", "job": {"name": "train", "num": num},
             "launcher": {"n_jobs": n_jobs}}
    (job_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    (job_dir / "train.log").write_text(log)
    (job_dir / "result.json").write_text(json.dumps(
        {"overrides": overrides, "status": status, "error": error, "metrics": metrics or {},
         "out_dir": str(job_dir), "resources": resources or {}}))


def usage(started: str, ended: str, wall: float, rss: float) -> dict:
    return {"started": started, "ended": ended, "wall_seconds": wall, "peak_rss_mb": rss,
            "peak_rss_since": "job start", "children_peak_rss_mb": None, "threads": 1, "cpus": 2,
            "load_average": [1.0, 1.5, 2.0]}


def test_jobs_are_read_in_sweep_order_with_their_figures(tmp_path):
    for num in (10, 2, 0):
        write_job(tmp_path / str(num), [f"seed={num}"], {"seed": num}, num=num,
                  resources=usage(f"2026-01-01T00:00:{num:02d}+00:00", f"2026-01-01T00:01:{num:02d}+00:00", 60, 500))
    # named job directories (hydra.sweep.subdir) still come in the order of the sweep
    write_job(tmp_path / "named" / "zeta", ["a=1"], {}, num=0)
    write_job(tmp_path / "named" / "alpha", ["a=2"], {}, num=1)
    jobs = read_jobs(tmp_path)
    assert [j.dir.relative_to(tmp_path).as_posix() for j in jobs] == ["0", "2", "10", "named/zeta", "named/alpha"]
    assert [j.dir.name for j in read_jobs(tmp_path, recursive=False)] == ["0", "2", "10"]
    assert jobs[1].override("seed") == "2" and jobs[1].wall_seconds == 60 and jobs[1].peak_rss_mb == 500
    assert jobs[0].parallel == 2 and jobs[0].num == 0
    assert wall_span_seconds(jobs) == 70  # 00:00:00 -> 00:01:10


T = 4  # log2 buckets [0,1) ... [64,128) of a 32T evaluation: [T/2,T) = [2,4), [8T,16T) = [32,64), last [64,128)
BUCKETS = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 128)]


def length_report(report: Path, recall: list[float], final_norms: tuple[float, float], effrem_half: float) -> None:
    """A length report with recall loss `recall` per bucket, all-token loss 1 nat above it, and the SSM state norm
    at the last position of layers 0 and 1; its scalars derived as the evaluation derives them."""
    report.mkdir(parents=True)
    all_loss = [3.0 if math.isnan(x) else x + 1.0 for x in recall]
    rows = [[a, b, x, y] for (a, b), x, y in zip(BUCKETS, all_loss, recall)]
    (report / "loss_by_position.json").write_text(json.dumps({
        "columns": ["bucket_start", "bucket_end", "mean_loss", "target_mean_loss"], "rows": rows,
        "scalars": {"last_bucket_over_train_half": all_loss[-1] / all_loss[2], "loss_within_T": 3.0,
                    "loss_beyond_T": all_loss[-1], "target_last_bucket_over_train_half": recall[-1] / recall[2],
                    "target_loss_within_T": recall[2], "target_loss_beyond_T": recall[-1]},
        "meta": {"train_len": T, "eval_len": 128, "n_sequences": 4, "target_id_range": [144, 160]}}))
    (report / "state_norms.json").write_text(json.dumps({"columns": ["layer", "position", "norm"], "rows": [
        [0, 4, 1.0], [0, 128, final_norms[0]], [1, 4, 3.0], [1, 128, final_norms[1]]]}))
    (report / "effrem.json").write_text(json.dumps({"columns": ["t", "effrem"], "rows": [
        [0, 0.0], [2, effrem_half], [3, 0.9], [8, 1.0]], "scalars": {"at_half_T": effrem_half}}))
    (report / "progress.json").write_text(json.dumps({"step": 10, "train_tokens": 1280, "seq_len": T,
                                                      "parameters": 100, "non_embedding_parameters": 60}))


def lengthgen_job(runs: Path, arm: str, seed: int, num: int, recall=None, *, wall=100.0, norms=(2.0, 4.0),
                  effrem_half=0.5, **kw) -> Path:
    """A pretrain job (arm "pretrained") or a post-train one of intervention `arm` from that seed's checkpoint."""
    if arm == "pretrained":
        job = runs / "pretrain" / f"seed{seed}"
        config = {"seed": seed, "init_from": None, "intervention": {"name": "none"}, "trainer": {"max_steps": 1000}}
    else:
        job = runs / "post_train" / f"{arm}+seed{seed}"
        config = {"seed": seed, "init_from": str(runs / "pretrain" / f"seed{seed}" / "checkpoints" / "last.ckpt"),
                  "intervention": {"name": arm}, "trainer": {"max_steps": 50}}
    write_job(job, [f"seed={seed}"], config, num=num, log=f"{arm} {seed} log",
              resources=usage(f"2026-01-01T00:0{num}:00+00:00", f"2026-01-01T00:0{num}:30+00:00", wall, 500), **kw)
    if recall is not None:
        length_report(job / "length_eval" / "step0000010", recall, norms, effrem_half)
    return job


def test_lengthgen_table_of_pretrained_and_post_trained_seeds(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    nan = float("nan")  # no recall answer in the first position
    # recall ratio at 8T-16T = loss at [32,64) / loss at [2,4): 3.0/2.0 = 1.5 (fails) and 2.2/2.0 = 1.1;
    # in the last bucket 4.0/2.0 = 2.0 and 3.0/2.0 = 1.5
    lengthgen_job(runs, "pretrained", 0, 0, [nan, 4.0, 2.0, 2.1, 2.2, 2.5, 3.0, 4.0], wall=300, norms=(2.0, 4.0),
                  effrem_half=0.4)
    lengthgen_job(runs, "pretrained", 1, 1, [5.0, 4.0, 2.0, 2.1, 2.2, 2.1, 2.2, 3.0], wall=320, norms=(3.0, 5.0),
                  effrem_half=0.6)
    # post-training: ratios 1.2/1.0 and 1.0/1.0; state passing has seed 0 only (seed 1 failed)
    lengthgen_job(runs, "none", 0, 0, [nan, 3.0, 1.0, 1.0, 1.1, 1.1, 1.2, 1.6], wall=30)
    lengthgen_job(runs, "none", 1, 1, [nan, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2], wall=40)
    lengthgen_job(runs, "state_passing", 0, 2, [nan, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.1], wall=35, norms=(1.5, 2.5),
                  effrem_half=0.25)
    failed = lengthgen_job(runs, "state_passing", 1, 3, status="failed", error="RuntimeError: boom")

    assert main(["lengthgen", str(runs), "--out", str(out), "--command", "make repro-lengthgen"]) == 1  # one failed
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "Command: `make repro-lengthgen`"
    assert "Post-training: 50 steps = 5% of the pretraining's 1000." in table[2]
    assert "2 seeds; mean ± population std (min-max)" in table[2]
    assert "| fails (ratio >= 1.3 at 8T-16T) |" in table[4]
    # seeds, ratio 8T-16T, ratio in the last bucket, fails, recall loss [T/2,T), last bucket, final state norm per
    # layer (mean of 2.0, 3.0 and of 4.0, 5.0), EffRem(T/2), wall time
    assert table[6] == ("| pretrained (before post-training) | 2 | 1.30 ± 0.20 (1.10-1.50) | 1.75 ± 0.25 (1.50-2.00) "
                        "| 1/2 seeds | 2.000 | 3.500 | 2.50, 4.50 | 0.500 | 310 |")
    assert table[7] == ("| none | 2 | 1.10 ± 0.10 (1.00-1.20) | 1.40 ± 0.20 (1.20-1.60) | 0/2 seeds | 1.000 | 1.400 "
                        "| 2.00, 4.00 | 0.500 | 35 |")
    assert table[8] == ("| state passing | 1 (+1 failed) | 1.00 | 1.10 | 0/1 seeds | 1.000 | 1.100 | 1.50, 2.50 "
                        "| 0.250 | 35 |")
    assert "| positions | pretrained (before post-training) | none | state passing |" in table
    # recall loss by bucket: [0,1) has a recall answer in pretrained seed 1 only; [32,64) = (3.0+2.2)/2, (1.2+1.0)/2
    assert "| [0, 1) | 5.000 | n/a | n/a |" in table
    assert "| [32, 64) | 2.600 | 1.100 | 1.000 |" in table
    all_tokens = table[table.index("All-token loss by position bucket (nats), mean over seeds:"):]
    assert "| [32, 64) | 3.600 | 2.100 | 2.000 |" in all_tokens
    assert table[-1] == f"state passing seed 1: FAILED: RuntimeError: boom; see {failed / 'train.log'}"

    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["train_len"] == 4 and results["eval_len"] == 128
    assert results["wall_seconds"] == 210  # 00:00:00 -> 00:03:30
    assert [a["arm"] for a in results["arms"]] == ["pretrained", "none", "state_passing"]
    pretrained, _, state_passing = results["arms"]
    assert list(pretrained["seeds"]) == ["0", "1"] and list(state_passing["seeds"]) == ["0", "1"]
    seed0 = pretrained["seeds"]["0"]
    assert seed0["recall_loss"][0] is None and seed0["ratios"]["recall_8T_16T"] == 1.5  # NaN -> null
    assert seed0["state_norms"] == {"layer0": [[4, 1.0], [128, 2.0]], "layer1": [[4, 3.0], [128, 4.0]]}
    assert seed0["effrem"][1] == [2, 0.4] and seed0["progress"]["train_tokens"] == 1280
    assert pretrained["mean"]["fails"] == 1 and pretrained["mean"]["final_state_norm"] == {"layer0": 2.5,
                                                                                           "layer1": 4.5}
    assert state_passing["seeds"]["1"]["error"] == "RuntimeError: boom" and state_passing["mean"]["n_ok"] == 1
    assert (out / "logs" / "pretrained_seed0.log").read_text() == "pretrained 0 log"
    assert (out / "logs" / "state_passing_seed1.log").read_text() == "state_passing 1 log"
    assert len(list((out / "logs").iterdir())) == 6
    assert (out / "figure.png").stat().st_size > 0


def test_lengthgen_reader_refuses_a_folder_without_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no result.json"):
        lengthgen_results.write(tmp_path, tmp_path / "out", "cmd")


@pytest.mark.parametrize("overrides,expected_stage", [
    (["+experiment=sespan/repro/adapt", "model/attention=s2", "adapter=hylora"], "adapt"),
    (["adapter=lora", "+experiment=sespan/repro/timing", "model/attention=se_attn"], "timing"),
    (["+experiment=sespan/repro/eval", "ckpt_path=/x/last.ckpt"], "eval"),
    (["+experiment=sespan/repro/pretrain"], "pretrain"),
    (["+experiment=sespan/adapt", "model/attention=swa"], None),  # not a stage of make repro-sespan
])
def test_sespan_jobs_are_told_apart_by_their_stage(overrides, expected_stage):
    job = Job(dir=Path("/j"), overrides=overrides, status="ok", error=None, metrics={}, out_dir=Path("/j"))
    assert stage(job) == expected_stage


def failure_report(report: Path, step: int, tokens: int, params: int, ratio: float, norm_ratio: float) -> None:
    report.mkdir(parents=True)
    (report / "progress.json").write_text(json.dumps({"step": step, "train_tokens": tokens, "seq_len": 32,
                                                      "parameters": params, "non_embedding_parameters": params - 10}))
    (report / "loss_by_position.json").write_text(json.dumps({"scalars": {
        "last_bucket_over_train_half": 1.0, "loss_within_T": 2.0, "loss_beyond_T": 2.0,
        "target_last_bucket_over_train_half": ratio, "target_loss_within_T": 0.5,
        "target_loss_beyond_T": 0.5 * ratio}}))
    (report / "state_norms.json").write_text(json.dumps({"scalars": {"final_over_at_T": norm_ratio}}))


def failure_run(run: Path, seed: int, d_state: int, ratios: list[float]) -> None:
    """A failure-map run folder: its config (fresh-key recall at T = 32) and one report per ratio."""
    (run / ".hydra").mkdir(parents=True)
    cfg = {"seed": seed, "data": {"seq_len": 32, "source": "synthetic", "synthetic": {"task": "recall_stream"}},
           "model": {"d_model": 32, "ssm": {"d_state": d_state, "expand": 2, "d_inner": None, "dt_max": 0.1}}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"experiment/lengthgen/task": "recall_fresh"}}}}))
    for i, r in enumerate(ratios):
        failure_report(run / "length_eval" / f"step{500 * (i + 1):07d}", 500 * (i + 1), 1000 * (i + 1), 100, r, 1.5)


def test_failure_map_combines_sources_and_summarises_seeds(tmp_path):
    """An earlier results.json (seed 0) plus a sweep folder of two more seeds: one map, and for the setting with
    three seeds a row over them (population std; a run fails at the end with ratio >= 1.3)."""
    failure_run(tmp_path / "first" / "a", 0, 16, [1.1, 2.0])
    failure_run(tmp_path / "first" / "b", 0, 64, [0.9, 0.8])
    assert main(["failure_map", str(tmp_path / "first"), "--out", str(tmp_path / "out0")]) == 0
    failure_run(tmp_path / "more" / "s1", 1, 16, [1.4, 1.0])
    failure_run(tmp_path / "more" / "s2", 2, 16, [1.2, 1.5])
    out = tmp_path / "out"
    assert main(["failure_map", str(tmp_path / "out0" / "results.json"), str(tmp_path / "more"), "--out", str(out),
                 "--command", "cmd"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["seed"], r["d_state"]) for r in runs] == [(0, 16), (0, 64), (1, 16), (2, 16)]
    table = (out / "table.md").read_text().splitlines()
    def mean_std(xs):
        m = sum(xs) / len(xs)
        return f"{m:.2f} ± {(sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5:.2f}"
    # last ratio of seeds 0, 1, 2: 2.0, 1.0, 1.5; largest: 2.0, 1.4, 1.5
    assert (f"| recall_fresh T=32 d_state=16 dt_max=0.1 | 0, 1, 2 | 20 | {mean_std([2.0, 1.0, 1.5])} (1.00-2.00) | "
            f"{mean_std([2.0, 1.4, 1.5])} (1.40-2.00) | 20, 10, 20 | 2/3 |") in table
    assert not any(line.startswith("| recall_fresh T=32 d_state=64 dt_max=0.1 |") for line in table)  # one seed


def test_failure_map_from_runs_still_going(tmp_path):
    """Runs need only their config and reports (no result.json: a sweep still running or stopped); each report is
    one point at its tokens per parameter; a run fails from its first report with ratio >= 1.3."""
    model = {"d_model": 32, "ssm": {"d_state": 16, "expand": 2, "d_inner": None, "dt_max": 0.1}}
    for name, d_state, ratios in (("small", 16, [1.1, 1.5, 2.0]), ("large", 64, [1.2, 0.9, 0.8])):
        run = tmp_path / "runs" / name
        (run / ".hydra").mkdir(parents=True)
        cfg = {"seed": 0, "data": {"seq_len": 32, "source": "synthetic", "synthetic": {"task": "recall_stream"}},
               "model": {**model, "ssm": {**model["ssm"], "d_state": d_state}}}
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"runtime": {"choices": {"experiment/lengthgen/task": "recall_fresh"}}}}))
        for i, r in enumerate(ratios):
            failure_report(run / "length_eval" / f"step{500 * (i + 1):07d}", 500 * (i + 1), 1000 * (i + 1), 100, r,
                           1.5)
    out = tmp_path / "out"
    assert main(["failure_map", str(tmp_path / "runs"), "--out", str(out)]) == 0
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "Command: `make failure-map`"
    # state/T = d_inner (2 x 32) x d_state / T; tokens per parameter = tokens / 100
    assert ("| recall_fresh T=32 d_state=16 dt_max=0.1 seed=0 | 100 | 32 | 3 | 0.0M | 30 | 2.00 | 2.00 (30) | 20 |"
            in table)
    assert ("| recall_fresh T=32 d_state=64 dt_max=0.1 seed=0 | 100 | 128 | 3 | 0.0M | 30 | 0.80 | 1.20 (10) | never |"
            in table)
    assert not any(line.startswith("Over seeds") for line in table)  # one seed per setting
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [p["tokens_per_parameter"] for p in runs[1]["points"]] == [10, 20, 30]
    assert runs[1]["points"][0]["state_norm_final_over_at_T"] == 1.5 and runs[1]["points"][0]["on"] == "recall answers"
    assert (out / "figure.png").stat().st_size > 0


def sespan_seed(seed: int, ppl: dict[str, float], needle: dict[str, float]) -> dict:
    """One seed of make repro-sespan as the reader writes it (results.json of a single seed): every model at
    PPL ppl[kind] at every length and needle accuracy needle[kind], in both tables."""
    from hybridlm.results.sespan import ROWS, label, orderings
    lengths = [128, 1024, 2048, 4096]
    rows = []
    for kind, adapter in ROWS[:5]:
        ev = {"attention_used": "full", "ppl": {str(n): ppl[kind] for n in lengths},
              "needle_by_length": {"256": needle[kind]}, "needle_beyond_T": needle[kind],
              "loss_by_position_bins_of_16": [math.log(ppl[kind])] * 8}
        rows.append({"attention": kind, "adapter": adapter, "label": label((kind, adapter)),
                     "trainable_params": 10, "step_seconds": 1.0 + seed, "step_seconds_isolated": 0.5,
                     "peak_rss_mb": 700.0, "evals": {"full": ev, "same": ev}})
    meta = {"command": "make repro-sespan", "seed": seed, "wall_minutes": 10.0, "cpus": 2, "load_average": "1.0",
            "parallel": 2, "threads": 1, "timing_steps": 6, "pretrain_len": 128, "adapt_len": 1024,
            "eval_len": 4096, "ppl_lengths": lengths, "window": 128, "pretrain_steps": 10, "pretrain_batch": 2,
            "pretrain_mix_prob": 0.5, "adapt_steps": 5, "adapt_batch": 2, "adapt_lr": 0.001, "se_attn": None,
            "needle_lengths": [256], "needle_depths": [0.5], "needle_samples": 1, "loss_sequences": 2,
            "loss_bin": 16, "orderings": orderings(rows, lengths[1:])}
    return {"meta": meta, "runs": rows}


def test_sespan_reader_over_seeds(tmp_path):
    """Seeds from results.json files: every number as mean ± population std over the seeds, each of the paper's
    orderings counted per seed and judged on the means; a seed given twice is refused."""
    ppl = [{"none": 9.0, "full": 7.0, "se_attn": 7.2, "swa": 7.5, "s2": 8.0},  # seed 0: the paper's order
           {"none": 9.0, "full": 7.4, "se_attn": 7.1, "swa": 7.6, "s2": 7.3}]  # seed 1: SE < full, S2 < SW
    needle = [{"none": 0.5, "full": 0.8, "se_attn": 0.8, "swa": 0.6, "s2": 0.6},
              {"none": 0.4, "full": 0.9, "se_attn": 0.6, "swa": 0.6, "s2": 0.6}]
    for seed in (0, 1):
        (tmp_path / f"seed{seed}.json").write_text(json.dumps(sespan_seed(seed, ppl[seed], needle[seed])))
    # one seed read back from its results.json gives the table it was written with
    assert main(["sespan", str(tmp_path / "seed0.json"), "--out", str(tmp_path / "one")]) == 0
    assert main(["sespan", str(tmp_path / "one" / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "one" / "table.md").read_text() == (tmp_path / "again" / "table.md").read_text()

    out = tmp_path / "out"
    assert main(["sespan", str(tmp_path / "seed1.json"), str(tmp_path / "seed0.json"), "--out", str(out),
                 "--command", "cmd", "--loss-bin", "32"]) == 0
    table = (out / "table.md").read_text().splitlines()
    # Full-Attn + hylora: PPL 7.0 and 7.4 -> 7.20 ± 0.20; needle 0.8 and 0.9 -> 0.85 ± 0.05 (population std)
    full_row = next(line for line in table if line.startswith("| Full-Attn + hylora | full | 7.20 ± 0.20 |"))  # Table 1
    assert "| 0.85 ± 0.05 | 0.85 ± 0.05 | 0.50 ± 0.00 | 1.50 ± 0.50 | 10 | 700 ± 0 |" in full_row
    # Full <= SE holds in seed 0 (7.0 <= 7.2) not in seed 1 (7.4 > 7.1); on the means 7.20 > 7.15: not reproduced
    over = [x for x in table if "on the means" in x]  # the verdicts over the seeds (each seed's section follows)
    assert len(over) == 10
    (line,) = [x for x in over if x.startswith("- Full-Attn <= SE-Attn (Table 1")]
    assert "reproduced in **1 of 2** seeds (seed 0 yes, seed 1 no); on the means: **NOT reproduced**" in line
    # SW < S2: seed 0 yes (7.5 < 8.0), seed 1 no (7.6 > 7.3); means 7.55 < 7.65: reproduced
    (line,) = [x for x in over if x.startswith("- SW-Attn < S2-Attn (Table 2")]
    assert "reproduced in **1 of 2** seeds (seed 0 yes, seed 1 no); on the means: **reproduced**" in line
    # needle beyond T: SE 0.8 >= 0.8 x 0.8 in seed 0, 0.6 < 0.8 x 0.9 in seed 1; means 0.70 >= 0.8 x 0.85
    (line,) = [x for x in over if x.startswith("- needle beyond T") and "Table 1" in x]
    assert "reproduced in **1 of 2** seeds" in line and "on the means: **reproduced**" in line
    assert table.index("## Seed 0") < table.index("## Seed 1")  # each seed's own tables, in seed order
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["seeds"] == [0, 1] and [s["meta"]["seed"] for s in results["seeds"]] == [0, 1]
    se = [r for r in results["over_seeds"] if r["attention"] == "se_attn"][0]["evals"]["full"]
    assert se["ppl"]["1024"] == {"mean": 7.15, "std": 0.05, "min": 7.1, "max": 7.2, "n": 2}
    assert se["loss_by_position_bins_of_16"] == [round((math.log(7.2) + math.log(7.1)) / 2, 4)] * 8
    assert (out / "figure.png").stat().st_size > 0
    with pytest.raises(ValueError, match="more than one source"):
        main(["sespan", str(tmp_path / "seed0.json"), str(tmp_path / "one" / "results.json"), "--out",
              str(tmp_path / "dup")])
