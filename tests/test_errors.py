"""One-line errors for files and data (hybridlm/cli.py): a missing or corrupt checkpoint, a missing data path or
tokenizer, a vocabulary smaller than the tokenizer's, a window longer than the corpus, an output directory that
cannot be written. Each case runs through the function the command calls (runner.train, runner.evaluate,
export.main) and checks the error's class (what run_cli turns into one line) and that its message names the key or
file and what to do; a few run the real command in a subprocess. Also: a zero-length input gives an empty output
and leaves the state as it was, for every op and layer kind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hybridlm import ops, runner
from hybridlm.checkpointing.io import CheckpointError
from hybridlm.cli import USER_ERRORS, ConfigError, error_line, run_cli
from hybridlm.config import register_configs
from hybridlm.convert import export
from hybridlm.data.errors import DataError
from hybridlm.export import main as export_main
from hybridlm.models.config import ModelConfig
from hybridlm.models.hybrid_lm import HybridLM

TINY = ["model.d_model=32", "model.ssm.d_state=16", "model.ssm.headdim=16", "model.attn.window=16",
        "data.seq_len=32", "data.batch_size=2", "data.val_batches=1", "trainer.limit_val_batches=1",
        "trainer.max_steps=1", "logger=csv", "trainer.enable_progress_bar=false"]
TORCH_ADVICE = "weights_only=False"  # torch's advice for a file it refuses: never passed on


# ------------------------------------------------------------------------------------------------ helpers

def compose_cfg(name: str, overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(runner.CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


def train_error(tmp_path: Path, overrides: list[str]) -> Exception:
    """The error runner.train (what `python -m hybridlm.train` runs) raises for these overrides."""
    with pytest.raises(tuple(USER_ERRORS)) as e:
        runner.train(compose_cfg("train", [*TINY, *overrides]), tmp_path / "run", explicit_keys=set())
    return e.value


def evaluate_error(tmp_path: Path, overrides: list[str]) -> Exception:
    overrides = [*overrides, "logger=csv", "trainer.enable_progress_bar=false"]
    with pytest.raises(tuple(USER_ERRORS)) as e:
        runner.evaluate(compose_cfg("evaluate", overrides), tmp_path / "eval", task_overrides=overrides)
    return e.value


def export_error(tmp_path: Path, ckpt_path) -> Exception:
    with pytest.raises(tuple(USER_ERRORS)) as e:
        export_main([f"ckpt_path={ckpt_path}", f"out={tmp_path / 'export'}"])
    return e.value


def check_line(e: Exception, cls: type, *parts: str) -> str:
    """e is a cls whose command line is one line holding every part and none of torch's advice."""
    assert isinstance(e, cls), repr(e)
    line = error_line(e)
    assert line is not None and "\n" not in line, line
    assert TORCH_ADVICE not in line, line
    for part in parts:
        assert part in line, (part, line)
    return line


def bpe_tokenizer(directory: Path, vocab_size: int) -> Path:
    """A byte-level BPE with about vocab_size tokens, saved as directory/tokenizer.json."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, the pass key is 12345"] * 20,
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad checkpoints and data, and a good mamba_ssm checkpoint directory (vocab 257) with and without a
    tokenizer beside it."""
    d = tmp_path_factory.mktemp("files")
    cfg = ModelConfig(d_model=32, layer_pattern="MM", vocab_size=257)
    cfg.ssm.d_state, cfg.ssm.headdim = 16, 16
    torch.manual_seed(0)
    model = HybridLM(cfg)
    export(model, cfg, d / "mamba_ssm", format="mamba_ssm")
    export(model, cfg, d / "mamba_ssm_tok", format="mamba_ssm")
    bpe_tokenizer(d / "mamba_ssm_tok", 200)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, d / "whole.ckpt")
    (d / "truncated.ckpt").write_bytes((d / "whole.ckpt").read_bytes()[:3000])
    (d / "text.ckpt").write_text("these are my notes, not a checkpoint\n")
    (d / "empty_dir").mkdir()
    (d / "no_weights").mkdir()
    (d / "no_weights" / "config.json").write_text((d / "mamba_ssm" / "config.json").read_text())
    (d / "unusable").mkdir()
    (d / "unusable" / "a.txt").write_bytes(b"\x00\x01binary")
    (d / "unusable" / "b.txt").write_bytes(b"")
    (d / "unusable" / "c.txt").write_bytes(b"caf\xe9")  # latin-1
    (d / "short").mkdir()
    for i in range(60):  # 60 documents of ~7 tokens: some land in the validation split
        (d / "short" / f"{i}.txt").write_text(f"doc {i}")
    bpe_tokenizer(d / "big_tok", 320)  # more ids than the byte vocabulary (257)
    return d


# ------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("name,expected", [
    ("nope.ckpt", "no such file or directory; give a hybridlm .ckpt file"),
    ("truncated.ckpt", "is truncated or corrupt (torch.load(weights_only=True) raised RuntimeError: "
                       "PytorchStreamReader failed reading zip archive"),
    ("text.ckpt", "is truncated or corrupt (not a PyTorch file: neither a zip archive nor a pickle)"),
    ("empty_dir", "no config.json; expected a mamba_ssm or transformers checkpoint directory"),
    ("no_weights", "no weights file (looked for model.safetensors"),
])
def test_bad_checkpoint_names_the_key_and_file(tmp_path, files, name, expected):
    path = files / name
    check_line(train_error(tmp_path, [f"init_from={path}"]), CheckpointError,
               "hybridlm: checkpoint error: init_from: ", str(path), expected)
    check_line(evaluate_error(tmp_path, [f"ckpt_path={path}"]), CheckpointError,
               "hybridlm: checkpoint error: ckpt_path: ", str(path), expected)
    check_line(export_error(tmp_path, path), CheckpointError, "hybridlm: checkpoint error: ", str(path), expected)


@pytest.mark.parametrize("name,expected", [
    ("nope.ckpt", "does not exist"),
    ("truncated.ckpt", "is truncated or corrupt"),
    ("text.ckpt", "not a PyTorch file"),
])
def test_bad_resume_checkpoint_names_the_key_and_file(tmp_path, files, name, expected):
    line = check_line(train_error(tmp_path, [f"resume={files / name}"]), ConfigError,
                      "hybridlm: config error: resume: ", str(files / name), expected)
    if name in ("truncated.ckpt", "text.ckpt"):
        assert f"; the previous checkpoint is {files / 'whole.ckpt'}" in line  # the readable one to fall back to


# ------------------------------------------------------------------------------------------------- data

def test_missing_data_path(tmp_path):
    e = train_error(tmp_path, ["data=files", "data.paths=[/nope/*.txt]"])
    check_line(e, DataError, "hybridlm: data error: data.paths: no files match '/nope/*.txt'; check the path")
    assert isinstance(e, FileNotFoundError)  # as before DataError: callers catching that still do


def test_data_files_all_unusable(tmp_path, files):
    check_line(train_error(tmp_path, ["data=files", f"data.paths=[{files / 'unusable'}]"]), DataError,
               "hybridlm: data error: data.paths: corpus is empty", "skipped 3 files: 1 binary, 1 empty, 1 not UTF-8",
               "give files with UTF-8 text")


def test_unparsable_data_file_names_the_file(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    check_line(train_error(tmp_path, ["data=files", f"data.paths=[{bad}]"]), DataError,
               "data.paths: cannot read 1 json file(s) ['rows.jsonl']", "fix or remove them")


def test_missing_or_unreadable_tokenizer(tmp_path, files):
    e = train_error(tmp_path, ["data.tokenizer=/nope"])
    check_line(e, DataError, "hybridlm: data error: data.tokenizer: '/nope' is neither 'byte' nor an existing")
    assert isinstance(e, FileNotFoundError)
    check_line(train_error(tmp_path, [f"data.tokenizer={files / 'text.ckpt'}"]), DataError,
               f"data.tokenizer: cannot load '{files / 'text.ckpt'}'", "give a valid tokenizer.json")


def test_vocabulary_smaller_than_the_tokenizer(tmp_path, files):
    # From scratch: the model's vocabulary is the user's to raise.
    check_line(train_error(tmp_path, ["model.vocab_size=100"]), DataError,
               "data.tokenizer: vocab size 257 of 'byte' exceeds the model's vocab_size 100; "
               "set model.vocab_size >= 257")
    big = files / "big_tok"
    # An imported checkpoint fixes the vocabulary: the advice is its own tokenizer, when it has one ...
    line = check_line(train_error(tmp_path, [f"init_from={files / 'mamba_ssm_tok'}", f"data.tokenizer={big}"]),
                      DataError, f"exceeds the model's vocab_size 257, fixed by the checkpoint "
                      f"init_from={files / 'mamba_ssm_tok'}; pass the checkpoint's tokenizer: "
                      f"data.tokenizer={files / 'mamba_ssm_tok'}")
    assert "set model.vocab_size" not in line
    # ... or the one it was trained with, when none is stored beside it.
    line = check_line(evaluate_error(tmp_path, [f"ckpt_path={files / 'mamba_ssm'}", f"data.tokenizer={big}"]),
                      DataError, f"fixed by the checkpoint ckpt_path={files / 'mamba_ssm'}; pass the tokenizer it "
                      "was trained with (data.tokenizer=DIR): none is stored beside it")
    assert "set model.vocab_size" not in line
    # ... or, when it was trained with this very tokenizer on a synthetic task's smaller vocabulary, that task.
    from hybridlm.data.tokenizers import ByteTokenizer, check_vocab
    with pytest.raises(DataError, match=r"^data\.tokenizer: vocab size 257 of 'byte' exceeds the model's vocab_size "
                                        r"112, fixed by the checkpoint ckpt_path=x\.ckpt, which was trained with "
                                        r"this tokenizer on data whose ids stay below 112 \(a synthetic task\?\)"):
        check_vocab(ByteTokenizer(), 112, "ckpt_path=x.ckpt", checkpoint_tokenizer="byte")


def test_window_longer_than_every_document_or_the_corpus(tmp_path, files):
    short = ["data=files", f"data.paths=[{files / 'short'}]", "data.val_fraction=0.2"]
    check_line(train_error(tmp_path, [*short, "data.pack=false"]), DataError,
               "data.seq_len: a window of seq_len+1=33 tokens is longer than every training document",
               "lower seq_len or set pack=true")
    check_line(train_error(tmp_path, [*short, "data.seq_len=2000"]), DataError,
               "data.seq_len: a window of seq_len+1=2001 tokens is longer than the whole training stream",
               "lower seq_len or add documents")



def test_interpolation_error_is_one_line_naming_the_key(tmp_path):
    # ${div:a,0} (the failure map's batch size) fails while OmegaConf resolves: its own message adds 3 context lines
    line = check_line(train_error(tmp_path, ["data.batch_size='${div:64,${data.val_batches}}'", "data.val_batches=0"]),
                      ConfigError, "data.batch_size: ", "${div:64,0}: the divisor must be > 0")
    assert "object_type" not in line, line

def test_output_directory_not_writable(tmp_path, files):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as e:
        runner.train(compose_cfg("train", TINY), blocker / "run", explicit_keys=set())
    check_line(e.value, ConfigError, f"output directory {blocker / 'run'} is not writable", "set hydra.run.dir")
    with pytest.raises(CheckpointError) as e:
        export_main([f"ckpt_path={files / 'mamba_ssm'}", f"out={blocker / 'export'}"])
    check_line(e.value, CheckpointError, f"{blocker / 'export'}: cannot write the exported checkpoint there",
               "choose another output directory")


# --------------------------------------------------------------------------------------------- run_cli

def test_run_cli_ends_user_errors_with_their_line_and_keeps_bugs(monkeypatch):
    def fail(exc):
        raise exc

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for exc, line in [(ConfigError("optim.lr: must be > 0"), "hybridlm: config error: optim.lr: must be > 0"),
                      (CheckpointError("x.ckpt: bad"), "hybridlm: checkpoint error: x.ckpt: bad"),
                      (DataError("data.paths: none"), "hybridlm: data error: data.paths: none")]:
        with pytest.raises(SystemExit) as e:
            run_cli(fail, exc)
        assert e.value.code == line  # sys.exit(str): printed to stderr, exit status 1
    assert run_cli(lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(KeyError):  # not a user error: its traceback is kept
        run_cli(fail, KeyError("bug"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(DataError):  # for debugging: the traceback too
        run_cli(fail, DataError("data.paths: none"))


# ------------------------------------------------------------------------------------- the real commands

def run_command(module: str, args: list[str], cwd: Path, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and TORCH_ADVICE not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_train_command_corrupt_checkpoint(tmp_path, files):
    proc = run_command("hybridlm.train", [*TINY, f"init_from={files / 'truncated.ckpt'}",
                                          f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_one_line(proc, "hybridlm: checkpoint error: init_from: checkpoint ", "is truncated or corrupt")


@pytest.mark.slow
def test_evaluate_command_missing_checkpoint(tmp_path):
    proc = run_command("hybridlm.evaluate", [f"ckpt_path={tmp_path / 'nope.ckpt'}",
                                             f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_one_line(proc, f"hybridlm: checkpoint error: ckpt_path: {tmp_path / 'nope.ckpt'}: no such file")


def test_export_command_not_a_checkpoint(tmp_path, files):
    proc = run_command("hybridlm.export", [f"ckpt_path={files / 'text.ckpt'}", f"out={tmp_path / 'out'}"], tmp_path)
    assert_one_line(proc, f"hybridlm: checkpoint error: checkpoint {files / 'text.ckpt'} is truncated or corrupt",
                    "(not a PyTorch file")


@pytest.mark.slow
def test_train_command_output_directory_hydra_cannot_create(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_command("hybridlm.train", [*TINY, f"hydra.run.dir={blocker / 'run'}"], tmp_path)
    assert_one_line(proc, f"hybridlm: config error: output directory {blocker / 'run'} is not writable")
    proc = run_command("hybridlm.train", ["-m", *TINY, f"hydra.sweep.dir={blocker / 'sweep'}"], tmp_path)
    assert_one_line(proc, f"output directory {blocker / 'sweep'} is not writable", "set hydra.sweep.dir")


@pytest.mark.slow
def test_train_command_data_errors(tmp_path):
    proc = run_command("hybridlm.train", [*TINY, "data=files", "data.paths=[/nope/*.txt]",
                                          f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_one_line(proc, "hybridlm: data error: data.paths: no files match '/nope/*.txt'")
    proc = run_command("hybridlm.train", [*TINY, "data.tokenizer=/nope", f"hydra.run.dir={tmp_path / 'run2'}"],
                       tmp_path)
    assert_one_line(proc, "hybridlm: data error: data.tokenizer: '/nope'")


@pytest.mark.slow
def test_hydra_full_error_keeps_the_traceback(tmp_path):
    proc = run_command("hybridlm.train", [*TINY, f"init_from={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'r'}"],
                       tmp_path, full_error=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CheckpointError: init_from: " in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------- zero-length input

def test_ops_on_zero_length_input_return_empty_outputs_and_the_state():
    g = torch.Generator().manual_seed(0)
    b, h, p, n, d, k = 2, 4, 8, 16, 12, 4
    r = lambda *shape: torch.randn(*shape, generator=g)
    x, dt, A, BC = r(b, 0, h, p), r(b, 0, h).abs(), -r(h).abs(), r(b, 0, 1, n)
    state = r(b, h, p, n)
    y, final = ops.ssd_scan(x, dt, A, BC, BC, chunk_size=8, D=r(h), initial_state=state)
    assert y.shape == (b, 0, h, p) and torch.equal(final, state)
    y, final = ops.ssd_scan(x.bfloat16(), dt, A, BC, BC, chunk_size=8)
    assert y.shape == (b, 0, h, p) and y.dtype == torch.bfloat16
    assert final.dtype == torch.float32 and torch.equal(final, torch.zeros(b, h, p, n))

    conv_state = r(b, k - 1, d)
    y, new = ops.causal_conv1d(r(b, 0, d), r(d, 1, k), r(d), conv_state)
    assert y.shape == (b, 0, d) and torch.equal(new, conv_state)
    y, new = ops.causal_conv1d(r(b, 0, d), r(d, 1, k), None)
    assert y.shape == (b, 0, d) and torch.equal(new, torch.zeros(b, k - 1, d))

    q, kv = r(b, h, 0, p), r(b, 2, 5, p)  # no queries, 5 cached keys (grouped: 2 kv heads)
    for window in (None, 3):
        assert ops.window_attention(q, kv, kv, window=window).shape == (b, h, 0, p)
    selected = torch.zeros(b, 2, 0, 2, dtype=torch.long)
    assert ops.span_attention(q, kv, kv, selected, window=4, block_size=2, query_chunk=4).shape == (b, h, 0, p)


LAYER_KINDS = [("MM", "swa", 0), ("AA", "full", 0), ("AA", "swa", 4), ("AA", "se_attn", 0), ("AA", "se_attn", 4),
               ("AA", "s2", 0), ("MA", "swa", 4)]


def assert_same_state(got, expected) -> None:
    assert len(got) == len(expected)
    for layer_got, layer_expected in zip(got, expected):
        assert layer_got.keys() == layer_expected.keys()
        for key, value in layer_expected.items():
            if torch.is_tensor(value):
                assert layer_got[key].shape == value.shape and torch.equal(layer_got[key], value), key
            else:
                assert layer_got[key] == value, key


@pytest.mark.parametrize("pattern,kind,d_conv", LAYER_KINDS)
def test_model_on_zero_length_input_returns_empty_logits_and_the_state(pattern, kind, d_conv):
    cfg = ModelConfig(d_model=32, layer_pattern=pattern, vocab_size=50)
    cfg.ssm.d_state, cfg.ssm.headdim, cfg.ssm.chunk_size = 16, 16, 8
    a = cfg.attn
    a.kind, a.num_heads, a.num_heads_kv, a.window, a.d_conv = kind, 4, 2, 8, d_conv
    a.block_size, a.query_chunk, a.top_k = 2, 4, 2
    torch.manual_seed(0)
    model = HybridLM(cfg)
    empty = torch.zeros(2, 0, dtype=torch.long)
    for training in (True, False):
        model.train(training)
        logits, state = model(empty)
        assert logits.shape == (2, 0, 50)
        assert_same_state(state, model.zero_state(2))
    model.eval()
    _, state = model(torch.randint(0, 50, (2, 7)))
    logits, after = model(empty, state)
    assert logits.shape == (2, 0, 50)
    assert_same_state(after, state)
