"""The reader of finished runs (hybridlm.results) on hand-made job directories: the files run_job, Hydra and the
length report write, with numbers chosen here, so every cell of the output can be checked by hand."""
import json
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


def loss_report(report: Path, all_loss: list[float], recall: list[float], ratio: float) -> None:
    report.mkdir(parents=True)
    buckets = [(0, 32), (32, 64), (64, 128)]
    rows = [[a, b, x, y] for (a, b), x, y in zip(buckets, all_loss, recall)]
    (report / "loss_by_position.json").write_text(json.dumps({
        "columns": ["bucket_start", "bucket_end", "mean_loss", "target_mean_loss"], "rows": rows,
        "scalars": {"last_bucket_over_train_half": all_loss[2] / all_loss[1], "loss_within_T": 2.0,
                    "loss_beyond_T": all_loss[2], "target_last_bucket_over_train_half": ratio,
                    "target_loss_within_T": 1.0, "target_loss_beyond_T": recall[2]},
        "meta": {"train_len": 64, "eval_len": 128, "n_sequences": 4, "target_id_range": [144, 160]}}))
    (report / "state_norms.json").write_text(json.dumps({"rows": [[0, 64, 1.0], [0, 128, 2.5], [1, 64, 3.0],
                                                                  [1, 128, 4.25]]}))
    (report / "effrem.json").write_text(json.dumps({"scalars": {"at_half_T": 0.5}}))


def test_lengthgen_table_from_a_multirun(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    common = ["+experiment=lengthgen/repro", "seed=0"]
    write_job(runs / "0", ["intervention=none", *common], {"seed": 0, "intervention": {"name": "none"}}, num=0,
              metrics={"val/loss": 2.5}, log="job 0 log",
              resources=usage("2026-01-01T00:00:00+00:00", "2026-01-01T00:05:00+00:00", 300.4, 700.6))
    loss_report(runs / "0" / "length_eval" / "step000100", [3.0, 2.0, 2.2], [1.5, 0.5, 0.6], 1.2)
    write_job(runs / "1", ["intervention=tbtt", *common], {"seed": 0, "intervention": {"name": "tbtt"}}, num=1,
              status="failed", error="RuntimeError: boom",
              resources=usage("2026-01-01T00:00:01+00:00", "2026-01-01T00:00:09+00:00", 8, 650))

    assert main(["lengthgen", str(runs), "--out", str(out), "--command", "make repro-lengthgen"]) == 1  # one failed
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "Command: `make repro-lengthgen`"
    row = next(line for line in table if line.startswith("| none |"))
    # recall ratio, all-token ratio 2.2/2.0, recall [T/2,T) = 0.6/1.2, last bucket, beyond T, all beyond T, norms of
    # the last position per layer, wall time, peak RSS
    assert row == "| none | 1.20 | 1.100 | 0.500 | 0.600 | 0.600 | 2.200 | 2.50, 4.25 | 300 | 701 |"
    assert "| [32, 64) | 0.500 / 2.000 |" in table
    assert table[-1] == f"TBTT: FAILED: no length report (RuntimeError: boom); see {runs / '1' / 'train.log'}"
    results = json.loads((out / "results.json").read_text())
    assert results["overrides"] == common and results["seed"] == 0 and results["wall_seconds"] == 300
    assert [a["arm"] for a in results["arms"]] == ["baseline", "tbtt"]
    assert results["arms"][0]["final_state_norm"] == {"layer0": 2.5, "layer1": 4.25}
    assert results["arms"][0]["effrem_at_half_T"] == 0.5 and results["arms"][0]["val_loss"] == 2.5
    assert (out / "logs" / "baseline.log").read_text() == "job 0 log"
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
