"""A decoder checkpoint's weights laid out for ``LlamaRunner``: the linear layers as the device wants them
(``Linear``: ``F.linear`` on the plain weight, or oneDNN on a prepacked copy on a CPU in fp32), q / k / v and
gate / up fused into one weight each, one ``BlockWeights`` per transformer block, and
``load_decoder_weights``, which reads them from a state dict by their Hugging Face names and checks every
shape against the config (a missing or misshaped weight is a ValueError naming it).

This is the part of the runner that knows parameter names; the runner itself (cache, pass plan, static
steps, attention) knows only the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cascade.models.loading import DecoderConfig

LINEAR_IMPLS = ("auto", "torch", "onednn")


def onednn_available() -> bool:
    """Can this torch run oneDNN's prepacked linear (CPU builds with mkldnn)?"""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear:
    """``y = x @ W.T + b`` with the weight stored in the layout its implementation wants:
    "torch": ``F.linear`` on the plain ``[out, in]`` weight; "onednn": oneDNN on a prepacked copy."""

    __slots__ = ("bias", "impl", "out_features", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, impl: str):
        # weight: [out, in] in the model dtype on the target device; bias: [out] or None
        self.impl = impl
        self.out_features = weight.shape[0]
        self.bias = bias
        if impl == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class BlockWeights:
    """One transformer block's weights: RMSNorm scales ``ln1`` / ``ln2`` [hidden], optional per-head
    ``q_norm`` / ``k_norm`` [head_dim], and the fused linears ``qkv``, ``o``, ``gate_up``, ``down``."""

    __slots__ = ("down", "gate_up", "k_norm", "ln1", "ln2", "o", "q_norm", "qkv")


@dataclass
class DecoderWeights:
    """Everything a forward pass multiplies by."""

    embed: torch.Tensor  # [V, hidden]
    layers: list[BlockWeights]
    norm: torch.Tensor  # [hidden], the final RMSNorm
    lm_head: Linear  # [V, hidden] (the embedding itself when tied)


def load_decoder_weights(c: DecoderConfig, sd: Mapping[str, torch.Tensor], dev: torch.device, dt: torch.dtype,
                         impl: str) -> DecoderWeights:
    """The weights of ``sd`` (HF parameter names -> tensors, any dtype / device) for config ``c``, copied to
    ``dev`` in ``dt``, linears in ``impl`` ("torch" or "onednn")."""

    def get(name: str, required: bool = True) -> torch.Tensor | None:
        t = sd.get(name)
        if t is None:
            if required:
                raise ValueError(f"state_dict lacks {name!r}")
            return None
        return t.to(device=dev, dtype=dt)

    def cat(names: list[str], required: bool = True) -> torch.Tensor | None:
        parts = [get(n, required) for n in names]
        return None if any(p is None for p in parts) else torch.cat(parts, 0)

    def shaped(t: torch.Tensor, shape: tuple, name: str) -> torch.Tensor:
        if tuple(t.shape) != shape:
            raise ValueError(f"state_dict {name} has shape {tuple(t.shape)}, config implies {shape}")
        return t

    h, qd, kvd, inter = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size

    with torch.no_grad():
        embed = get("model.embed_tokens.weight").contiguous()  # [V, hidden]
        if tuple(embed.shape) != (c.vocab_size, c.hidden_size):
            raise ValueError(f"state_dict embed_tokens has shape {tuple(embed.shape)}, config says "
                             f"{(c.vocab_size, c.hidden_size)}")
        layers: list[BlockWeights] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            L = BlockWeights()
            L.ln1 = get(p + "input_layernorm.weight")
            L.ln2 = get(p + "post_attention_layernorm.weight")
            a = p + "self_attn."
            L.q_norm = shaped(get(a + "q_norm.weight"), (c.head_dim,), a + "q_norm.weight") if c.qk_norm else None
            L.k_norm = shaped(get(a + "k_norm.weight"), (c.head_dim,), a + "k_norm.weight") if c.qk_norm else None
            qkv_b = cat([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]) if c.qkv_bias else None
            qkv = shaped(cat([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]), (qd + 2 * kvd, h),
                         a + "q/k/v_proj.weight")
            L.qkv = Linear(qkv, qkv_b, impl)
            o = shaped(get(a + "o_proj.weight"), (h, qd), a + "o_proj.weight")
            L.o = Linear(o, get(a + "o_proj.bias") if c.o_bias else None, impl)
            m = p + "mlp."
            gu_b = cat([m + "gate_proj.bias", m + "up_proj.bias"]) if c.mlp_bias else None
            gu = shaped(cat([m + "gate_proj.weight", m + "up_proj.weight"]), (2 * inter, h), m + "gate/up_proj.weight")
            L.gate_up = Linear(gu, gu_b, impl)
            down = shaped(get(m + "down_proj.weight"), (h, inter), m + "down_proj.weight")
            L.down = Linear(down, get(m + "down_proj.bias") if c.mlp_bias else None, impl)
            layers.append(L)
        norm = get("model.norm.weight")
        head = None if c.tie_word_embeddings else get("lm_head.weight", required=False)
        if head is None and not c.tie_word_embeddings:
            raise ValueError("state_dict lacks 'lm_head.weight' (config has tie_word_embeddings=False)")
        if head is not None:
            shaped(head, (c.vocab_size, h), "lm_head.weight")
        return DecoderWeights(embed, layers, norm, Linear(embed if head is None else head, None, impl))
