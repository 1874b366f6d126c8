"""A decoder checkpoint's weights laid out for ``LlamaRunner``: the linear layers as the device wants them
(``Linear``: ``F.linear`` on the plain weight, or oneDNN on a prepacked copy on a CPU in fp32), q / k / v and
gate / up fused into one weight each, one ``BlockWeights`` per transformer block, and
``load_decoder_weights``, which reads them from a state dict by the names its family's record gives
(``parameter_shapes``: every name and shape a config implies) and checks every shape against the config (a
missing or misshaped weight is a ValueError naming it).

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


def parameter_shapes(c: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a checkpoint of config ``c`` holds, by its family's name (``c.family.names``), with
    its shape: what ``load_decoder_weights`` reads and what a random stand-in must provide."""
    names = c.family.names
    h, q, kv, inter = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {names.embed: (c.vocab_size, h), names.norm: (h,)}
    if not c.tie_word_embeddings:
        shapes[names.lm_head] = (c.vocab_size, h)
    qkv_parts = [q + 2 * kv] if len(names.qkv) == 1 else [q, kv, kv]
    gate_up_parts = [2 * inter] if len(names.gate_up) == 1 else [inter, inter]
    for i in range(c.num_layers):
        shapes[names.ln1.format(i=i)] = (h,)
        shapes[names.ln2.format(i=i)] = (h,)
        if c.qk_norm:
            shapes[names.q_norm.format(i=i)] = (c.head_dim,)
            shapes[names.k_norm.format(i=i)] = (c.head_dim,)
        # each linear: (its modules, their output rows, in_features, biased)
        for modules, parts, width, bias in ((names.qkv, qkv_parts, h, c.qkv_bias), ((names.o,), [h], q, c.o_bias),
                                            (names.gate_up, gate_up_parts, h, c.mlp_bias),
                                            ((names.down,), [h], inter, c.mlp_bias)):
            for module, rows in zip(modules, parts):
                shapes[module.format(i=i) + ".weight"] = (rows, width)
                if bias:
                    shapes[module.format(i=i) + ".bias"] = (rows,)
    return shapes


def load_decoder_weights(c: DecoderConfig, sd: Mapping[str, torch.Tensor], dev: torch.device, dt: torch.dtype,
                         impl: str) -> DecoderWeights:
    """The weights of ``sd`` (parameter names, as the family names them -> tensors, any dtype / device) for
    config ``c``, copied to ``dev`` in ``dt``, linears in ``impl`` ("torch" or "onednn"). Split projections
    are fused (q / k / v, gate / up); a missing or misshaped parameter is a ValueError naming it."""
    shapes = parameter_shapes(c)
    names = c.family.names

    def get(name: str) -> torch.Tensor:
        t = sd.get(name)
        if t is None:
            if name == names.lm_head:
                raise ValueError(f"state_dict lacks {name!r} (config has tie_word_embeddings=False)")
            raise ValueError(f"state_dict lacks {name!r}")
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"state_dict {name} has shape {tuple(t.shape)}, config implies {shapes[name]}")
        return t.to(device=dev, dtype=dt)

    def linear(modules: tuple[str, ...], i: int, bias: bool) -> Linear:
        weight = torch.cat([get(m.format(i=i) + ".weight") for m in modules], 0)
        b = torch.cat([get(m.format(i=i) + ".bias") for m in modules], 0) if bias else None
        return Linear(weight, b, impl)

    with torch.no_grad():
        embed = get(names.embed).contiguous()  # [V, hidden]
        layers: list[BlockWeights] = []
        for i in range(c.num_layers):
            L = BlockWeights()
            L.ln1 = get(names.ln1.format(i=i))
            L.ln2 = get(names.ln2.format(i=i))
            L.q_norm = get(names.q_norm.format(i=i)) if c.qk_norm else None
            L.k_norm = get(names.k_norm.format(i=i)) if c.qk_norm else None
            L.qkv = linear(names.qkv, i, c.qkv_bias)  # [q + 2 kv, hidden]
            L.o = linear((names.o,), i, c.o_bias)
            L.gate_up = linear(names.gate_up, i, c.mlp_bias)  # [2 inter, hidden]
            L.down = linear((names.down,), i, c.mlp_bias)
            layers.append(L)
        norm = get(names.norm)
        head = embed if c.tie_word_embeddings else get(names.lm_head)
        return DecoderWeights(embed, layers, norm, Linear(head, None, impl))
