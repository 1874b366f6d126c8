"""Decoder families as data (``cascade.models.families``): each family's block differences read from a
config.json dict, the family lookup (architectures first, then model_type) and its refusals, and the one
list the model resolver and the config reader both use."""

from __future__ import annotations

import pytest

from cascade.models.families import FAMILIES, SUPPORTED_MODEL_TYPES, Family, family_of
from cascade.models.loading import DecoderConfig

BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64)


@pytest.mark.parametrize("arch, extra, want", [
    ("Qwen2ForCausalLM", {"attention_bias": False}, dict(qkv_bias=True, o_bias=False, qk_norm=False, sliding_window=None)),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 512},
     dict(qkv_bias=True, o_bias=False, qk_norm=False, sliding_window=512)),
    ("LlamaForCausalLM", {"attention_bias": True, "sliding_window": 512},
     dict(qkv_bias=True, o_bias=True, qk_norm=False, sliding_window=None)),
    ("Qwen3ForCausalLM", {"sliding_window": 512}, dict(qkv_bias=False, o_bias=False, qk_norm=True, sliding_window=None)),
    ("MistralForCausalLM", {"sliding_window": 4096}, dict(qkv_bias=False, o_bias=False, qk_norm=False, sliding_window=4096)),
    ("Phi3ForCausalLM", {"attention_bias": True, "sliding_window": 2047},
     dict(qkv_bias=False, o_bias=False, qk_norm=False, sliding_window=2047)),
])
def test_each_family_decides_its_block_differences(arch, extra, want):
    cfg = DecoderConfig.from_dict({**BASE, "architectures": [arch], **extra})
    assert cfg.architecture == arch
    assert {k: getattr(cfg, k) for k in want} == want


def test_the_family_comes_from_architectures_then_model_type_and_unknown_ones_are_named():
    assert family_of({"architectures": ["SomethingElse", "Qwen2ForCausalLM"]}).model_type == "qwen2"
    assert family_of({"model_type": "mistral"}).architecture == "MistralForCausalLM"
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported"):
        family_of({"architectures": ["GPT2LMHeadModel"], "model_type": "qwen2"})
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        family_of({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="sliding_window"):
        Family("X", "x", sliding_window="sometimes")


def test_weight_names_take_split_or_fused_projections_only():
    from cascade.models.families import FUSED_PROJECTIONS, WeightNames

    assert len(WeightNames().qkv) == 3 and len(FUSED_PROJECTIONS.qkv) == 1 and len(FUSED_PROJECTIONS.gate_up) == 1
    with pytest.raises(ValueError, match="qkv"):
        WeightNames(qkv=("a", "b"))
    with pytest.raises(ValueError, match="gate_up"):
        WeightNames(gate_up=("a", "b", "c"))


def test_one_list_of_families_serves_the_resolver_and_the_reader():
    assert SUPPORTED_MODEL_TYPES == tuple(f.model_type for f in FAMILIES) == ("llama", "qwen2", "qwen3", "mistral",
                                                                                  "phi3")
    from cascade.weights import SUPPORTED_MODEL_TYPES as resolver_list

    assert resolver_list is SUPPORTED_MODEL_TYPES
