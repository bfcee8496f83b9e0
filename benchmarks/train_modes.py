"""Training-step throughput by execution mode: eager or `compile=true` (torch.compile of the training forward,
hybridlm/lit.py), fp32 or bf16 autocast (what `trainer.precision=bf16-mixed` runs on CPU), and the loss each mode
reaches from the same initialisation on the same batches.

Models:
- lengthgen: conf/experiment/lengthgen/baseline.yaml as configured (2 Mamba-2 layers, d_model 64, d_state 64,
  T = 64, batch 32, recall_stream data, its AdamW + schedule): the model of the issue-13 sweep. All four modes.
- tiny 4x512: the `train` section's model (4 Mamba-2 layers, d_model 128, batch 4 x 512), random tokens: fp32
  and bf16 eager (compiling it takes minutes on 2 cores).

The modes of a model live in one process and take their steps in turn (step i of every mode, then step i + 1), so
a load spike on the shared machine hits all of them: the speed ratio to eager fp32 is taken per round, then the
median. A step is what Lightning runs: forward under autocast (bf16 modes), cross-entropy, backward, gradient
clipping at 1.0, AdamW, scheduler. The first steps of a compiled mode include compiling (reported apart).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import child_main, median, report, run_child

ROOT = Path(__file__).resolve().parent.parent
MODES = {"eager fp32": (False, False), "compiled fp32": (True, False), "eager bf16": (False, True),
         "compiled bf16": (True, True)}
WARMUP = 5  # steps not timed for throughput (the compiled modes compile in their first one or two)
LOSS_TAIL = 50  # the loss compared is the mean over the last LOSS_TAIL steps (at most half of them)


def _lengthgen(compile_: bool):
    from hydra import compose, initialize_config_dir

    from hybridlm.config import register_configs, to_config
    from hybridlm.data import HybridDataModule

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_config(compose("train", overrides=["+experiment=lengthgen/baseline", f"compile={compile_}"]))
    dm = HybridDataModule(cfg.data, model_vocab_size=cfg.model.vocab_size)
    dm.setup("fit")
    return cfg, iter(dm.train_dataloader())


def _tiny(compile_: bool):
    from hybridlm.config import to_config

    cfg = to_config({"compile": compile_, "model": {
        "d_model": 128, "layer_pattern": "MMMM", "vocab_size": 256,
        "ssm": {"d_state": 64, "headdim": 32, "chunk_size": 64}}})
    g = torch.Generator().manual_seed(1)

    def batches():
        while True:
            ids = torch.randint(0, 256, (4, 513), generator=g)
            yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    return cfg, batches()


def child(args: dict[str, Any]) -> dict[str, Any]:
    from hybridlm import ops
    from hybridlm.lit import HybridLMModule, lm_loss

    make = {"lengthgen": _lengthgen, "tiny 4x512": _tiny}[args["model"]]
    runs = {}
    for mode in args["modes"]:
        compile_, bf16 = MODES[mode]
        cfg, data = make(compile_)
        ops.configure(cfg.backend)
        torch.manual_seed(cfg.seed)
        module = HybridLMModule(cfg)
        opt = module.configure_optimizers()
        runs[mode] = {"module": module, "opt": opt["optimizer"], "sched": opt["lr_scheduler"]["scheduler"],
                      "data": data, "bf16": bf16, "times": [], "losses": []}
    for _ in range(args["steps"]):
        for r in runs.values():
            batch = next(r["data"])
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r["bf16"]):
                logits, _ = r["module"].train_forward(batch["input_ids"], None)
                loss = lm_loss(logits, batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(r["module"].parameters(), 1.0)
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            r["sched"].step()
            r["times"].append(time.perf_counter() - t)
            r["losses"].append(loss.item())
    return {mode: {"times": r["times"], "losses": r["losses"]} for mode, r in runs.items()}


def run(lengthgen_steps: int = 300, tiny_steps: int = 12) -> list[dict]:
    rows = []
    plans = [("lengthgen", list(MODES), lengthgen_steps, 64 * 32), ("tiny 4x512", ["eager fp32", "eager bf16"],
                                                                     tiny_steps, 4 * 512)]
    for model, modes, steps, tokens in plans:
        out = run_child("benchmarks.train_modes", {"model": model, "modes": modes, "steps": steps}, timeout=3600)
        base = out["eager fp32"]
        tail = min(LOSS_TAIL, steps // 2)
        base_loss = sum(base["losses"][-tail:]) / tail
        for mode in modes:
            r = out[mode]
            step_s = median(r["times"][WARMUP:])
            loss = sum(r["losses"][-tail:]) / tail
            rows.append({
                "model": model, "mode": mode, "tokens/s": tokens / step_s, "step ms": 1000 * step_s,
                "x eager fp32": median([b / a for a, b in zip(r["times"][WARMUP:], base["times"][WARMUP:])]),
                "first 2 steps s": sum(r["times"][:2]), "steps": steps, "final loss": loss,
                "loss vs eager fp32": f"{100 * (loss - base_loss) / base_loss:+.2f}%"})
    report("train_modes", "Training step by mode (same init and batches per model; modes alternate step by step; "
           f"final loss: mean of the last min({LOSS_TAIL}, steps/2) steps)", rows,
           ["model", "mode", "tokens/s", "step ms", "x eager fp32", "first 2 steps s", "steps", "final loss",
            "loss vs eager fp32"])
    return rows


if __name__ == "__main__":
    child_main(child)
