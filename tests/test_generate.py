"""`python -m hybridlm.generate` and hybridlm.sampling.

References are independent of the code under test: transformers' logits warpers for the sampling filters and
its own `generate` for an hf_mamba2 checkpoint; for the streaming state, generation that re-reads the whole
sequence at every step (no state at all).
"""
from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_MODEL, TWO_STEPS, compose_config, tiny_model

from hybridlm.checkpointing.io import CheckpointError
from hybridlm.convert import export, load_state_dict_checked, read_checkpoint
from hybridlm.generate import generate, run, state_nbytes, token_stream
from hybridlm.models import AttentionConfig, HybridLM
from hybridlm.runner import ConfigError
from hybridlm.sampling import check_sampling, filter_logits, next_token

VOCAB = 50


def sharp_model(pattern: str, attn: AttentionConfig | None = None, vocab: int = VOCAB, seed: int = 0) -> HybridLM:
    """The shared tiny model (non-trivial dt, D and norms) with logits far from uniform, so argmax ties are
    unlikely."""
    model = tiny_model(pattern, attn=attn, vocab_size=vocab, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


def greedy_by_rereading(model: HybridLM, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """The naive reference: each step runs the whole sequence so far from scratch."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            last = model(torch.tensor([ids]))[0][0, -1]
            logits.append(last)
            ids.append(int(last.argmax()))
    return ids[len(prompt):], logits


# ------------------------------------------------------------------------------------------------ sampling

@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6), (1.0, 3, 0.3), (2.0, 100, 0.95), (0.9, 1, 0.5),
])
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = 3 * torch.randn(6, 64, generator=torch.Generator().manual_seed(top_k))
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    assert kept.sum(-1).min() >= 1
    torch.testing.assert_close(ours[kept], ref[kept])


def test_sampled_frequencies_follow_the_filtered_distribution():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.6, 1.1, 0.4, -0.5, -2.0]])
    expected = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(4)(None, TemperatureLogitsWarper(0.8)(None, logits)))
    expected = expected.softmax(-1)[0]
    n = 40000
    draws = next_token(logits.expand(n, -1), 0.8, 4, 0.9, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / n
    assert torch.all(freq[expected == 0] == 0)
    torch.testing.assert_close(freq, expected.double(), atol=0.012, rtol=0)


def test_temperature_zero_is_greedy_and_bad_settings_name_their_key():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(next_token(logits, 0.0, top_k=5, top_p=0.1), logits.argmax(-1))
    check_sampling(0.0, 0, 1.0)
    for args, key in [((-0.1, 0, 1.0), "temperature"), ((1.0, -1, 1.0), "top_k"), ((1.0, 0, 0.0), "top_p"),
                      ((1.0, 0, 1.01), "top_p")]:
        with pytest.raises(ValueError, match=f"^{key}:"):
            check_sampling(*args)


# --------------------------------------------------------------------------------------- streaming state

ATTENTION = {
    "swa": AttentionConfig(kind="swa", num_heads=4, num_heads_kv=2, window=6, rotary_emb_dim=4, d_conv=3),
    "full": AttentionConfig(kind="full", num_heads=4, rotary_emb_dim=8),
    "se_attn_window": AttentionConfig(kind="se_attn_window", num_heads=4, window=6, block_size=3, top_k=2,
                                      query_chunk=4, scorer="mean_dot"),
    # the paper's SE-Attn: its state keeps every q/k/v and each step reruns the op over the whole prefix
    "se_attn": AttentionConfig(kind="se_attn", num_heads=4, block_size=3, top_k=2, chunk_sizes=[6, 12]),
}


@pytest.mark.parametrize("kind", sorted(ATTENTION))
def test_greedy_streaming_equals_rereading_the_sequence(kind):
    model = sharp_model("MAMA", ATTENTION[kind])
    prompt = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(2)).tolist()
    ref_tokens, ref_logits = greedy_by_rereading(model, prompt, 30)  # 41 tokens: several windows and chunks
    assert generate(model, prompt, 30, temperature=0.0).tokens == [ref_tokens]
    seen = []

    def pick(last):
        seen.append(last[0])
        return last.argmax(-1)

    for step, _ in enumerate(token_stream(model, torch.tensor([prompt]), pick)):
        if step + 1 == 30:
            break
    torch.testing.assert_close(torch.stack(seen), torch.stack(ref_logits), atol=1e-4, rtol=1e-4)


def test_samples_share_the_prompt_pass_and_match_rereading_with_the_same_draws():
    model = sharp_model("MAMA", ATTENTION["swa"])
    prompt = [3, 14, 15, 9, 26]
    got = generate(model, prompt, 12, num_samples=3, temperature=0.9, top_k=20, top_p=0.9,
                   generator=torch.Generator().manual_seed(5)).tokens
    g = torch.Generator().manual_seed(5)
    rows = torch.tensor([prompt] * 3)
    with torch.no_grad():
        for _ in range(12):
            rows = torch.cat([rows, next_token(model(rows)[0][:, -1], 0.9, 20, 0.9, g)[:, None]], dim=1)
    assert got == rows[:, len(prompt):].tolist()
    assert len({tuple(r) for r in got}) > 1  # the samples differ: the copied state is not shared by reference
    greedy = generate(model, prompt, 12, num_samples=2, temperature=0.0).tokens
    assert greedy[0] == greedy[1] == greedy_by_rereading(model, prompt, 12)[0]


def test_a_sample_stops_at_the_stop_token():
    model = sharp_model("MAM")
    prompt = [1, 2, 3]
    full = generate(model, prompt, 20, temperature=0.0).tokens[0]
    stop = full[6]
    assert generate(model, prompt, 20, temperature=0.0, stop_id=stop).tokens[0] == full[:full.index(stop) + 1]
    assert generate(model, prompt, 0).tokens == [[]]


@pytest.mark.parametrize("kind", ["swa", "full"])
def test_attention_cache_is_bounded_by_the_window_and_full_attention_keeps_every_key(kind):
    window = 8
    model = sharp_model("MA", AttentionConfig(kind=kind, num_heads=4, window=window))
    prompt = [5, 6, 7]
    for step, (_, state) in enumerate(token_stream(model, torch.tensor([prompt]), lambda x: x.argmax(-1))):
        attn = state[1]
        seen = len(prompt) + step  # the state has read the prompt and the tokens before this one
        assert attn["pos"] == seen
        assert attn["k"].shape[2] == attn["v"].shape[2] == (min(seen, window - 1) if kind == "swa" else seen)
        if step == 10 * window:
            break


def test_mamba_only_state_has_a_constant_size():
    """Per-token cost of a Mamba-2 layer does not grow with position: what it carries is the same at every step."""
    model = sharp_model("MMM")
    zero = model.zero_state(1)
    shapes = [{k: v.shape for k, v in s.items()} for s in zero]
    for step, (_, state) in enumerate(token_stream(model, torch.tensor([[1, 2, 3, 4, 5]]), lambda x: x.argmax(-1))):
        assert [{k: v.shape for k, v in s.items()} for s in state] == shapes
        assert state_nbytes(state) == state_nbytes(zero) > 0
        if step == 5 * model.cfg.ssm.chunk_size:
            break


# ------------------------------------------------------------------------------------ imported formats

def make_hf_mamba2(path, vocab: int, seed: int = 0):
    """A transformers Mamba2ForCausalLM unlike the defaults: ngroups 2, untied embeddings, odd vocabulary."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    config = Mamba2Config(hidden_size=48, num_hidden_layers=3, head_dim=12, num_heads=8, state_size=16, n_groups=2,
                          vocab_size=vocab, chunk_size=16, expand=2, conv_kernel=4, tie_word_embeddings=False,
                          bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = Mamba2ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial dt_bias / A_log / D and logits far from uniform
        for name, p in hf.named_parameters():
            if name.endswith(("dt_bias", "A_log", ".D")) or "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        hf.lm_head.weight.mul_(20.0)
    hf.save_pretrained(path)
    return hf


def test_greedy_on_an_hf_mamba2_dir_equals_transformers_generate(tmp_path):
    hf = make_hf_mamba2(tmp_path / "hf", vocab=101)
    ckpt = read_checkpoint(tmp_path / "hf")
    model = HybridLM(ckpt.cfg)
    load_state_dict_checked(model, ckpt.state_dict, source="hf")
    prompt = torch.randint(0, 101, (1, 21), generator=torch.Generator().manual_seed(3))  # 21: not a chunk multiple
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=40, do_sample=False, use_cache=True)[0, 21:].tolist()
    assert len(ref) == 40
    assert generate(model.eval(), prompt[0].tolist(), 40, temperature=0.0).tokens == [ref]


def compose(*overrides: str):
    """conf/generate.yaml with `overrides` (hybridlm.generate, imported above, registered its schema)."""
    return compose_config("generate", overrides)


def save_bpe_tokenizer(directory, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["[UNK]", "<|endoftext|>"])
    tok.train_from_iterator(["the state space model reads the sequence", "a hybrid model mixes attention"] * 20,
                            trainer)
    tok.save(str(directory / "tokenizer.json"))


def test_run_on_an_hf_mamba2_dir_uses_its_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer

    save_bpe_tokenizer(tmp_path, 60)
    make_hf_mamba2(tmp_path / "hf", vocab=67)
    (tmp_path / "tokenizer.json").rename(tmp_path / "hf" / "tokenizer.json")
    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    out = tmp_path / "gen.jsonl"
    record = run(compose(f"ckpt_path={tmp_path / 'hf'}", "prompt=the hybrid model", "max_new_tokens=12",
                         "temperature=0", "stop_at_eod=false", f"out={out}"))
    prompt = tok.encode("the hybrid model").ids
    model = HybridLM(read_checkpoint(tmp_path / "hf").cfg)
    load_state_dict_checked(model, read_checkpoint(tmp_path / "hf").state_dict, source="hf")
    expected = tok.decode(prompt + greedy_by_rereading(model.eval(), prompt, 12)[0])
    assert record["texts"] == [expected]
    assert capsys.readouterr().out == expected + "\n"
    line = json.loads(out.read_text().splitlines()[-1])
    assert line["format"] == "hf_mamba2" and line["prompt_tokens"] == len(prompt) and line["new_tokens"] == [12]
    assert line["tokens_per_s"] > 0 and line["state_bytes"] > 0


def test_run_on_a_mamba_ssm_dir_without_tokenizer_uses_bytes(tmp_path, capsys, caplog):
    model = sharp_model("MAM", AttentionConfig(kind="full", num_heads=4, num_heads_kv=2), vocab=257)
    export(model, model.cfg, tmp_path / "ms", format="mamba_ssm")
    record = run(compose(f"ckpt_path={tmp_path / 'ms'}", "prompt=ab", "max_new_tokens=9", "temperature=0",
                         "stop_at_eod=false", "num_samples=2"))
    new = greedy_by_rereading(model, [97, 98], 9)[0]
    expected = bytes([97, 98] + [t for t in new if t < 256]).decode("utf-8", errors="replace")
    assert record["format"] == "mamba_ssm" and record["texts"] == [expected, expected]
    assert "byte-level tokenizer" in caplog.text
    assert capsys.readouterr().out == f"--- sample 0 ---\n{expected}\n--- sample 1 ---\n{expected}\n"
    # An empty prompt is allowed: a new document, read after the end-of-document token (256).
    record = run(compose(f"ckpt_path={tmp_path / 'ms'}", "prompt=", "max_new_tokens=3", "temperature=0",
                         "stop_at_eod=false"))
    assert record["prompt_tokens"] == 1 and record["new_tokens"] == [3]


@pytest.mark.parametrize("overrides,match", [
    ((), "^ckpt_path:"),
    (("ckpt_path=x",), "^prompt:"),
    (("ckpt_path=x", "prompt=a", "prompt_file=b"), "^prompt:"),
    (("ckpt_path=x", "prompt=a", "max_new_tokens=-1"), "^max_new_tokens:"),
    (("ckpt_path=x", "prompt=a", "temperature=-0.5"), "^temperature:"),
    (("ckpt_path=x", "prompt=a", "top_p=1.5"), "^top_p:"),
    (("ckpt_path=x", "prompt=a", "top_p=0"), "^top_p:"),
    (("ckpt_path=x", "prompt=a", "top_k=-2"), "^top_k:"),
    (("ckpt_path=x", "prompt=a", "num_samples=0"), "^num_samples:"),
    (("ckpt_path=x", "prompt=a", "dtype=fp8"), "^dtype:"),
    (("ckpt_path=x", "prompt_file=/no/such/prompt.txt"), "^prompt_file:"),
])
def test_bad_settings_are_refused_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        run(compose(*overrides))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    make_hf_mamba2(tmp_path / "hf", vocab=67)  # no tokenizer files: bytes (257 ids) do not fit
    with pytest.raises(ConfigError, match="^tokenizer: 'byte'.*257 tokens.*vocab_size 67.*tokenizer=PATH"):
        run(compose(f"ckpt_path={tmp_path / 'hf'}", "prompt=a"))
    with pytest.raises(CheckpointError, match="no such file"):
        run(compose(f"ckpt_path={tmp_path / 'missing'}", "prompt=a"))


# ------------------------------------------------------------------------------------------ command line

def test_cli_bad_input_ends_in_one_line(tmp_path, run_cli):
    proc = run_cli("hybridlm.generate", [f"ckpt_path={tmp_path / 'none.ckpt'}", "prompt=a"], check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hybridlm: checkpoint error: {tmp_path / 'none.ckpt'}: no such file or directory"), last
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_cli_generates_from_an_exported_checkpoint(tmp_path, run_cli):
    """The entry point end to end on a checkpoint written here (the slow test below trains one through the CLI)."""
    model = sharp_model("MAM", AttentionConfig(kind="full", num_heads=4, num_heads_kv=2), vocab=257)
    export(model, model.cfg, tmp_path / "ms", format="mamba_ssm")
    out = tmp_path / "gen.jsonl"
    proc = run_cli("hybridlm.generate", [f"ckpt_path={tmp_path / 'ms'}", "prompt=ab", "max_new_tokens=9",
                                         "temperature=0", "stop_at_eod=false", f"out={out}"])
    new = greedy_by_rereading(model, [97, 98], 9)[0]
    assert proc.stdout == bytes([97, 98] + [t for t in new if t < 256]).decode("utf-8", errors="replace") + "\n"
    record = json.loads(out.read_text())
    assert record["format"] == "mamba_ssm" and record["tokenizer"] == "byte" and record["new_tokens"] == [9]


@pytest.mark.slow
def test_cli_on_a_trained_checkpoint(tmp_path, run_cli):
    run_dir = tmp_path / "run"
    train = run_cli("hybridlm.train", [*TINY_MODEL, "model.attn.window=16", "data.seq_len=32", *TWO_STEPS, "logger=csv",
                                       f"hydra.run.dir={run_dir}"], check=False)
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "gen.jsonl"
    # Hydra trims unquoted values: quotes keep the prompt's trailing space.
    proc = run_cli("hybridlm.generate", [f"ckpt_path={ckpt}", 'prompt="def "', "max_new_tokens=40",
                                         "temperature=0", "stop_at_eod=false", f"out={out}"], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = read_checkpoint(ckpt)
    model = HybridLM(loaded.cfg)
    load_state_dict_checked(model, loaded.state_dict, source=str(ckpt))
    new = greedy_by_rereading(model.eval(), list(b"def "), 40)[0]
    assert proc.stdout == bytes(list(b"def ") + [t for t in new if t < 256]).decode("utf-8", "replace") + "\n"
    record = json.loads(out.read_text())
    assert record["format"] == "hybridlm" and record["tokenizer"] == "byte" and record["new_tokens"] == [40]
    sampled = run_cli("hybridlm.generate", [f"ckpt_path={ckpt}", "prompt=", "max_new_tokens=8", "top_k=20",
                                            "top_p=0.9", "temperature=0.8", "seed=3", "num_samples=2"],
                      check=False)
    assert sampled.returncode == 0 and sampled.stdout.count("--- sample") == 2, sampled.stderr[-3000:]
