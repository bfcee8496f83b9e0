"""The tables and figure of `make repro-sespan` (Expansion Span, Nunez et al. 2025, on the paper's protocol) from its
runs: the stages of conf/experiment/sespan/repro/, found under one folder by the experiment each job ran:

- pretrain: one run at T (a hybrid whose sliding window covers T);
- adapt:    one job per attention kind x recipe, fine-tuned at 8T; peak RSS and wall time from its result.json, time
            per step from its CSV log;
- eval:     loss by position and the needle grid of the pretrained and every fine-tuned checkpoint (matched by
            ckpt_path), with eval.attention full (the paper's Table 1) and same (Table 2);
- timing:   each kind x hylora run alone for a few steps: its fastest step.

Several seeds (`make repro-sespan SEEDS="0 1 2"`): each pretraining run with the jobs that descend from its checkpoint
is one seed; a results.json this reader wrote before adds its seeds. With more than one seed the table leads with
the mean ± population std of every number over the seeds, and each of the paper's orderings says in how many seeds
it is reproduced and whether it holds on the means; each seed's own tables follow.

Writes {out}/table.md, results.json and figure.png. Measurements:
- perplexity at L: exp of the mean next-token loss over the first L-1 predictions of the evaluation windows, i.e.
  the perplexity of an L-token context (every kind's output at a position depends only on the tokens up to it,
  except se_attn's within-chunk selection, which is the same for a window cut at a multiple of its chunk size).
- needle: exact-match accuracy of the passkey sentence hidden in validation text (eval.passkey_haystack=text); per
  context length, the mean over depths; "beyond T": the cells whose whole key lies more than T tokens before the
  last prompt token (outside the pretraining context and a query chunk of M = T).
- orderings: the paper's (full <= SE < SW < S2 < not fine-tuned) pair by pair, at every length from 8T on, ours
  beside the truth value of the same comparison on the paper's quoted numbers; reproduced when they agree at every
  length compared. The needle target is undecided when full attention finds no needle.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import yaml

from hybridlm.results import Job, finite, last_finished, read_jobs, spread, wall_span_seconds

STAGES = ("pretrain", "adapt", "eval", "timing")  # conf/experiment/sespan/repro/<stage>.yaml
EVALS = ("full", "same")  # eval.attention of the eval stage: Table 1, Table 2
NOT_FINE_TUNED = ("none", "none")  # (kind, adapter) of the pretrained model's row
# Rows in the paper's order, then the recipes beside HyLoRA (the paper's Fig. 2b).
ROWS = [NOT_FINE_TUNED, ("full", "hylora"), ("swa", "hylora"), ("s2", "hylora"), ("se_attn", "hylora"),
        ("se_attn", "lora"), ("se_attn", "lora_plus")]
LABELS = {"none": "not fine-tuned", "full": "Full-Attn", "swa": "SW-Attn", "s2": "S2-Attn", "se_attn": "SE-Attn"}
COLORS = {"none": "black", "full": "tab:green", "swa": "tab:blue", "s2": "tab:orange", "se_attn": "tab:red"}

# Nunez et al., "Expansion Span: Combining Fading Memory and Retrieval in Hybrid State Space Models", NeuS 2025,
# PMLR 288:570-596. Mamba-2-Hybrid 2.7B pretrained at 2048, fine-tuned at 8192 with HyLoRA; PG-19 perplexity.
# Table 1 (evaluated with full attention) at 2048, 8192, 16384, 32768 tokens: the pretraining length, the
# fine-tuning length, 2x and 4x it, i.e. our T, 8T, 16T, 32T.
PAPER_TABLE1 = {"none": (10.72, 14.99, 19.35, 26.37), "full": (10.99, 10.28, 10.39, 11.14),
                "swa": (10.98, 10.80, 11.82, 13.45), "s2": (10.87, 12.89, 14.67, 16.37),
                "se_attn": (10.99, 10.45, 11.14, 12.64)}
# Table 2 (evaluated with the attention used in fine-tuning) at 8192, 16384, 32768 (and 65536, not compared):
# the fine-tuning length, 2x and 4x it, i.e. our 8T, 16T, 32T.
PAPER_TABLE2 = {"none": (14.99, 19.35, 26.37), "full": (10.28, 10.39, 11.14), "swa": (10.33, 10.22, 10.16),
                "s2": (10.73, 10.76, 11.85), "se_attn": (10.47, 10.70, 10.91)}
# The paper's ordering of the fine-tuned kinds by perplexity, pair by pair (a <= b for the first, a < b after).
ORDERING = [("full", "se_attn", "<="), ("se_attn", "swa", "<"), ("swa", "s2", "<"), ("s2", "none", "<")]
NEEDLE_TARGET = 0.8  # issue 12: SE-Attn's needle accuracy beyond the chunk >= 0.8 of full attention's


def stage(job: Job) -> Optional[str]:
    name = (job.override("experiment") or "").removeprefix("sespan/repro/")
    return name if name in STAGES else None


def checkpoint(job: Job) -> Path:
    return (job.out_dir / "checkpoints" / "last.ckpt").resolve()


def row_key(job: Job) -> tuple[str, str]:
    """(attention kind, adapter) of a fine-tuning or timing job, from its composed config."""
    return job.config["model"]["attn"]["kind"], job.config["adapter"]["name"]


def label(key: tuple[str, str]) -> str:
    kind, adapter = key
    return LABELS["none"] if key == NOT_FINE_TUNED else f"{LABELS.get(kind, kind)} + {adapter}"


# ----- reading the jobs -------------------------------------------------------------------------------------------

def step_seconds(job: Job) -> list[float]:
    """Wall time of every logged training step, from the CSV log's train/tokens_per_s."""
    tokens = job.config["data"]["batch_size"] * job.config["data"]["seq_len"]
    with open(job.out_dir / "csv" / "metrics.csv") as f:
        rates = [float(r["train/tokens_per_s"]) for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    return [tokens / r for r in rates if r > 0]


def trainable_params(job: Job) -> Optional[int]:
    hp = job.out_dir / "csv" / "hparams.yaml"
    return yaml.safe_load(hp.read_text()).get("params/trainable") if hp.exists() else None


def key_placement(window: int, digits: int) -> Callable[[int, float], str]:
    """Where the key sits in each (context length, depth) prompt of the grid relative to the last `window` tokens
    of the prompt (those before the query predicting the first answer token, index n-1, included): 'beyond' if the
    whole key is before them, 'within' if the whole key is inside them, 'partial' otherwise. The geometry does not
    depend on the haystack (its tokens are cut to length)."""
    from hybridlm.data.synthetic import passkey_prompt
    from hybridlm.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()

    def where(n: int, depth: float) -> str:
        p = passkey_prompt(tok, n, depth, key=10 ** (digits - 1))
        first, last = p.key_pos, p.key_pos + len(p.answer_ids) - 1
        return "beyond" if last < n - window else "within" if first >= n - window else "partial"

    return where


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def summarize_eval(job: Job, where: Callable[[int, float], str], lengths: list[int]) -> dict:
    if not job.ok:
        return {"error": f"evaluation failed: {job.error}"}
    report = job.out_dir / job.config["eval"]["out_dir"]
    passkey = json.loads((report / "passkey.json").read_text())
    cells = [{"context_len": n, "depth": d, "accuracy": a, "key": where(n, d)} for n, d, a in passkey["rows"]]
    with open(report / "loss_by_position_per_position.csv") as f:
        loss = [float(r["mean_loss"]) for r in csv.DictReader(f)]
    attention = json.loads((report / "loss_by_position.json").read_text())["meta"]["attention"]
    by_len = sorted({c["context_len"] for c in cells})
    return {"attention_used": attention,
            "ppl": {str(L): math.exp(mean(loss[:L - 1])) for L in lengths if L - 1 <= len(loss)},
            "needle_by_length": {str(n): mean([c["accuracy"] for c in cells if c["context_len"] == n])
                                 for n in by_len},
            "needle_beyond_T": mean([c["accuracy"] for c in cells if c["key"] == "beyond"]),
            "needle_cells": cells, "needle_samples_per_cell": passkey["meta"]["samples_per_cell"],
            "loss_per_position": loss, "eval_seconds": job.wall_seconds}


def binned(loss: list[float], bin_len: int) -> list[float]:
    """The mean loss per bin of bin_len positions."""
    return [mean(loss[s:s + bin_len]) for s in range(0, len(loss), bin_len)]


def rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, list):
        return [rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return x


CURVE_BIN = 16  # positions per bin of the loss curves kept in results.json
CURVE = f"loss_by_position_bins_of_{CURVE_BIN}"


def for_json(row: dict) -> dict:
    """The row with the per-position losses in bins of CURVE_BIN (each run's full curve stays in its
    length_eval/loss_by_position_per_position.csv) and floats rounded to 4 decimals, to keep results.json small."""
    out = {k: v for k, v in row.items() if k != "evals"}
    out["evals"] = {}
    for name, ev in row.get("evals", {}).items():
        ev = {k: v for k, v in ev.items() if k != "loss_per_position"}
        if "loss_per_position" in row["evals"][name]:
            ev[CURVE] = binned(row["evals"][name]["loss_per_position"], CURVE_BIN)
        out["evals"][name] = ev
    return rounded(out)


def seed_groups(jobs: list[Job]) -> list[list[Job]]:
    """The jobs of each pretraining run: itself, the fine-tuning and timing jobs initialised from its checkpoint
    and the evaluations of any of those checkpoints."""
    pretrains = [j for j in jobs if stage(j) == "pretrain"]
    if not pretrains:
        raise ValueError("found no pretraining run (+experiment=sespan/repro/pretrain)")
    groups = []
    for pre in pretrains:
        ckpt = checkpoint(pre)
        tuned = [j for j in jobs if stage(j) in ("adapt", "timing") and j.override("init_from")
                 and Path(j.override("init_from")).resolve() == ckpt]
        ckpts = {ckpt} | {checkpoint(j) for j in tuned if stage(j) == "adapt"}
        evals = [j for j in jobs if stage(j) == "eval" and Path(j.override("ckpt_path") or "").resolve() in ckpts]
        groups.append([pre, *tuned, *evals])
    return groups


def collect(jobs: list[Job], command: str, loss_bin: int) -> tuple[list[dict], dict]:
    """One row per model (the pretrained one, then each kind x recipe) with its evaluations under "evals"
    ({full, same}), and the settings and figures the tables quote: the jobs of one pretraining run (one seed)."""
    by_stage = {s: [j for j in jobs if stage(j) == s] for s in STAGES}
    (pre,) = by_stage["pretrain"]
    adapt = {row_key(j): j for j in by_stage["adapt"]}
    timing = {row_key(j): j for j in by_stage["timing"]}
    evals = {(Path(j.override("ckpt_path")).resolve(), j.config["eval"]["attention"]): j for j in by_stage["eval"]}
    eval_cfg = next((j.config["eval"] for j in by_stage["eval"] if j.ok), {})
    adapt_cfg = next((j.config for j in adapt.values() if j.ok), None)
    T = pre.config["data"]["seq_len"]
    L = adapt_cfg["data"]["seq_len"] if adapt_cfg else 8 * T
    E = eval_cfg.get("max_len") or 16 * T
    lengths = [n for n in (T, L, 2 * L, 4 * L) if n <= E]  # T, 8T, 16T, 32T
    where = key_placement(T, eval_cfg.get("passkey_digits", 5))

    rows = []
    for key in [*ROWS, *sorted(set(adapt) - set(ROWS))]:
        job = pre if key == NOT_FINE_TUNED else adapt.get(key)
        if job is None:
            continue
        row = {"attention": key[0], "adapter": key[1], "label": label(key), "evals": {}}
        if key == NOT_FINE_TUNED:
            row["trainable_params"] = 0
        elif not job.ok:
            row["error"] = f"training failed: {job.error}"
        else:
            times = step_seconds(job)
            timed = timing.get(key)
            alone = step_seconds(timed) if timed is not None and timed.ok else []
            row.update(step_seconds=statistics.median(times) if times else math.nan,
                       step_seconds_isolated=min(alone) if alone else math.nan,
                       trainable_params=trainable_params(job), peak_rss_mb=job.peak_rss_mb,
                       train_seconds=job.wall_seconds, log=str(job.log))
        if job.ok:
            for name in EVALS:
                ev = evals.get((checkpoint(job), name))
                row["evals"][name] = summarize_eval(ev, where, lengths) if ev else {"error": "no evaluation job"}
                if "error" in row["evals"][name]:
                    row.setdefault("error", f"eval.attention={name}: {row['evals'][name]['error']}")
        rows.append(row)

    last = last_finished(jobs)
    wall = wall_span_seconds(jobs)
    timed_steps = [len(step_seconds(j)) for j in by_stage["timing"] if j.ok]
    some_adapt = next(iter(adapt.values()), None)
    meta = {"command": command, "seed": pre.config.get("seed", 0),
            "wall_minutes": wall / 60 if wall is not None else math.nan,
            "cpus": last.resources["cpus"] if last else None,
            "load_average": " / ".join(f"{x:.1f}" for x in last.resources["load_average"]) if last else "?",
            "parallel": some_adapt.parallel if some_adapt else None,
            "threads": some_adapt.resources.get("threads") if some_adapt else None,
            "timing_steps": min(timed_steps) if timed_steps else 0,
            "pretrain_len": T, "adapt_len": L, "eval_len": E, "ppl_lengths": lengths,
            "window": pre.config["model"]["attn"].get("window"),
            "pretrain_steps": pre.config["trainer"]["max_steps"], "pretrain_batch": pre.config["data"]["batch_size"],
            "pretrain_mix_prob": pre.config["data"]["mix_prob"],
            "adapt_steps": adapt_cfg["trainer"]["max_steps"] if adapt_cfg else None,
            "adapt_batch": adapt_cfg["data"]["batch_size"] if adapt_cfg else None,
            "adapt_lr": adapt_cfg["optim"]["lr"] if adapt_cfg else None,
            "se_attn": adapt[("se_attn", "hylora")].config["model"]["attn"] if ("se_attn", "hylora") in adapt else None,
            "needle_lengths": eval_cfg.get("passkey_lengths"), "needle_depths": eval_cfg.get("passkey_depths"),
            "needle_samples": eval_cfg.get("passkey_samples"), "loss_sequences": eval_cfg.get("n_sequences"),
            "loss_bin": loss_bin,
            "pretrain": {"seconds": pre.wall_seconds, "peak_rss_mb": pre.peak_rss_mb}}
    meta["orderings"] = orderings(rows, lengths[1:])
    return rows, meta


# ----- the paper's orderings, computed ----------------------------------------------------------------------------

def holds(a: float, b: float, op: str) -> bool:
    return a <= b if op == "<=" else a < b


def orderings(rows: list[dict], lengths: list[int]) -> list[dict]:
    """Each pair of the paper's ordering, per table, at each length from 8T on: ours and the paper's truth value;
    then the needle target. A comparison with a missing number is left out."""
    hy = {r["attention"]: r for r in rows if r["adapter"] in ("hylora", "none")}
    out = []
    for name, paper in (("full", PAPER_TABLE1), ("same", PAPER_TABLE2)):
        # Our lengths from 8T on, aligned with the paper's columns from its fine-tuning length on.
        paper_cols = {"full": 1, "same": 0}[name]
        for a, b, op in ORDERING:
            cells = []
            for i, n in enumerate(lengths):
                ppl = [hy.get(k, {}).get("evals", {}).get(name, {}).get("ppl", {}).get(str(n)) for k in (a, b)]
                if None in ppl or paper_cols + i >= len(paper[a]):
                    continue
                cells.append({"length": n, "ours": holds(*ppl, op),
                              "paper": holds(paper[a][paper_cols + i], paper[b][paper_cols + i], op)})
            if cells:
                out.append({"table": name, "claim": f"{LABELS[a]} {op} {LABELS[b]}", "cells": cells,
                            "reproduced": all(c["ours"] == c["paper"] for c in cells)})
    for name in EVALS:
        acc = [hy.get(k, {}).get("evals", {}).get(name, {}).get("needle_beyond_T") for k in ("se_attn", "full")]
        if None not in acc and not any(math.isnan(x) for x in acc):
            # Undecided (None) when full attention finds no needle: there is nothing to keep.
            out.append({"table": name, "claim": f"needle beyond T: SE-Attn >= {NEEDLE_TARGET} x Full-Attn",
                        "se_attn": acc[0], "full": acc[1],
                        "reproduced": acc[0] >= NEEDLE_TARGET * acc[1] if acc[1] > 0 else None})
    return out


# ----- several seeds ----------------------------------------------------------------------------------------------

def load_seeds(path: Path) -> list[tuple[list[dict], dict]]:
    """(rows, meta) of each seed in a results.json this reader wrote (one seed: {meta, runs}; several: {seeds})."""
    data = json.loads(path.read_text())
    if "seeds" in data:
        return [(s["runs"], s["meta"]) for s in data["seeds"]]
    meta = dict(data["meta"])
    meta.setdefault("seed", 0)  # written before seeds were recorded: `make repro-sespan`, the configs' seed 0
    return [(data["runs"], meta)]


def _union(lists) -> list:
    out = []
    for xs in lists:
        out += [x for x in xs if x not in out]
    return out


def over_seeds(seeds: list[tuple[list[dict], dict]]) -> list[dict]:
    """One row per model with every number as its spread over the seeds (mean, population std, min, max, n), and
    the mean loss curve."""
    keys = _union([(r["attention"], r["adapter"]) for r in rows] for rows, _ in seeds)
    out = []
    for key in keys:
        rs = [r for rows, _ in seeds for r in rows if (r["attention"], r["adapter"]) == key]
        row = {"attention": key[0], "adapter": key[1], "label": rs[0]["label"], "seeds": len(rs),
               "trainable_params": rs[0].get("trainable_params"), "evals": {}}
        for k in ("step_seconds_isolated", "step_seconds", "peak_rss_mb"):
            row[k] = spread([finite(r.get(k)) for r in rs])
        errors = [r["error"] for r in rs if r.get("error")]
        if errors:
            row["error"] = f"{len(errors)} of {len(rs)} seeds: {errors[0]}"
        for name in EVALS:
            evs = [r["evals"][name] for r in rs if name in r["evals"] and "error" not in r["evals"][name]]
            if not evs:
                continue
            curves = [e[CURVE] for e in evs if e.get(CURVE)]
            n = min(map(len, curves)) if curves else 0
            row["evals"][name] = {
                "attention_used": evs[0].get("attention_used"),
                "ppl": {L: spread([finite(e["ppl"].get(L)) for e in evs]) for L in _union(e["ppl"] for e in evs)},
                "needle_by_length": {L: spread([finite(e["needle_by_length"].get(L)) for e in evs])
                                     for L in _union(e["needle_by_length"] for e in evs)},
                "needle_beyond_T": spread([finite(e.get("needle_beyond_T")) for e in evs]),
                CURVE: [mean([c[i] for c in curves]) for i in range(n)]}
        out.append(row)
    return out


def means(x):
    """x with every spread replaced by its mean (the rows the paper's orderings are judged on)."""
    if isinstance(x, dict):
        return x["mean"] if set(x) == {"mean", "std", "min", "max", "n"} else {k: means(v) for k, v in x.items()}
    return [means(v) for v in x] if isinstance(x, list) else x


def verdicts_by_claim(seeds: list[tuple[list[dict], dict]]) -> dict[tuple[str, str], list[tuple[int, Optional[bool]]]]:
    """(table, claim) -> [(seed, reproduced)] over the seeds."""
    out: dict = {}
    for _, meta in seeds:
        for o in meta["orderings"]:
            out.setdefault((o["table"], o["claim"]), []).append((meta["seed"], o["reproduced"]))
    return out


# ----- outputs ----------------------------------------------------------------------------------------------------

def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def cell(x, spec: str) -> str:
    """A number, or its spread over seeds as mean ± population std."""
    if isinstance(x, dict):
        return format(x["mean"], spec) + (f" ± {format(x['std'], spec)}" if x["n"] > 1 else "")
    return fmt(x, spec)


def length_name(n: int, T: int) -> str:
    return str(n) if n % T else "T" if n == T else f"{n // T}T"


def perplexity_table(rows: list[dict], meta: dict, name: str) -> list[str]:
    T, lengths = meta["pretrain_len"], meta["ppl_lengths"]
    if name == "full":
        ours, paper, paper_heads = lengths, PAPER_TABLE1, ["2048", "8192", "16384", "32768"]
    else:
        ours, paper, paper_heads = lengths[1:], PAPER_TABLE2, ["8192", "16384", "32768"]
    needle = [str(n) for n in meta["needle_lengths"] or []]
    head = (["model (fine-tuning attention + recipe)", "evaluated with"]
            + [f"PPL {length_name(n, T)}" for n in ours] + [f"paper PPL {h}" for h in paper_heads[:len(ours)]]
            + [f"needle {length_name(int(n), T)}" for n in needle] + ["needle beyond T"])
    if name == "full":
        head += ["s / step isolated", "s / step in run", "trainable params", "peak RSS (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ev = r["evals"].get(name, {})
        quoted = paper.get(r["attention"]) if r["adapter"] in ("hylora", "none") else None
        cells = [r["label"], ev.get("attention_used", "-")]
        cells += [cell(ev.get("ppl", {}).get(str(n)), ".2f") for n in ours]
        cells += [fmt(quoted[i], ".2f") if quoted else "-" for i in range(len(ours))]
        cells += [cell(ev.get("needle_by_length", {}).get(n), ".2f") for n in needle]
        cells += [cell(ev.get("needle_beyond_T"), ".2f")]
        if name == "full":
            cells += [cell(r.get("step_seconds_isolated"), ".2f"), cell(r.get("step_seconds"), ".2f"),
                      fmt(r.get("trainable_params"), ",d"), cell(r.get("peak_rss_mb"), ".0f")]
        if r.get("error"):
            cells[1] = f"FAILED: {r['error']}"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


VERDICT = {True: "reproduced", False: "NOT reproduced", None: "undecided"}


def ordering_lines(orderings_: list[dict], T: int, by_seed: Optional[dict] = None) -> list[str]:
    """One line per claim; with by_seed ((table, claim) -> [(seed, verdict)]) the verdict is the one on the means
    over the seeds, after the count of seeds that reproduce it."""
    lines = []
    for o in orderings_:
        verdict = VERDICT[o["reproduced"]]
        table = "Table 1, full attention" if o["table"] == "full" else "Table 2, same attention"
        if "cells" in o:
            detail = "; ".join(f"{length_name(c['length'], T)}: ours {'yes' if c['ours'] else 'no'}, paper "
                               f"{'yes' if c['paper'] else 'no'}" for c in o["cells"])
        else:
            detail = f"SE-Attn {o['se_attn']:.2f}, Full-Attn {o['full']:.2f}" + (
                "; full attention finds no needle" if o["reproduced"] is None else "")
        if by_seed is None:
            lines.append(f"- {o['claim']} ({table}): **{verdict}** ({detail})")
            continue
        seeds = by_seed.get((o["table"], o["claim"]), [])
        count = sum(v is True for _, v in seeds)
        per_seed = ", ".join(f"seed {s} {'yes' if v else 'no' if v is False else 'undecided'}" for s, v in seeds)
        lines.append(f"- {o['claim']} ({table}): reproduced in **{count} of {len(seeds)}** seeds ({per_seed}); "
                     f"on the means: **{verdict}** ({detail})")
    return lines


def settings_lines(meta: dict) -> list[str]:
    se = meta["se_attn"] or {}
    T, L, E = meta["pretrain_len"], meta["adapt_len"], meta["eval_len"]
    return [f"Pretraining: {meta['pretrain_steps']} steps at T={T} (sliding window {meta['window']}, i.e. full "
            f"attention at T), a share {meta['pretrain_mix_prob']} of the rows passkey sentences hidden in text. "
            f"Fine-tuning: {meta['adapt_steps']} steps at {L} tokens, batch {meta['adapt_batch']}, lr "
            f"{meta['adapt_lr']}, LoRA r 32 alpha 64. SE-Attn: chunk sizes {se.get('chunk_sizes')} (eval "
            f"{se.get('eval_chunk_size') or 'the largest'}), blocks of {se.get('block_size')}, top_k "
            f"{se.get('top_k')}, scorer {se.get('scorer')}. PPL: exp of the mean next-token loss over the first L "
            f"tokens of {meta['loss_sequences']} validation windows of {E} tokens. Needle: a passkey sentence at "
            f"depths {meta['needle_depths']} inside validation text, {meta['needle_samples']} prompts per (length, "
            "depth), exact match, mean over depths; beyond T: the cells whose key lies more than T tokens before "
            "the question's end.", "",
            "Paper: Nunez et al., *Expansion Span: Combining Fading Memory and Retrieval in Hybrid State Space "
            "Models*, NeuS 2025, PMLR 288:570-596, Tables 1 and 2 (PG-19 PPL of a 2.7B Mamba-2-Hybrid pretrained "
            "at 2048 and fine-tuned at 8192 with HyLoRA). Its columns are aligned by role: pretraining length, "
            "fine-tuning length, 2x and 4x it (the paper fine-tunes at 4x its pretraining length, we at 8x).", ""]


def wall_line(meta: dict) -> str:
    return (f"`{meta['command']}`: {meta['wall_minutes']:.1f} min wall on {meta['cpus']} CPU cores "
            f"(load average {meta['load_average']}: the machine was shared).")


def tables_lines(rows: list[dict], meta: dict, orderings_lines: list[str], level: str = "##") -> list[str]:
    return [f"{level} Evaluated with full attention (the paper's Table 1)", "",
            *perplexity_table(rows, meta, "full"), "",
            f"{level} Evaluated with the attention used in fine-tuning (the paper's Table 2)", "",
            *perplexity_table(rows, meta, "same"), "",
            f"{level} The paper's orderings (computed from the tables above and the quoted numbers)", "",
            *orderings_lines, ""]


def notes_lines(meta: dict) -> list[str]:
    return ["Notes:",
            "- not fine-tuned: the pretrained checkpoint; with the same attention it runs its sliding window.",
            "- S2-Attn trains with shifted groups and evaluates with full attention, so its two tables agree.",
            "- s / step isolated: the fastest of the "
            f"{meta['timing_steps']} timed steps of a short run of the kind + hylora at {meta['adapt_len']} tokens, "
            f"one job at a time; in run: the median step of the fine-tuning job ({meta['parallel']} jobs at a time, "
            f"{meta['threads']} thread(s) each, on a shared machine). Peak RSS: the fine-tuning job's own.",
            "- Differences of a few hundredths in PPL and of one prompt in the needle are within noise at this "
            "size.", ""]


def write_table(seeds: list[tuple[list[dict], dict]], mean_rows: Optional[list[dict]], mean_orderings: list[dict],
                command: str, path: Path) -> None:
    rows, meta = seeds[0]
    T = meta["pretrain_len"]
    title = f"# Expansion Span on CPU, the paper's protocol: a T={T} hybrid fine-tuned at {meta['adapt_len']} tokens"
    if mean_rows is None:
        lines = [title, "", wall_line(meta), "", *settings_lines(meta),
                 *tables_lines(rows, meta, ordering_lines(meta["orderings"], T)), *notes_lines(meta)]
    else:
        names = ", ".join(str(m["seed"]) for _, m in seeds)
        lines = [title, "", f"`{command}`: seeds {names} (the seed of pretraining and fine-tuning; the same "
                 "evaluation data for every seed). Each number over the seeds is the mean ± population std; each "
                 "seed's own tables, with the command that ran it, follow.", "", *settings_lines(meta),
                 *tables_lines(mean_rows, meta, ordering_lines(mean_orderings, T, verdicts_by_claim(seeds)),
                               f"## Over {len(seeds)} seeds:"), *notes_lines(meta)]
        for rows, m in seeds:
            lines += [f"## Seed {m['seed']}", "", wall_line(m), "",
                      *tables_lines(rows, m, ordering_lines(m["orderings"], T), "###")]
    path.write_text("\n".join(lines))


def write_figure(rows: list[dict], meta: dict, path: Path, loss_bin: int, seeds: int = 1) -> None:
    """Loss by position (the bins of 16 positions the rows keep, merged into bins of loss_bin) and the needle by
    length; over several seeds, their means."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    styles = {"hylora": "-", "none": ":", "lora": "--", "lora_plus": "-."}
    k = max(1, loss_bin // CURVE_BIN)
    over = f", mean of {seeds} seeds" if seeds > 1 else ""
    for ax, name in zip(axes[:2], EVALS):
        for r in rows:
            curve = r["evals"].get(name, {}).get(CURVE)
            if curve:
                xs = [CURVE_BIN * (i + k / 2) for i in range(0, len(curve), k)]
                ax.plot(xs, [mean(curve[i:i + k]) for i in range(0, len(curve), k)], styles.get(r["adapter"], "-"),
                        color=COLORS.get(r["attention"], "gray"), linewidth=1.2, label=r["label"])
        for x, text in ((meta["pretrain_len"], "T"), (meta["adapt_len"], "8T")):
            ax.axvline(x, color="gray", linewidth=0.8, linestyle="-.")
            ax.annotate(text, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -10),
                        textcoords="offset points", fontsize=8, color="gray")
        ax.set_xlabel(f"position (means over bins of {k * CURVE_BIN})")
        ax.set_ylabel("next-token loss (nats)")
        ax.set_title(f"loss by position, evaluated with {'full attention' if name == 'full' else 'the same'}{over}",
                     fontsize=9)
    axes[0].legend(fontsize=7)
    ax = axes[2]
    for r in rows:
        ev = means(r["evals"].get("full", {}).get("needle_by_length"))
        if ev:
            ax.plot([int(n) for n in ev], list(ev.values()), "o" + styles.get(r["adapter"], "-"),
                    color=COLORS.get(r["attention"], "gray"), label=r["label"])
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle exact match (mean over depths)")
    ax.set_title(f"needle in a text haystack, evaluated with full attention{over}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def write(sources: list[Path], out: Path, command: str, loss_bin: int = 128) -> bool:
    """Read the seeds of `sources` (folders of runs, results.json files written before), write the outputs to `out`;
    False when a job failed or a row is incomplete."""
    seeds, complete = [], True
    for src in map(Path, sources):
        if src.is_file():
            seeds += load_seeds(src)
            continue
        jobs = read_jobs(src)
        for group in seed_groups(jobs):
            rows, meta = collect(group, command, loss_bin)
            seeds.append(([for_json(r) for r in rows], rounded(meta)))
        complete &= not [j for j in jobs if stage(j) and not j.ok]
    complete &= all("error" not in r for rows, _ in seeds for r in rows)
    seeds.sort(key=lambda s: s[1]["seed"])
    numbers = [m["seed"] for _, m in seeds]
    if len(set(numbers)) < len(numbers):
        raise ValueError(f"seeds {numbers}: a seed appears in more than one source; give each seed once")
    out.mkdir(parents=True, exist_ok=True)
    if len(seeds) == 1:
        rows, meta = seeds[0]
        results = {"meta": meta, "runs": rows}
        mean_rows, mean_orderings, figure_rows = None, [], rows
    else:
        mean_rows = over_seeds(seeds)
        mean_orderings = orderings(means(mean_rows), seeds[0][1]["ppl_lengths"][1:])
        results = {"meta": {"command": command, "seeds": numbers, "orderings_on_means": mean_orderings,
                            "verdicts_by_seed": [{"table": t, "claim": c, "seeds": [{"seed": s, "reproduced": v}
                                                                                   for s, v in vs]}
                                                 for (t, c), vs in verdicts_by_claim(seeds).items()]},
                   "over_seeds": mean_rows, "seeds": [{"meta": m, "runs": r} for r, m in seeds]}
        figure_rows = mean_rows
    (out / "results.json").write_text(json.dumps(rounded(results), indent=1))
    write_table(seeds, mean_rows, mean_orderings, command, out / "table.md")
    write_figure(figure_rows, seeds[0][1], out / "figure.png", loss_bin, len(seeds))
    return complete
