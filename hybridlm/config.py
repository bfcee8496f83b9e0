"""Top-level structured config. Registered in Hydra's ConfigStore as the schema of conf/train.yaml, so every
key is typed: a typo fails at composition ("Key 'd_modle' not in 'ModelConfig'") and `validate()` checks
values before anything is built. Each subsystem owns its own dataclass (models/, data/, interventions/, ...)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from hybridlm.adapters.config import AdapterConfig
from hybridlm.data.config import DataConfig
from hybridlm.eval.config import EvalConfig
from hybridlm.interventions.config import InterventionConfig
from hybridlm.models.config import ModelConfig
from hybridlm.ops.config import BackendConfig
from hybridlm.validation import need


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1  # never applied to 1-D params: A_log, D, dt_bias, norms, biases
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at trainer.max_steps


@dataclass
class TrainerConfig:
    max_steps: int = 300
    val_check_interval: int = 100  # optimizer-independent: every N training batches
    limit_val_batches: int = 8
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    fast_dev_run: bool = False
    deterministic: bool = False


@dataclass
class LoggerConfig:
    csv: bool = True
    wandb: bool = True
    wandb_mode: str = "auto"  # auto: online if an API key is configured, else offline | online | offline
    project: str = "hybridlm"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    wandb_init_timeout: float = 60.0  # seconds W&B may take to start before the run goes on with CSV only


@dataclass
class CheckpointConfig:
    """Periodic checkpoints, written atomically; a step checkpoint due on a validation step is written after that
    validation. last.ckpt (always the newest) is written at every validation and at the end of training."""

    every_n_steps: int = 0  # 0: only at validation / end of training
    every_n_minutes: float = 0.0  # 0: off; with every_n_steps, whichever comes first
    keep_last: int = 2  # step checkpoints kept, besides last.ckpt and best.ckpt
    save_best: bool = True  # also keep best.ckpt (the lowest `monitor`)
    monitor: str = "val/loss"


@dataclass
class GuardConfig:
    """Numerical guard (hybridlm/guards.py): a step whose loss or gradient norm is not finite is never applied."""

    on_nonfinite: str = "skip"  # skip: drop the update and go on | stop: end the run at the first such step
    max_consecutive: int = 5  # skip: this many non-finite steps in a row end the run


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    intervention: InterventionConfig = field(default_factory=InterventionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment_name: str = "default"
    seed: int = 0
    init_from: Optional[str] = None  # a hybridlm checkpoint or an official mamba_ssm / HF Mamba-2 directory
    ckpt_path: Optional[str] = None  # evaluation: the checkpoint to evaluate
    resume: Optional[str] = None  # "auto" (newest last.ckpt of this experiment) or a checkpoint path
    compile: bool = False  # torch.compile (inductor) of the model's forward in training steps (lit.py)
    # Top-level keys the chosen experiment cannot run without (e.g. [init_from] for post-training). `???` cannot
    # say it: an experiment file's `???` does not replace the schema's default None when the configs merge.
    required: list[str] = field(default_factory=list)

    def resolve(self) -> None:
        """Settings whose `auto` depends on another group. The resolved value is what gets saved with the run."""
        if self.data.stream_mode == "auto":
            # TBTT continues each row's documents from batch to batch; every other intervention reads random
            # windows (state passing must hand its state to an unrelated window).
            self.data.stream_mode = "contiguous" if self.intervention.name == "tbtt" else "random"

    def validate(self) -> None:
        """Value checks that types cannot express; each message starts with the offending key. Run once per run,
        by `to_config`, with every subsystem's own checks."""
        for key in self.required:
            need(hasattr(self, key), "required", f"unknown key {key!r}")
            need(getattr(self, key) not in (None, ""), key,
                 f"experiment {self.experiment_name!r} needs it; set {key}=... on the command line")
        self.model.validate()
        self.data.validate()
        if "A" in self.model.layer_pattern and self.model.attn.kind == "se_attn":
            self.model.attn.check_se_geometry(self.data.seq_len)
        self.intervention.validate(data=self.data, model=self.model)  # tbtt: contiguous data; attention kind
        self.adapter.validate()
        self.eval.validate()  # the backend is checked by ops.configure, which knows what this machine can run
        t, o = self.trainer, self.optim
        need(t.max_steps > 0 or t.fast_dev_run, "trainer.max_steps", f"must be positive, got {t.max_steps}")
        need(t.val_check_interval > 0, "trainer.val_check_interval", f"must be positive, got {t.val_check_interval}")
        need(t.accumulate_grad_batches > 0, "trainer.accumulate_grad_batches", "must be positive")
        need(t.gradient_clip_val >= 0, "trainer.gradient_clip_val", "must be >= 0")
        need(t.precision in ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "64-true"),
             "trainer.precision", f"unknown precision {t.precision!r}")
        need(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
        need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        need(self.logger.wandb_mode in ("auto", "online", "offline"), "logger.wandb_mode",
             f"must be auto, online or offline, got {self.logger.wandb_mode!r}")
        need(self.logger.wandb_init_timeout > 0, "logger.wandb_init_timeout", "must be positive")
        need(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        need(self.checkpoint.every_n_steps >= 0, "checkpoint.every_n_steps", "must be >= 0 (0: off)")
        need(self.checkpoint.every_n_minutes >= 0, "checkpoint.every_n_minutes", "must be >= 0 (0: off)")
        need(self.guard.on_nonfinite in ("skip", "stop"), "guard.on_nonfinite",
             f"must be skip or stop, got {self.guard.on_nonfinite!r}")
        need(self.guard.max_consecutive >= 1, "guard.max_consecutive", "must be >= 1")


def to_config(cfg: Any) -> Config:
    """An OmegaConf node or plain dict (e.g. from a checkpoint's hyper_parameters) -> typed, validated Config."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    typed: Config = OmegaConf.to_object(merged)
    typed.resolve()
    typed.validate()
    return typed


def _div(a: Any, b: Any) -> int:
    """${div:a,b}: integer floor division, for keys that scale with another (the failure map keeps the tokens per
    step fixed across T with data.batch_size: ${div:4096,${data.seq_len}})."""
    a, b = int(a), int(b)
    if b <= 0:
        raise ValueError(f"${{div:{a},{b}}}: the divisor must be > 0")
    return a // b


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=Config)
    if not OmegaConf.has_resolver("div"):
        OmegaConf.register_new_resolver("div", _div)
