"""What `python -m hybridlm.train` does, kept apart from the Hydra entry point so tests can call it."""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hybridlm import ops
from hybridlm.checkpointing.callbacks import AtomicCheckpointIO, RunStateCallback, StepCheckpoint, save_final_checkpoint
from hybridlm.checkpointing.io import CheckpointError
from hybridlm.checkpointing.resume import choose_resume_checkpoint, resume_point
from hybridlm.cli import ConfigError, ensure_writable
from hybridlm.config import Config, to_config
from hybridlm.console import StepProgressBar, filter_library_messages
from hybridlm.convert import (
    Checkpoint,
    find_tokenizer,
    load_state_dict_checked,
    merge_model_config,
    read_checkpoint,
)
from hybridlm.eval import LengthEvalCallback
from hybridlm.guards import NonFiniteGuard
from hybridlm.interventions import build_intervention
from hybridlm.lit import HybridLMModule
from hybridlm.loggers import build_loggers, closing_wandb, truncate_csv_log, wandb_run_dir
from hybridlm.models.hybrid_lm import HybridLM

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

log = logging.getLogger("hybridlm")
# The Hydra configs: conf/ of the repository, installed as the package hybridlm.conf (the entry points' config_path
# is "pkg://hybridlm.conf"), so a wheel finds them too. Wheels install unpacked: this is a real directory.
CONF_DIR = Path(str(resources.files("hybridlm.conf")))


def typed_config(cfg: DictConfig) -> Config:
    try:
        return to_config(cfg)
    except OmegaConfBaseException as e:
        # OmegaConf's str() adds context lines (full_key, reference_type, object_type): keep one line
        key, msg = getattr(e, "full_key", None), str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key and not msg.startswith(f"{key}:") else msg) from e
    except ValueError as e:
        raise ConfigError(str(e)) from e


def configure_backends(cfg: Config) -> None:
    """Pick each op's implementation once, before the model is built; a backend that cannot run here is a
    config error that says why."""
    try:
        ops.configure(cfg.backend)
    except ops.BackendUnavailableError as e:
        raise ConfigError(str(e)) from e
    log.info("op backends:\n%s", ops.describe())  # once per run: the registry logs it at DEBUG only


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def config_dirs() -> list[Traversable]:
    """Where this job's config files come from, in Hydra's order (the first that has a file wins): the package's
    configs, then the folders added with hydra.searchpath. Outside a Hydra job: the package's configs."""
    if not HydraConfig.initialized():
        return [CONF_DIR]
    sources = HydraConfig.get().runtime.config_sources
    return [Path(s.path) if s.schema == "file" else resources.files(s.path) for s in sources
            if s.schema in ("file", "pkg")]


def explicit_model_keys(task_overrides: list[str], conf_dirs: Optional[list[Traversable]] = None) -> set[str]:
    """Model keys the user set on the command line ("model.ssm.d_state=32", or every key of a chosen file in a
    model group such as "model/attention=se_attn"): with init_from these must agree with the checkpoint."""
    dirs = config_dirs() if conf_dirs is None else conf_dirs
    keys: set[str] = set()
    for ov in task_overrides:
        key, _, value = ov.lstrip("+~").partition("=")
        if key.startswith("model."):
            keys.add(key.removeprefix("model."))
        elif key == "model" or key.startswith("model/"):
            found = [f for f in (d / key / f"{value}.yaml" for d in dirs) if f.is_file()]
            if not found:
                raise ConfigError(f"{ov}: no {key}/{value}.yaml in the config folders {[str(d) for d in dirs]}")
            with found[0].open() as f:
                node = OmegaConf.load(f)
            prefix = {"model": "", "model/attention": "attn."}.get(key, key.removeprefix("model/") + ".")
            flat = OmegaConf.to_container(node)
            flat.pop("defaults", None)
            keys |= {prefix + k for k in _dotted(flat)}
    return keys


def _dotted(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def read_checkpoint_for(key: str, path: str) -> Checkpoint:
    """read_checkpoint(path) for the config key that names it; its error names the key too."""
    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from e


def checkpoint_tokenizer(ckpt: Checkpoint) -> Optional[str]:
    """The tokenizer a checkpoint goes with: the one its training run used (a hybridlm .ckpt), else the one
    stored beside it (an official checkpoint directory); None when unknown."""
    if ckpt.run_config is not None:
        return (ckpt.run_config.get("data") or {}).get("tokenizer")
    found = find_tokenizer(ckpt.path)
    return str(found) if found is not None else None


def build_datamodule(cfg: Config, ckpt: Optional[Checkpoint] = None, key: str = "init_from"):
    """The data for cfg, its tokenizer checked against the model's vocabulary: the checkpoint's when the model
    comes from one (given as config key `key`), since the checkpoint fixes model.vocab_size. The corpus is read
    (and checked against seq_len and batch_size) now, not when the Trainer sets the data up, so a data error ends
    the command before the Trainer starts; it stays cached for the Trainer."""
    from hybridlm.data import HybridDataModule

    if ckpt is None:
        datamodule = HybridDataModule(cfg.data, model_vocab_size=cfg.model.vocab_size)
    else:
        datamodule = HybridDataModule(cfg.data, model_vocab_size=ckpt.cfg.vocab_size,
                                      checkpoint=f"{key}={ckpt.path}", checkpoint_tokenizer=checkpoint_tokenizer(ckpt))
    datamodule.batch_source()  # this rank's, with world_size 1: the Trainer's world only adds rows to check
    return datamodule


def build_model(cfg: Config, explicit_keys: set[str], ckpt: Optional[Checkpoint] = None) -> HybridLM:
    """The model to train: from scratch, or from `init_from` (architecture read from the checkpoint, compatible
    overrides on top), with the adapter recipe applied. Updates cfg.model to what was built. ckpt: init_from,
    already read."""
    from hybridlm.adapters import (
        apply_adapter,
        format_parameter_table,
        recipe_attention_kind,
        trainable_parameter_table,
    )

    sd = None
    if cfg.init_from:
        ckpt = ckpt or read_checkpoint_for("init_from", cfg.init_from)
        sd = ckpt.state_dict
        cfg.model = merge_model_config(ckpt.cfg, cfg.model, explicit_keys)
    recipe_kind = recipe_attention_kind(cfg.adapter)
    if recipe_kind is not None and "A" in cfg.model.layer_pattern:
        cfg.model.attn.kind = recipe_kind  # e.g. longlora trains with S2-Attn; evaluation uses full attention
    model = HybridLM(cfg.model)
    if sd is not None:
        load_state_dict_checked(model, sd, source=cfg.init_from)
        log.info("initialised from %s", cfg.init_from)
    if cfg.adapter.name != "none":
        if not cfg.init_from:
            log.warning("adapter=%s without init_from: adapting a randomly initialised model", cfg.adapter.name)
        apply_adapter(model, cfg.adapter)
        log.info("adapter %s: trainable parameters\n%s", cfg.adapter.name,
                 format_parameter_table(trainable_parameter_table(model)))
    return model


def build_callbacks(cfg: Config, ckpt_dir: Path) -> list[Callback]:
    c = cfg.checkpoint
    callbacks: list[Callback] = [
        RunStateCallback(cfg.seed),  # first: seeds the global RNGs before any other callback draws
        NonFiniteGuard(cfg.guard),
        StepCheckpoint(dirpath=str(ckpt_dir), filename="step{step:06d}", auto_insert_metric_name=False,
                        save_last=True, save_top_k=c.keep_last, monitor="step", mode="max",
                        every_n_train_steps=c.every_n_steps or None,
                        train_time_interval=timedelta(minutes=c.every_n_minutes) if c.every_n_minutes else None),
    ]
    if c.save_best:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=c.monitor, mode="min",
                                         save_top_k=1, auto_insert_metric_name=False))
    intervention = build_intervention(cfg.intervention)
    if intervention is not None:
        callbacks.append(intervention)
    if cfg.eval.diagnostics and (cfg.eval.every_n_val > 0 or cfg.eval.at_fit_end):
        callbacks.append(LengthEvalCallback(cfg.eval))
    return callbacks


def local_rank() -> int:
    """This process's rank on its node, known before any Trainer exists: Lightning's launcher (and torchrun)
    start the ranks above 0 with LOCAL_RANK set."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def end_with_launcher() -> None:
    """Make a DDP rank > 0 die with the process that launched it. Lightning starts those ranks as children of
    rank 0's process; when that one is killed (kill -9, the OOM killer), they could otherwise wait in a
    collective until its timeout (30 minutes by default with NCCL), holding their memory and the GPU."""
    if local_rank() == 0 or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1  # prctl option from <linux/prctl.h>: a signal for this process when its parent dies
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) != 0:
        log.warning("could not ask Linux to end this rank with its launcher (errno %d)", ctypes.get_errno())
    elif os.getppid() == 1:  # the launcher died before the request: nobody is left to train with
        os._exit(1)


def progress_bar(enabled: bool) -> list[Callback]:
    return [StepProgressBar()] if enabled else []  # Lightning refuses a bar callback when the bar is disabled


def log_model_size(model: HybridLM) -> None:
    # In place of Lightning's model summary, whose FLOPs column reads 0 for a model without an example input.
    params = list(model.parameters())
    log.info("model: %s parameters (%s non-embedding), %s trainable", f"{sum(p.numel() for p in params):,}",
             f"{model.num_params(non_embedding=True):,}", f"{sum(p.numel() for p in params if p.requires_grad):,}")


def train(cfg: DictConfig, out_dir: Path, explicit_keys: Optional[set[str]] = None) -> dict:
    end_with_launcher()
    filter_library_messages()
    typed = typed_config(cfg)
    configure_backends(typed)
    if explicit_keys is None:
        in_hydra = HydraConfig.initialized()
        explicit_keys = explicit_model_keys(list(HydraConfig.get().overrides.task)) if in_hydra else set()
    try:
        resume_ckpt = choose_resume_checkpoint(typed, out_dir, local_rank())
        resume = resume_point(resume_ckpt) if resume_ckpt else None
    except CheckpointError as e:
        raise ConfigError(f"resume: {e}") from e
    if resume_ckpt is not None and typed.resume == "auto":
        out_dir = resume_ckpt.parent.parent  # continue in the run's own directory
    ensure_writable(out_dir)
    if resume is not None and local_rank() == 0:
        # The killed run may have logged steps past its checkpoint: they are logged again from here.
        truncate_csv_log(out_dir / "csv" / "metrics.csv", from_step=resume.global_step)
    L.seed_everything(typed.seed, workers=True, verbose=False)

    init = read_checkpoint_for("init_from", typed.init_from) if typed.init_from else None
    datamodule = build_datamodule(typed, init, "init_from")
    model = build_model(typed, explicit_keys, init)
    log_model_size(model)
    module = HybridLMModule(typed, model=model)
    loggers = build_loggers(typed.logger, out_dir, run_name=f"{typed.experiment_name}/{out_dir.name}",
                            run_id=resume.wandb_run_id if resume else None)
    with closing_wandb(loggers):  # when training raises, too: the W&B run is then marked failed
        ckpt_dir = out_dir / "checkpoints"
        t = typed.trainer
        trainer = L.Trainer(
            default_root_dir=str(out_dir),
            max_steps=t.max_steps,
            val_check_interval=t.val_check_interval,
            check_val_every_n_epoch=None,
            limit_val_batches=t.limit_val_batches,
            accumulate_grad_batches=t.accumulate_grad_batches,
            gradient_clip_val=t.gradient_clip_val or None,
            precision=resolve_precision(t.precision),
            accelerator=t.accelerator,
            devices=t.devices,
            strategy=t.strategy,
            num_nodes=t.num_nodes,
            log_every_n_steps=t.log_every_n_steps,
            enable_progress_bar=t.enable_progress_bar,
            enable_model_summary=False,
            fast_dev_run=t.fast_dev_run,
            deterministic=t.deterministic,
            logger=loggers or False,
            callbacks=build_callbacks(typed, ckpt_dir) + progress_bar(t.enable_progress_bar),
            plugins=[AtomicCheckpointIO()],
            num_sanity_val_steps=0,
        )
        start = time.time()
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
        save_final_checkpoint(trainer, ckpt_dir / "last.ckpt")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        result = {"out_dir": str(out_dir), "metrics": metrics, "seconds": round(time.time() - start, 1),
                  "checkpoint": str(ckpt_dir / "last.ckpt") if (ckpt_dir / "last.ckpt").exists() else None,
                  "csv": str(out_dir / "csv" / "metrics.csv") if (out_dir / "csv" / "metrics.csv").exists() else None,
                  "wandb": wandb_run_dir(loggers), "adapter": None}
        if trainer.is_global_zero and typed.adapter.name not in ("none", "full"):
            from hybridlm.adapters import save_adapter

            # The adapter alone (LoRA weights + the recipe's trainable base parameters): small and portable.
            result["adapter"] = str(save_adapter(model, out_dir / "adapter.safetensors"))
        if trainer.is_global_zero:
            report(result)
    return result


def evaluate(cfg: DictConfig, out_dir: Path, task_overrides: Optional[list[str]] = None) -> dict:
    """Validation loss and (with eval diagnostics) the length report of cfg.ckpt_path, written to out_dir."""
    from hybridlm.eval import run_length_report, with_eval_attention

    filter_library_messages()
    if task_overrides is None:
        task_overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    typed = typed_config(cfg)
    configure_backends(typed)
    if not typed.ckpt_path:
        raise ConfigError("ckpt_path: give the checkpoint to evaluate (a .ckpt file or a checkpoint directory)")
    ckpt = read_checkpoint_for("ckpt_path", typed.ckpt_path)
    path = ckpt.path
    typed.model = merge_model_config(ckpt.cfg, typed.model, explicit_model_keys(task_overrides))
    data_keys = [k for k in (o.lstrip("+~").partition("=")[0] for o in task_overrides) if k.startswith("data")]
    user_set_data = bool(data_keys)
    if ckpt.run_config is not None and "data" not in data_keys:
        # Evaluate on what it was trained on, with the data.* keys given here on top (data.seq_len=4096: the
        # same task at another length); choosing a data file (data=files) replaces it whole.
        data = OmegaConf.create({"data": ckpt.run_config["data"]})
        for key in data_keys:
            OmegaConf.update(data, key, OmegaConf.select(cfg, key), merge=False)
        typed.data = typed_config(data).data
    elif typed.data.tokenizer == "byte" and find_tokenizer(path) is not None and not user_set_data:
        typed.data.tokenizer = str(find_tokenizer(path))  # an official checkpoint's own tokenizer
    typed.validate()
    ensure_writable(out_dir)
    L.seed_everything(typed.seed, workers=True, verbose=False)
    model = HybridLM(typed.model)
    load_state_dict_checked(model, ckpt.state_dict, source=str(path))
    model = with_eval_attention(model, typed.eval.attention)  # val/loss with it too (docs/design.md §4)
    module = HybridLMModule(typed, model=model)
    datamodule = build_datamodule(typed, ckpt, "ckpt_path")
    loggers = build_loggers(typed.logger, out_dir, run_name=f"eval/{path.name}")
    with closing_wandb(loggers):
        trainer = L.Trainer(default_root_dir=str(out_dir), logger=loggers or False,
                            accelerator=typed.trainer.accelerator, devices=1,
                            precision=resolve_precision(typed.trainer.precision),
                            limit_val_batches=typed.trainer.limit_val_batches,
                            enable_progress_bar=typed.trainer.enable_progress_bar,
                            callbacks=progress_bar(typed.trainer.enable_progress_bar))
        start = time.time()
        metrics = trainer.validate(module, datamodule=datamodule)[0] if typed.data.val_batches else {}
        report_dir = None
        if typed.eval.diagnostics:
            datamodule.setup("validate")
            report_dir = out_dir / typed.eval.out_dir
            for name, scalars in run_length_report(module.model, datamodule, typed.eval, report_dir, loggers).items():
                metrics.update({f"length_eval/{name}/{k}": v for k, v in scalars.items()})
        result = {"out_dir": str(out_dir), "metrics": {k: float(v) for k, v in metrics.items()},
                  "seconds": round(time.time() - start, 1), "checkpoint": None,
                  "csv": str(out_dir / "csv" / "metrics.csv") if (out_dir / "csv" / "metrics.csv").exists() else None,
                  "wandb": wandb_run_dir(loggers), "report": str(report_dir) if report_dir else None}
        report(result)
    return result


def report(result: dict) -> None:
    from hybridlm.usage import peak_rss_mb

    m = result["metrics"]
    parts = [f"val/loss {m['val/loss']:.4f}" if "val/loss" in m else None,
             f"checkpoint {result['checkpoint']}" if result["checkpoint"] else None,
             f"CSV log {result['csv']}" if result["csv"] else None,
             f"length report {result['report']}" if result.get("report") else None,
             f"adapter {result['adapter']}" if result.get("adapter") else None,
             (f"W&B run {result['wandb']}" + (" (offline: upload with `wandb sync " + result["wandb"] + "`)"
                                             if "offline-run" in result["wandb"] else "")) if result["wandb"] else None]
    parts.append(f"peak RSS {peak_rss_mb():.0f} MB")  # since the job started (hybridlm.usage)
    print(f"hybridlm: done in {result['seconds']:.0f}s; outputs in {result['out_dir']}: "
          + "; ".join(p for p in parts if p), flush=True)


def run_job(fn: Callable[[DictConfig, Path], dict], cfg: DictConfig) -> float:
    """Runs one job. In a multirun a failure is recorded in the job's result.json and the sweep goes on;
    in a single run it stops the program with the error (config errors without a traceback). result.json also
    holds the job's wall time and peak memory (hybridlm.usage), which `python -m hybridlm.results` tabulates."""
    from hybridlm.usage import JobUsage

    usage = JobUsage()  # starts the clock and resets the peak RSS: the job's own figures, in a shared process too
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    record = {"overrides": list(hc.overrides.task), "status": "ok", "error": None, "metrics": {},
              "out_dir": str(job_dir)}
    try:
        result = fn(cfg, job_dir)
        record.update(metrics=result.get("metrics", {}), out_dir=result.get("out_dir", str(job_dir)))
    except Exception as e:  # noqa: BLE001
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        if not multirun:
            raise  # the entry point's run_cli turns a user error into one line
        log.error("job %s failed:\n%s", hc.job.num, traceback.format_exc())
    finally:
        record["resources"] = usage.record()
        if local_rank() == 0:
            # In the job's directory, where the sweep summary reads it, and in the run's own directory when a
            # resumed run went on there.
            for d in {job_dir, Path(record["out_dir"])}:
                if d.exists():
                    (d / "result.json").write_text(json.dumps(record, indent=2))
    return float(record["metrics"].get("val/loss", float("nan")))
