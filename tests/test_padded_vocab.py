"""Pairs whose checkpoints pad one tokenizer's vocabulary to different embedding sizes (as Qwen2.5 0.5B and
7B do: 151,936 vs 152,064 rows for 151,665 ids): the engine cascades over the tokenizer's ids and a padding
row is never drafted, accepted or sampled. The padding rows here are built to win the argmax whenever the
real token they copy would (3x its logit), so an engine that reads them fails these tests."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_checkpoint
from safetensors.torch import load_file, save_file

from cascade import Cascade, SamplingParams
from cascade.config import EngineConfig
from cascade.engine import Engine
from cascade.library import check_same_tokenizer
from cascade.models.llama import LlamaRunner

TOKENS = 64  # the shared tokenizer's ids
PROMPTS = [[1, 2, 3], [5, 9, 17, 33, 2, 8], [7], [11, 12, 13, 14, 15, 16, 17, 18]]
POLICIES = ["speculative", "chow(alpha=0.3)", "token-v3(alpha=0.2)", "draft-only", "target-only", "bild"]


def pad_checkpoint(path, rows: int):
    """Grow a checkpoint's embedding and LM head from TOKENS to `rows` rows; padding row r's head is 3x the
    head of token r % TOKENS, so it outscores that token whenever its logit is positive."""
    weights = load_file(str(path / "model.safetensors"))
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    extra = torch.arange(TOKENS, rows) % TOKENS
    weights["model.embed_tokens.weight"] = torch.cat([embed, embed[extra]]).contiguous()
    weights["lm_head.weight"] = torch.cat([head, 3.0 * head[extra]]).contiguous()
    save_file(weights, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] = rows
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def padded_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("padded_pair")
    draft = pad_checkpoint(build_tiny_checkpoint(root / "draft", seed=1, hidden=32, layers=1), 72)
    target = pad_checkpoint(build_tiny_checkpoint(root / "target", seed=2, hidden=48, layers=2, intermediate=96), 80)
    return draft, target


def runners(dirs, max_rows=8):
    return [LlamaRunner.from_pretrained(p, max_rows=max_rows, max_len=64, device="cpu", dtype="float32") for p in dirs]


@pytest.fixture(scope="module")
def padded(padded_dirs):
    d, t = runners(padded_dirs)
    assert (d.vocab_size, t.vocab_size) == (72, 80)
    return Cascade(d, t, None, config=EngineConfig(max_rows=8, max_len=64), vocab_size=TOKENS)


def masked_greedy(target_dir, prompt, n):
    """Greedy decoding of the padded target with HF, argmax over the tokenizer's ids only."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1, :TOKENS].argmax()))
    return ids[len(prompt):]


def test_padding_rows_would_win_unmasked(padded_dirs):
    """The fixture bites: unmasked, the padded target's greedy choice is a padding row on these prompts."""
    t = runners(padded_dirs)[1]
    picks = [int(t.forward_span([0], [p], num_logits=[1])[0].argmax()) for p in PROMPTS]
    t.free([0])
    assert any(p >= TOKENS for p in picks)


def test_speculative_greedy_equals_masked_target_greedy(padded, padded_dirs):
    params = SamplingParams(max_tokens=12)
    want = [masked_greedy(padded_dirs[1], p, 12) for p in PROMPTS]
    for policy in ("speculative", "target-only"):
        assert [r.token_ids for r in padded.generate(PROMPTS, params, policy=policy)] == want


@pytest.mark.parametrize("policy", POLICIES)
def test_padding_ids_are_never_emitted(padded, policy):
    params = [SamplingParams(max_tokens=16, temperature=t, seed=s) for s, t in enumerate([0.0, 1.0, 1.5, 0.7])]
    for r in padded.generate(PROMPTS * 2, params * 2, policy=policy):
        assert r.token_ids and max(r.token_ids) < TOKENS, (policy, r.token_ids)


def test_prompt_ids_are_checked_against_the_tokenizer(padded):
    with pytest.raises(ValueError, match="prompt: token id 70 is outside the vocabulary"):
        padded.generate([[1, 70]], SamplingParams(max_tokens=2), policy="speculative")


def test_widths_that_differ_need_the_tokenizer_size(padded_dirs):
    d, t = runners(padded_dirs, max_rows=2)
    with pytest.raises(ValueError, match="vocab_size: the draft has 72 logits rows and the target 80"):
        Engine(d, t)
    with pytest.raises(ValueError, match="vocab_size: 73 must be in"):
        Engine(d, t, vocab_size=73)


def test_library_masks_with_the_tokenizer_length(padded_dirs):
    from tiny_tokenizer import CharTokenizer

    d, t = runners(padded_dirs, max_rows=2)
    c = Cascade(d, t, CharTokenizer(), config=EngineConfig(max_rows=2, max_len=64))
    assert c.engine.vocab_size == TOKENS
    [r] = c.generate("abc", SamplingParams(max_tokens=8, temperature=1.0, seed=1), policy="speculative")
    assert max(r.token_ids) < TOKENS


class _Vocab:
    def __init__(self, vocab):
        self._vocab = vocab

    def get_vocab(self):
        return dict(self._vocab)


def test_tokenizers_that_differ_are_refused():
    a = {"a": 0, "b": 1, "c": 2}
    check_same_tokenizer(_Vocab(a), _Vocab(a))
    with pytest.raises(ValueError, match="target: its tokenizer differs from the draft's"):
        check_same_tokenizer(_Vocab(a), _Vocab({"a": 0, "c": 1, "b": 2}))
