"""The Expansion Span experiment files (conf/experiment/sespan/) compose and run, shrunk, in-process through
hybridlm.runner: pretrain -> adapt (SE-Attn + HyLoRA from the pretrained checkpoint, length report at the end)
-> evaluate; and the repro script's passkey geometry agrees with the prompts themselves."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from hybridlm.checkpointing.io import load_checkpoint_file
from hybridlm.config import register_configs
from hybridlm.data.synthetic import passkey_prompt
from hybridlm.data.tokenizers import ByteTokenizer
from hybridlm.runner import evaluate, explicit_model_keys, train

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
FILES = sorted(p.stem for p in (CONF / "experiment" / "sespan").glob("*.yaml"))
# Passkey rows need room for the needle, question and answer (79 byte tokens), so rows are 96 tokens here.
TINY_MODEL = ["model.d_model=32", "model.ssm.d_state=16", "model.ssm.headdim=16", "model.ssm.chunk_size=16",
              "model.attn.window=32"]
TINY_RUN = ["data.batch_size=2", "data.val_batches=1", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            "logger=csv"]
TINY_EVAL = ["eval.passkey_lengths=[96,192]", "eval.passkey_depths=[0.0,1.0]", "eval.passkey_samples=1",
             "eval.max_len=192", "eval.n_sequences=2", "eval.chunk_len=64", "eval.batch_size=2"]


def compose_cfg(config_name, overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def test_the_files_under_test_are_the_experiment():
    assert FILES == ["adapt", "eval", "pretrain"]


def test_pretrain_adapt_evaluate(tmp_path):
    pre_cfg = compose_cfg("train", ["+experiment=sespan/pretrain", *TINY_MODEL, *TINY_RUN, "data.seq_len=96"])
    assert pre_cfg.model.layer_pattern == "MMAM" and pre_cfg.model.attn.kind == "swa"
    assert pre_cfg.data.mix_prob > 0 and pre_cfg.data.synthetic.task == "passkey"
    pre = train(pre_cfg, tmp_path / "pretrain", set())
    assert Path(pre["checkpoint"]).is_file() and torch.isfinite(torch.tensor(pre["metrics"]["train/loss"]))

    # Adaptation: the architecture (d_model 32) comes from the checkpoint, not from the composed default (128);
    # the attention kind and its sizes are explicit overrides, as on the command line.
    se = ["model/attention=se_attn", "model.attn.window=32", "model.attn.block_size=8", "model.attn.top_k=2",
          "model.attn.query_chunk=16"]
    overrides = ["+experiment=sespan/adapt", f"init_from={pre['checkpoint']}", *se, "adapter=hylora",
                 *TINY_RUN, "data.seq_len=96", *TINY_EVAL]
    adapt_cfg = compose_cfg("train", overrides)
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
    result = evaluate(compose_cfg("evaluate", ev_overrides), tmp_path / "eval", ev_overrides)
    assert 0.0 <= result["metrics"]["length_eval/passkey/mean_accuracy"] <= 1.0
    per_position = (Path(result["report"]) / "loss_by_position_per_position.csv").read_text().splitlines()
    assert len(per_position) == 1 + 191  # header + one row per position of a 192-token window


def load_script():
    spec = importlib.util.spec_from_file_location("repro_sespan", REPO / "scripts" / "repro_sespan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("window", [128, 300])
def test_key_placement_matches_the_prompt_text(window):
    """Reference: find the needle sentence in the decoded prompt and classify its digits by hand."""
    where = load_script().key_placement(window, digits=5)
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
