"""Test-wide setup. TRITON_INTERPRET must be set before triton is first imported, so it is set here,
at the top of the first module pytest imports; the kernels then run on CPU through Triton's
interpreter and are compared against their torch references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def build_tiny_checkpoint(path, *, seed: int, vocab: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4,
                          kv_heads: int = 2, intermediate: int = 64, init_std: float = 0.2, arch: str = "qwen2",
                          tie: bool = False):
    """Save a tiny random-weight HF checkpoint (config.json + model.safetensors) to `path` and return it.

    A larger init std than HF's default makes the output distributions peaky, so greedy decoding and
    confidence thresholds behave like a real model's rather than like a uniform coin."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cls_cfg, cls_model = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = cls_cfg(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=512,
                  initializer_range=init_std, tie_word_embeddings=tie, rope_theta=10000.0, eos_token_id=None,
                  bos_token_id=None, pad_token_id=None)
    model = cls_model(cfg).float().eval()
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory):
    """(draft_dir, target_dir): two tiny random Qwen2 checkpoints sharing a 64-token vocabulary."""
    root = tmp_path_factory.mktemp("tiny_pair")
    draft = build_tiny_checkpoint(root / "draft", seed=1, hidden=32, layers=1)
    target = build_tiny_checkpoint(root / "target", seed=2, hidden=48, layers=2, intermediate=96)
    return draft, target
