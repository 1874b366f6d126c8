"""Small frozen configuration dataclasses: per-request sampling, per-model loading, per-engine sizing.

Each dataclass validates itself in ``__post_init__`` and raises ``ValueError`` naming the offending
field, so bad input is caught where it enters (library call, CLI flag or HTTP body).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. The same parameters shape both the draft's proposal
    distribution ``q`` and the target's ``p`` so that acceptance compares like with like.

    The field names are vLLM's. Where the defaults differ from vLLM's ``SamplingParams``: ``temperature``
    is 0 (greedy; vLLM: 1.0) and ``max_tokens`` 128 (vLLM: 16). ``top_k`` -1 means off as in vLLM (stored
    as 0). vLLM's penalties and guided decoding have no field here."""

    max_tokens: int = 128  # emitted tokens at most (the prompt is not counted)
    temperature: float = 0.0  # 0 means greedy (argmax); > 0 divides the logits before softmax
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with mass >= top_p
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    seed: int | None = None  # per-request RNG seed; the same seed gives the same output
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first occurrence
    ignore_eos: bool = False  # keep generating past the end-of-sequence token
    min_p: float = 0.0  # drop tokens whose probability (after temperature) is below min_p x the top one's
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()  # token id -> added to its logit
    #   (before temperature; greedy decoding sees it too); stored as sorted (id, bias) pairs
    min_tokens: int = 0  # the end-of-sequence and stop_token_ids cannot be produced before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # more ids that end the request like the EOS (not emitted)
    n: int = 1  # choices per prompt (``Cascade.generate``): choice i with a seed draws with seed + i
    logprobs: int = 0  # top alternatives per emitted token (vLLM's ``logprobs``): the most likely tokens and
    #   their natural log-probs under the model that decided the token, at most MAX_TOP_LOGPROBS

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # accept a single string for convenience
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        try:
            pairs = tuple(sorted((tid, float(b)) for tid, b in bias))
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must map integer token ids to numbers, got {self.logit_bias!r}") from None
        for tid, b in pairs:
            if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {tid!r}")
            if not (-100.0 <= b <= 100.0) or math.isnan(b):
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b!r} for token {tid}")
        object.__setattr__(self, "logit_bias", pairs)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k == -1:  # vLLM's "off"
            object.__setattr__(self, "top_k", 0)
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (or -1: off), got {self.top_k!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed <= MAX_SEED - (self.n - 1)):
            raise ValueError(f"seed must be an integer in [0, 2**64 - n] (a 64-bit generator's seed; choice i of n uses "
                             f"seed + i) or None, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.min_tokens, int) or not (0 <= self.min_tokens <= self.max_tokens):
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens = {self.max_tokens}], got {self.min_tokens!r}")
        for tid in self.stop_token_ids:
            if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
                raise ValueError(f"stop_token_ids must hold token ids (integers >= 0), got {tid!r}")

    def choice(self, i: int) -> "SamplingParams":
        """The params of choice ``i`` of ``n``: one request, with seed + i when seeded."""
        return replace(self, n=1, seed=None if self.seed is None else self.seed + i)

    def end_ids(self, eos_token_ids) -> frozenset[int]:
        """The ids that end this request: the model's EOS (unless ``ignore_eos``) and ``stop_token_ids``."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else frozenset(eos_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs and vLLM's default max_logprobs
MAX_SEED = 2**64 - 1  # the largest seed a torch.Generator takes


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` where a CUDA device is present, else ``"cpu"``; any other name unchanged."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype_name(dtype: str | None) -> str | None:
    """``"auto"`` (or None) -> None: the runner picks per device (bf16 on CUDA; on CPU bf16 where the CPU has
    fast bf16, else fp32); a dtype name unchanged."""
    return None if dtype in (None, "auto") else dtype


@dataclass(frozen=True)
class EngineConfig:
    """Sizing of the engine's caches and the device both models live on."""

    max_rows: int = 8  # KV-cache rows per model = sequences decoded at once
    max_len: int = 2048  # tokens per row (prompt + generated + one block of lookahead)
    device: str = "cpu"  # "cpu", "cuda[:n]" or "auto" (CUDA when present; resolved here)
    dtype: str | None = None  # "float32" | "bfloat16" | "float16"; None or "auto" picks per device (models.llama)
    max_draft_block: int = 16  # largest k a policy may ask for
    on_target_error: str = "fail"  # a TargetUnavailable target pass: "fail" its requests, or go "draft-only"
    exact_verify: bool = False  # batch-invariant target: every position through the calls batch-1 target-only
    #   decoding makes (the prompt in a pass of its own, then one token of one sequence per pass): greedy
    #   speculative == batch-1 target-only token for token in any dtype at any batch, at the cost of a
    #   sequential verification (see TargetPass.stepwise, cascade.target_pass)
    adaptive_k: bool = False  # dynamic speculation: each round, lossless requests draft the block length the
    #   measured costs say is fastest, down to none (``cascade.speculation``); their output is unchanged

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", resolve_device(self.device))
        object.__setattr__(self, "dtype", resolve_dtype_name(self.dtype))
        if self.on_target_error not in ("fail", "draft-only"):
            raise ValueError(f"on_target_error must be 'fail' or 'draft-only', got {self.on_target_error!r}")
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")
        if self.max_len < 8:
            raise ValueError(f"max_len must be >= 8, got {self.max_len}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16, float16 or None, got {self.dtype!r}")
        if self.max_draft_block < 1:
            raise ValueError(f"max_draft_block must be >= 1, got {self.max_draft_block}")


@dataclass(frozen=True)
class ModelPaths:
    """Where a draft/target pair lives on disk: two HF-style checkpoint directories
    (config.json + *.safetensors), sharing one tokenizer (read from the draft's directory)."""

    draft: str
    target: str
    tokenizer: str | None = None  # defaults to the draft directory
    extra: dict = field(default_factory=dict, compare=False)
