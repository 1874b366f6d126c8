"""The runner factory (``cascade.models.factory``): random weights of any family's shapes under its names,
seeded; a checkpoint's runner equal to the runner's own loader; a pair's members resolved, with the default
pair where a name is missing; and the refusals named."""

from __future__ import annotations

import pytest
import torch

from cascade.models.decoder_weights import parameter_shapes
from cascade.models.factory import RunnerOptions, local_runner, random_runner, resolve_member, target_runner
from cascade.models.llama import LlamaRunner
from cascade.models.loading import DecoderConfig
from cascade.models.random_weights import RandomWeights

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
             intermediate_size=48)


@pytest.mark.parametrize("architecture, extra", [
    ("Qwen2ForCausalLM", dict(qkv_bias=True)),
    ("Phi3ForCausalLM", {}),  # fused q / k / v and gate / up under their own names
    ("Qwen3ForCausalLM", dict(qk_norm=True, tie_word_embeddings=True)),
])
def test_random_runner_of_every_family_is_seeded(architecture, extra):
    config = DecoderConfig(architecture=architecture, **SHAPE, **extra)
    weights = RandomWeights(config, seed=3)
    assert dict((k, tuple(v.shape)) for k, v in weights.items()) == parameter_shapes(config)
    assert torch.equal(weights[config.family.names.norm], torch.ones(32))
    options = RunnerOptions(max_rows=2, max_len=16, dtype="float32")
    ids = [[1, 5, 7, 9], [2, 3]]
    a = random_runner(config, options, seed=3).forward_span([0, 1], ids)
    b = random_runner(config, options, seed=3).forward_span([1, 0], ids[::-1])
    c = random_runner(config, options, seed=4).forward_span([0, 1], ids)
    assert a.shape == (6, 96) and torch.equal(a, torch.cat([b[2:], b[:2]]))  # the same seed, any row order
    assert not torch.allclose(a, c)


def test_local_runner_is_the_checkpoints_runner(tmp_path):
    cfg = transformers.Phi3Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48, pad_token_id=0)
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(cfg).save_pretrained(tmp_path)
    options = RunnerOptions(max_rows=1, max_len=16, dtype="float32", extra={"linear_impl": "torch"})
    mine = local_runner(tmp_path, options)
    theirs = LlamaRunner.from_pretrained(tmp_path, 1, 16, dtype="float32", linear_impl="torch")
    assert mine.linear_impl == "torch"
    assert torch.equal(mine.forward_span([0], [[4, 8, 15]]), theirs.forward_span([0], [[4, 8, 15]]))


def test_refusals_are_named(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        resolve_member(tmp_path, 0)
    with pytest.raises(ValueError, match="vocab_size"):
        target_runner(None, RunnerOptions(max_rows=1, max_len=8), target_url="http://127.0.0.1:9")
