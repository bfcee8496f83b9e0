"""`python -m hybridlm.generate ckpt_path=... prompt="..." max_new_tokens=64`: text from any checkpoint.

    python -m hybridlm.generate ckpt_path=outputs/.../last.ckpt prompt="Once upon a time" temperature=0.8 top_p=0.95
    python -m hybridlm.generate ckpt_path=/ckpts/mamba2-370m 'prompt="Hello, world: "' num_samples=4 out=gen.jsonl

Hydra trims an unquoted value and reads commas and brackets in it as its own syntax: quote the prompt inside the
argument, as in the second line, or give prompt_file=PATH.

ckpt_path is anything `hybridlm.convert.read_checkpoint` reads (a hybridlm .ckpt, a mamba_ssm or transformers
directory, a hub id). Generation streams the recurrent state (docs/design.md §2): the prompt is read in one
pass, then each new token is one step of the model with the state, never re-reading the text. Per token a
Mamba-2 layer costs the same at every position (its state has a fixed size), a sliding-window layer keeps the
last window-1 keys, full attention keeps every key. With num_samples > 1 the prompt is read once and its state
copied to every sample.

The tokenizer is the checkpoint's: for a hybridlm .ckpt the tokenizer of the run's data config, for a checkpoint
directory its tokenizer files, else the byte-level one (with a note); `tokenizer=` overrides. An empty prompt
samples a new document: generation starts after the end-of-document token, the token every document is read
after in training (hybridlm/data/tokenizers.py). Samples stop at that token too (stop_at_eod=true).

Output: each sample's text (prompt and continuation) on stdout, logs on stderr; with out=FILE, one JSON line
appended there with the token counts and speeds. Bad settings end with one line naming the key.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from hybridlm.cli import ConfigError, run_cli
from hybridlm.convert import find_tokenizer, load_state_dict_checked, read_checkpoint
from hybridlm.convert.base import Checkpoint
from hybridlm.models.hybrid_lm import HybridLM
from hybridlm.models.state import State, select_rows
from hybridlm.ops.config import BackendConfig
from hybridlm.runner import configure_backends
from hybridlm.sampling import check_sampling, next_token
from hybridlm.validation import need

log = logging.getLogger("hybridlm")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerateConfig:
    ckpt_path: Optional[str] = None  # a hybridlm .ckpt, a mamba_ssm / transformers directory, or a hub id
    prompt: Optional[str] = None  # the text to continue; "" samples a new document
    prompt_file: Optional[str] = None  # or: a UTF-8 file holding the prompt (no command-line quoting needed)
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    num_samples: int = 1
    seed: int = 0
    stop_at_eod: bool = True  # a sample ends at the end-of-document token
    tokenizer: Optional[str] = None  # None: the checkpoint's (see the module docstring)
    eod_token: Optional[str] = None  # end-of-document token of a loaded tokenizer (None: found automatically)
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu | float32 | bfloat16 | float16
    out: Optional[str] = None  # append a JSON line with token counts and speeds to this file
    backend: BackendConfig = field(default_factory=BackendConfig)

    def validate(self) -> None:
        need(bool(self.ckpt_path), "ckpt_path", "give the checkpoint (a .ckpt file, a checkpoint directory or a "
             "Hugging Face hub id)")
        need((self.prompt is None) != (self.prompt_file is None), "prompt",
             "give exactly one of prompt=TEXT (prompt='' starts a new document) and prompt_file=PATH")
        need(self.max_new_tokens >= 0, "max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        need(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        check_sampling(self.temperature, self.top_k, self.top_p)
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
             f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(self.device in ("auto", "cpu") or torch.cuda.is_available(), "device",
             f"{self.device}: no CUDA GPU here; use device=cpu")
        need(self.dtype == "auto" or self.dtype in DTYPES, "dtype",
             f"must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


# ------------------------------------------------------------------------------------------ generation

@torch.no_grad()
def token_stream(model: HybridLM, prompt: Tensor, pick: Callable[[Tensor], Tensor],
                 copies: int = 1) -> Iterator[tuple[Tensor, State]]:
    """Reads prompt (b, L >= 1) in one pass, then yields, without end, (tokens (b*copies,), state): the tokens
    `pick` chose from the last logits (b*copies, V), and the state that has read everything before them. Each
    step after the first is one model call on the previous tokens with the state. With copies > 1 every prompt
    row is read once and its logits and state are repeated (rows b0, b0, ..., b1, b1, ...)."""
    logits, state = model(prompt)
    last = logits[:, -1]
    if copies > 1:
        rows = torch.arange(prompt.shape[0], device=prompt.device).repeat_interleave(copies)
        last, state = last[rows], select_rows(state, rows)
    while True:
        tokens = pick(last)
        yield tokens, state
        logits, state = model(tokens[:, None], state)
        last = logits[:, -1]


def state_nbytes(state: State) -> int:
    """Memory held by a model state (its tensors; ints such as attention positions are not counted)."""
    return sum(t.numel() * t.element_size() for s in state if s is not None for t in s.values()
               if isinstance(t, Tensor))


@dataclass
class Generation:
    tokens: list[list[int]]  # per sample: the new tokens, up to and including the stop token
    prefill_seconds: float  # reading the prompt and choosing the first token
    decode_seconds: float  # every later token
    state_bytes: int  # the state the last token was chosen with


def generate(model: HybridLM, prompt: list[int], max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> Generation:
    """num_samples continuations of the token ids `prompt` (non-empty), each at most max_new_tokens long and
    ending early at stop_id; sampled as hybridlm.sampling.next_token does (temperature 0: greedy)."""
    if not prompt:
        raise ValueError("generate needs at least one prompt token")
    device = next(model.parameters()).device
    pick = lambda logits: next_token(logits, temperature, top_k, top_p, generator)  # noqa: E731
    rows: list[list[int]] = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    state_bytes, first_at = 0, None
    start = time.perf_counter()
    if max_new_tokens > 0:
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        for step, (tokens, state) in enumerate(token_stream(model, ids, pick, copies=num_samples)):
            for i, tok in enumerate(tokens.tolist()):  # .tolist() waits for the device: timings are real
                if not done[i]:
                    rows[i].append(tok)
                    done[i] = tok == stop_id
            if step == 0:
                first_at = time.perf_counter()
            state_bytes = state_nbytes(state)
            if step + 1 == max_new_tokens or all(done):
                break
    end = time.perf_counter()
    first_at = first_at or end
    return Generation(rows, first_at - start, end - first_at, state_bytes)


# ------------------------------------------------------------------------------------------ the command

def typed_config(cfg: DictConfig) -> GenerateConfig:
    try:
        typed: GenerateConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GenerateConfig), cfg))
        typed.validate()
    except (ValueError, OmegaConfBaseException) as e:
        raise ConfigError(str(e)) from e
    return typed


def prompt_text(cfg: GenerateConfig) -> str:
    if cfg.prompt is not None:
        return cfg.prompt
    try:
        return Path(cfg.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"prompt_file: cannot read {cfg.prompt_file} ({e})") from e


def checkpoint_tokenizer(ckpt: Checkpoint, cfg: GenerateConfig):
    """The tokenizer to use with ckpt (a hybridlm.data.tokenizers.Tokenizer): `tokenizer=` if given, else the
    run's data tokenizer (hybridlm .ckpt), else the checkpoint directory's tokenizer files, else bytes."""
    from hybridlm.data.tokenizers import load_tokenizer  # here: the data package imports Lightning

    eod_token, source = cfg.eod_token, "tokenizer="
    if cfg.tokenizer:
        spec = cfg.tokenizer
    elif ckpt.run_config is not None:
        data = ckpt.run_config.get("data") or {}
        spec, source = data.get("tokenizer", "byte"), f"the run's data.tokenizer, stored in {ckpt.path}"
        eod_token = eod_token or data.get("eod_token")
    elif find_tokenizer(ckpt.path) is not None:
        spec, source = str(find_tokenizer(ckpt.path)), "the checkpoint's tokenizer files"
    else:
        spec, source = "byte", "the default, bytes"
        log.warning("note: %s has no tokenizer files (tokenizer.json or tokenizer_config.json): using the byte-level "
                    "tokenizer (UTF-8 bytes 0..255, end of document 256); pass the checkpoint's own with "
                    "tokenizer=DIR", ckpt.path)
    try:
        tokenizer = load_tokenizer(spec, eod_token)
    except (OSError, ValueError) as e:
        # The loader names data-config keys; here the same settings are `tokenizer` and `eod_token`.
        msg = str(e).replace("data.tokenizer", "tokenizer").replace("data.eod_token", "eod_token")
        raise ConfigError(f"{msg} (tokenizer from {source}; pass tokenizer=PATH)") from e
    vocab = ckpt.cfg.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"tokenizer: {tokenizer.name!r} ({source}) has {tokenizer.vocab_size} tokens, more than "
                          f"the checkpoint's vocab_size {vocab}: pass the checkpoint's own tokenizer with "
                          "tokenizer=PATH")
    return tokenizer


def run(cfg: DictConfig) -> dict:
    """What `python -m hybridlm.generate` does: prints the samples and returns (and with `out`, appends) the
    record of the run. Raises ConfigError or CheckpointError on bad input."""
    typed = typed_config(cfg)
    configure_backends(typed)
    text = prompt_text(typed)
    ckpt = read_checkpoint(typed.ckpt_path)
    tokenizer = checkpoint_tokenizer(ckpt, typed)
    device = typed.torch_device()
    dtype = typed.torch_dtype(device)
    model = HybridLM(ckpt.cfg)
    load_state_dict_checked(model, ckpt.state_dict, source=str(ckpt.path))
    model.to(device=device, dtype=dtype).eval()

    prompt = tokenizer.encode(text) or [tokenizer.eod_id]  # empty prompt: a new document starts after EOD
    generator = torch.Generator(device=device).manual_seed(typed.seed)
    gen = generate(model, prompt, typed.max_new_tokens, typed.num_samples, typed.temperature, typed.top_k,
                   typed.top_p, stop_id=tokenizer.eod_id if typed.stop_at_eod else None, generator=generator)
    texts = [tokenizer.decode(prompt + row) for row in gen.tokens]
    for i, sample in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i} ---")
        print(sample, flush=True)

    decoded_after_first = sum(max(len(r) - 1, 0) for r in gen.tokens)
    record = {
        "ckpt_path": str(ckpt.path), "format": ckpt.format, "tokenizer": tokenizer.name, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "prompt_tokens": len(prompt),
        "new_tokens": [len(r) for r in gen.tokens], "prefill_seconds": round(gen.prefill_seconds, 4),
        "decode_seconds": round(gen.decode_seconds, 4),
        # Decoding speed: the tokens after the first (which comes with the prompt pass), all samples together.
        "tokens_per_s": round(decoded_after_first / gen.decode_seconds, 2) if gen.decode_seconds > 0 else None,
        "state_bytes": gen.state_bytes, "texts": texts,
        "settings": {k: getattr(typed, k) for k in ("temperature", "top_k", "top_p", "num_samples", "seed",
                                                    "max_new_tokens", "stop_at_eod")},
    }
    if typed.out:
        try:
            with open(typed.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise ConfigError(f"out: cannot append to {typed.out} ({e})") from e
    return record


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


@hydra.main(version_base="1.3", config_path="pkg://hybridlm.conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    run_cli(run, cfg)


if __name__ == "__main__":
    main()
