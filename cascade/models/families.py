"""Decoder families as data: what sets each family the runner supports apart from the others.

``cascade.models.llama.LlamaRunner`` is the family-independent part (the ragged cache, the pass plan, the
static steps and CUDA graphs, attention); a ``Family`` record says, for one checkpoint family, the names its
``config.json`` goes by, its block differences (biases on the attention projections, per-head q / k
RMSNorm, when its config's sliding window applies) and its parameter names (``WeightNames``: which
projections its checkpoints store split, which fused). ``cascade.models.loading.DecoderConfig.from_dict``
reads a config through its family's record, ``cascade.models.decoder_weights`` reads the weights through its
names, and ``FAMILIES`` is the one list of what the project runs (the model resolver's check reads it too).
Adding a family of this block shape is one record here, plus its runner parity test
(``tests/test_runner.py``). Importing this module has no side effects and needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

WINDOW_RULES = ("never", "always", "if_enabled")


@dataclass(frozen=True)
class WeightNames:
    """A family's parameter names in its checkpoints, ``{i}`` standing for the block index.

    ``qkv`` and ``gate_up`` name modules (``.weight`` / ``.bias`` are appended): three (q, k, v) or two
    (gate, up) entries where the checkpoint stores the projections apart, one where it stores them fused in
    that order, the layout the runner keeps either way. The defaults are the Hugging Face Llama names."""

    embed: str = "model.embed_tokens.weight"
    norm: str = "model.norm.weight"  # the final RMSNorm
    lm_head: str = "lm_head.weight"  # absent when the embedding is tied
    ln1: str = "model.layers.{i}.input_layernorm.weight"
    ln2: str = "model.layers.{i}.post_attention_layernorm.weight"
    q_norm: str = "model.layers.{i}.self_attn.q_norm.weight"  # families with qk_norm only
    k_norm: str = "model.layers.{i}.self_attn.k_norm.weight"
    qkv: tuple[str, ...] = ("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
                            "model.layers.{i}.self_attn.v_proj")
    o: str = "model.layers.{i}.self_attn.o_proj"
    gate_up: tuple[str, ...] = ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj")
    down: str = "model.layers.{i}.mlp.down_proj"

    def __post_init__(self) -> None:
        if len(self.qkv) not in (1, 3):
            raise ValueError(f"qkv must name 1 (fused) or 3 (q, k, v) modules, got {len(self.qkv)}")
        if len(self.gate_up) not in (1, 2):
            raise ValueError(f"gate_up must name 1 (fused) or 2 (gate, up) modules, got {len(self.gate_up)}")


# Phi-3's checkpoints store q / k / v as one ``qkv_proj`` and gate / up as one ``gate_up_proj``
FUSED_PROJECTIONS = WeightNames(qkv=("model.layers.{i}.self_attn.qkv_proj",),
                                gate_up=("model.layers.{i}.mlp.gate_up_proj",))


@dataclass(frozen=True)
class Family:
    """One decoder family's differences from the shared block (see the module docstring)."""

    architecture: str  # the ``architectures`` entry of its config.json
    model_type: str  # its config.json ``model_type``
    qkv_bias: bool | None = None  # bias on q / k / v: fixed by the family, or None: config's ``attention_bias``
    o_bias: bool | None = None  # bias on the output projection: fixed, or None: config's ``attention_bias``
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before RoPE
    sliding_window: str = "never"  # when config's ``sliding_window`` applies: never / always / if_enabled
    #   (``use_sliding_window`` true)
    names: WeightNames = WeightNames()  # its parameter names

    def __post_init__(self) -> None:
        if self.sliding_window not in WINDOW_RULES:
            raise ValueError(f"sliding_window must be one of {WINDOW_RULES}, got {self.sliding_window!r}")

    def block_options(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The ``DecoderConfig`` fields this family decides, read from a config.json dict."""
        bias = bool(cfg.get("attention_bias", False))
        applies = self.sliding_window == "always" or (self.sliding_window == "if_enabled"
                                                      and bool(cfg.get("use_sliding_window")))
        return {
            "qkv_bias": bias if self.qkv_bias is None else self.qkv_bias,
            "o_bias": bias if self.o_bias is None else self.o_bias,
            "qk_norm": self.qk_norm,
            "sliding_window": (cfg.get("sliding_window") or None) if applies else None,
        }


FAMILIES: tuple[Family, ...] = (
    Family("LlamaForCausalLM", "llama"),
    Family("Qwen2ForCausalLM", "qwen2", qkv_bias=True, o_bias=False, sliding_window="if_enabled"),
    Family("Qwen3ForCausalLM", "qwen3", qk_norm=True, sliding_window="if_enabled"),
    Family("MistralForCausalLM", "mistral", sliding_window="always"),
    Family("Phi3ForCausalLM", "phi3", qkv_bias=False, o_bias=False, sliding_window="always", names=FUSED_PROJECTIONS),
)
BY_ARCHITECTURE: dict[str, Family] = {f.architecture: f for f in FAMILIES}
BY_MODEL_TYPE: dict[str, Family] = {f.model_type: f for f in FAMILIES}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(BY_ARCHITECTURE)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(BY_MODEL_TYPE)


def family_of(cfg: Mapping[str, Any]) -> Family:
    """The family of a config.json dict: its first supported ``architectures`` entry, else its ``model_type``.
    Raises ValueError naming an unsupported architecture."""
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[arch]
    if not archs and cfg.get("model_type") in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[cfg["model_type"]]
    named = archs[0] if archs else cfg.get("model_type")
    raise ValueError(f"architecture {named!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
