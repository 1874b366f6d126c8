"""Any model a user has: Qwen3 / Llama / Mistral / Qwen2 / Phi-3 pairs through the engine (runner parity per family
is in test_runner), a repo id resolved from the local Hugging Face cache offline, a model converted into
the cache found by name, and ``cascade convert FILE.gguf`` on a real GGUF file written here."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers

from cascade import Cascade, SamplingParams
from cascade.config import EngineConfig
from cascade.models.factory import RunnerOptions, local_runner
from cascade.models.resolve import resolve_model

PROMPTS = [[1, 2, 3], [5, 9, 17, 33, 2, 8], [7]]


def _tiny(kind: str, tmp_path, seed: int, **kw):
    cfg_cls, model_cls = getattr(transformers, f"{kind}Config"), getattr(transformers, f"{kind}ForCausalLM")
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
                eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**base, **kw})).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    path = tmp_path / f"{kind.lower()}-{seed}"
    model.save_pretrained(path)
    return model, path


def _hf_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("draft_kind, target_kind", [("Qwen3", "Qwen3"), ("Qwen2", "Llama"), ("Mistral", "Qwen3"),
                                                           ("Phi3", "Llama")])
def test_pairs_of_every_family_are_lossless(tmp_path, draft_kind, target_kind):
    _, d = _tiny(draft_kind, tmp_path, 1, **({"head_dim": 16} if draft_kind == "Qwen3" else {}))
    target, t = _tiny(target_kind, tmp_path, 2, **({"head_dim": 8} if target_kind == "Qwen3" else {}))
    runners = [local_runner(p, RunnerOptions(max_rows=3, max_len=64, dtype="float32")) for p in (d, t)]
    c = Cascade(*runners, None, eos_token_ids=[], config=EngineConfig(max_rows=3, max_len=64))
    want = [_hf_greedy(target, p, 12) for p in PROMPTS]
    for policy in ("target-only", "speculative", "speculative(k=3)"):
        assert [r.token_ids for r in c.generate(PROMPTS, SamplingParams(max_tokens=12), policy=policy)] == want, policy


def test_a_repo_id_resolves_from_the_local_hf_cache(tmp_path, monkeypatch):
    _, src = _tiny("Qwen3", tmp_path, 3, head_dim=16)
    hub = tmp_path / "hub"
    repo = hub / "models--acme--tiny-qwen3"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(src, repo / "snapshots" / "abc123")
    shutil.copytree(src, repo / "snapshots" / "def456")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_model("acme/tiny-qwen3") == (repo / "snapshots" / "abc123").resolve()
    assert resolve_model("acme/tiny-qwen3@def456") == (repo / "snapshots" / "def456").resolve()
    with pytest.raises(ValueError, match="Hugging Face cache"):
        resolve_model("acme/not-there")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_model("acme/tiny-qwen3") == (repo / "snapshots" / "abc123").resolve()


def test_a_model_converted_into_the_cache_is_found_by_name(tmp_path, monkeypatch):
    _, src = _tiny("Llama", tmp_path, 4)
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))
    shutil.copytree(src, tmp_path / "home" / "models" / "my-llama")
    assert resolve_model("my-llama") == (tmp_path / "home" / "models" / "my-llama").resolve()


@pytest.mark.parametrize("kind", ["Qwen2", "Qwen3"])
def test_cascade_convert_turns_a_gguf_into_a_checkpoint_the_runner_loads(tmp_path, kind, capsys):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from cascade.cli import main
    from gguf_writer import TOKENS, write_gguf

    # Qwen3 at head_dim 128: transformers' GGUF reader takes no key_length for qwen3 and uses its default, 128,
    # which every Qwen3 dense release has
    model, _ = _tiny(kind, tmp_path, 5, tie_word_embeddings=kind == "Qwen3", **({"head_dim": 128} if kind == "Qwen3" else {}))
    gguf_path = write_gguf(model, tmp_path / f"tiny-{kind.lower()}.gguf")
    out = tmp_path / "converted"
    assert main(["convert", str(gguf_path), "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"{kind}ForCausalLM" in said and str(TOKENS.index("<|im_end|>")) in said
    runner = local_runner(out, RunnerOptions(max_rows=1, max_len=64, dtype="float32"))
    seq = [3, 7, 11, 2, 40]
    with torch.no_grad():
        want = model(torch.tensor([seq])).logits[0].float()
    assert (runner.forward_span([0], [seq]) - want).abs().max() < 1e-4
    # the tokenizer and the chat template came along, and the end-of-turn token ends an answer
    from cascade.library import generation_config_eos, load_tokenizer

    tok = load_tokenizer(out)
    assert tok.convert_ids_to_tokens(tok.encode("ab", add_special_tokens=False)) == ["ab"]
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert TOKENS.index("<|im_end|>") in generation_config_eos(out)
    # a second run refuses to overwrite; a missing file is a clear error
    assert main(["convert", str(gguf_path), "--out", str(out), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope.gguf"), "--no-progress"]) == 2
    assert "no such GGUF file" in capsys.readouterr().err
