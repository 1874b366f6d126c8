"""Checkpoint reading for the decoder families of ``cascade.models.families`` (Llama, Qwen2, Qwen3, Mistral, Phi-3).

``DecoderConfig`` is the small, validated subset of an HF ``config.json`` that ``LlamaRunner`` needs, its
block differences read through the checkpoint's family record (``cascade.models.families``);
``load_checkpoint`` reads a checkpoint directory (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``) through safetensors' mmap, without importing transformers.
Unsupported architectures or options raise ``ValueError`` naming what is wrong. ``default_dtype`` /
``resolve_dtype`` pick the runner's dtype per device.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cascade.models.families import BY_ARCHITECTURE, SUPPORTED_ARCHITECTURES, Family, family_of

_ROPE_TYPES = (None, "default", "llama3")


@dataclass(frozen=True)
class DecoderConfig:
    """Shape and numerics of one decoder checkpoint (the fields ``LlamaRunner`` uses)."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int  # rows of the embedding / LM head
    hidden_size: int  # residual width
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int  # per-head width (config's head_dim, else hidden_size // num_heads)
    intermediate_size: int  # MLP width
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Mapping[str, Any] | None = None  # None / {"rope_type": "llama3", ...}
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2: True)
    o_bias: bool = False  # bias on the output projection (Llama attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down (Llama mlp_bias)
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    sliding_window: int | None = None  # attention window (Mistral / Qwen2 use_sliding_window); None = full
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before RoPE (Qwen3)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        rope_type = None if self.rope_scaling is None else self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: default, llama3)")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> DecoderConfig:
        """Build from an HF ``config.json`` dict (transformers 4.x ``rope_theta``/``rope_scaling`` or
        5.x ``rope_parameters`` layout)."""
        family = family_of(cfg)  # its block differences (``cascade.models.families``)
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise ValueError("pretraining_tp > 1 is not supported")

        rope = dict(cfg.get("rope_parameters") or {})
        legacy = cfg.get("rope_scaling")
        if legacy:
            rope.update(legacy)
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor {partial!r} is not supported (RoPE on the whole head only)")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type"))
        scaling = None
        if rope_type not in (None, "default"):
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            scaling["rope_type"] = rope_type
            if rope_type == "llama3":
                scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
                missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in scaling]
                if missing:
                    raise ValueError(f"rope_scaling (llama3) lacks {', '.join(missing)}")

        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            architecture=family.architecture,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            **family.block_options(cfg),
        )

    @classmethod
    def from_hf(cls, config: Any) -> DecoderConfig:
        """Build from a ``transformers`` config object (anything with ``to_dict()``)."""
        return cls.from_dict(config.to_dict())

    @property
    def family(self) -> Family:
        """Its family's record (``cascade.models.families``): block differences and parameter names."""
        return BY_ARCHITECTURE[self.architecture]

    @property
    def num_params(self) -> int:
        """Parameter count (embedding and a separate LM head counted once each)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        per_layer = attn + mlp + 2 * h + 2 * self.head_dim * self.qk_norm
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on CUDA; on CPU bfloat16 only where the CPU has native bf16 (AVX-512 BF16 / AMX),
    float32 otherwise (DESIGN, "Measured facts": fp32 is faster on AVX2 without bf16)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16
    cap = torch.backends.cpu.get_cpu_capability()
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if cap.startswith("AVX512") and bf16 else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} or None, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} or None, got {dtype!r}")
    return dtype


def rope_inv_freq(config: DecoderConfig) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim // 2]`` float32, computed exactly as transformers does."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    sc = config.rope_scaling
    if sc is None or sc.get("rope_type") in (None, "default"):
        return inv
    # llama3 (transformers.modeling_rope_utils._compute_llama3_parameters)
    factor, low, high = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old = float(sc["original_max_position_embeddings"])
    low_wl, high_wl = old / low, old / high
    wavelen = 2 * math.pi / inv
    inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
    return torch.where(medium, smoothed, inv_l)


def read_config(path: str | Path) -> DecoderConfig:
    """Read ``config.json`` from a checkpoint directory."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"path {str(p)!r} is not a checkpoint directory")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"path {str(p)!r} has no config.json")
    return DecoderConfig.from_dict(json.loads(cfg_file.read_text()))


def load_checkpoint(path: str | Path) -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    """Config and state dict (HF parameter names, CPU tensors backed by mmap) of a checkpoint dir."""
    from safetensors import safe_open

    p = Path(path)
    config = read_config(p)
    single, index = p / "model.safetensors", p / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = [p / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing or not files:
            raise ValueError(f"path {str(p)!r}: shards missing: {missing or 'empty weight_map'}")
    else:
        raise ValueError(f"path {str(p)!r} has neither model.safetensors nor model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                state[key] = sf.get_tensor(key)
    return config, state
