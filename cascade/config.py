"""Small frozen configuration dataclasses: per-request sampling, per-model loading, per-engine sizing.

Each dataclass validates itself in ``__post_init__`` and raises ``ValueError`` naming the offending
field, so bad input is caught where it enters (library call, CLI flag or HTTP body).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. The same parameters shape both the draft's proposal
    distribution ``q`` and the target's ``p`` so that acceptance compares like with like."""

    max_tokens: int = 128  # emitted tokens at most (the prompt is not counted)
    temperature: float = 0.0  # 0 means greedy (argmax); > 0 divides the logits before softmax
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with mass >= top_p
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    seed: int | None = None  # per-request RNG seed; the same seed gives the same output
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first occurrence
    ignore_eos: bool = False  # keep generating past the end-of-sequence token

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # accept a single string for convenience
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EngineConfig:
    """Sizing of the engine's caches and the device both models live on."""

    max_rows: int = 8  # KV-cache rows per model = sequences decoded at once
    max_len: int = 2048  # tokens per row (prompt + generated + one block of lookahead)
    device: str = "cpu"  # "cpu" or "cuda[:n]"
    dtype: str | None = None  # "float32" | "bfloat16" | "float16"; None picks per device (see models.llama)
    max_draft_block: int = 16  # largest k a policy may ask for
    on_target_error: str = "fail"  # a TargetUnavailable target pass: "fail" its requests, or go "draft-only"
    exact_verify: bool = False  # batch-invariant target: every position through the calls batch-1 target-only
    #   decoding makes (the prompt in a pass of its own, then one token of one sequence per pass): greedy
    #   speculative == batch-1 target-only token for token in any dtype at any batch, at the cost of a
    #   sequential verification (see Engine._target_stepwise)
    adaptive_k: bool = False  # dynamic speculation: each round, lossless requests draft the block length the
    #   measured costs say is fastest, down to none (``cascade.speculation``); their output is unchanged

    def __post_init__(self) -> None:
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
