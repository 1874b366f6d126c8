"""Per-position statistics of chosen requests, kept while they are decoded: the half of the bench's
teacher-forced path recording (``cascade.bench.paths.record_path``) that decoding has already computed.

A path needs both models' statistics at every position of an answer. The model that wrote the answer
computed its own while decoding it, so with a trace only the other model reads the answer again (one
teacher-forced pass instead of two), which halves the recording time of a benchmark.

- A request traced as ``draft`` (a draft-only request: its blocks are never verified, so the blocks the
  draft settles are its answer, an ending EOS included) gets, at every position of every settled block,
  the drafted token and the draft's confidence there (max q, top-1 minus top-2 margin, entropy: the
  confidence kernel's statistics at T = 1, as for any drafted position).
- A request traced as ``target`` (a target-only request) gets, at every target-only step, the sampled
  token, its natural log-prob and the step's top alternatives (the request's ``logprobs``; ask for 20):
  the step that samples the ending EOS included, which the output itself never holds.

The engine appends during ``Engine.step``; a round that ``step_isolating`` undoes and reruns would append
twice, so trace only through ``step``. Nothing is traced unless a caller sets ``Engine.trace``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODELS = ("draft", "target")


@dataclass
class Trace:
    """The traced requests (id -> "draft" | "target") and what was recorded for each (see the module
    docstring): ``draft`` entries (token, max_prob, margin, entropy), ``target`` entries (token, logprob,
    top ids, top log-probs)."""

    watched: dict[str, str] = field(default_factory=dict)
    positions: dict[str, list[tuple]] = field(default_factory=dict)

    def watch(self, request_id: str, model: str) -> None:
        if model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
        self.watched[request_id] = model
        self.positions[request_id] = []

    def wants(self, request_id: str, model: str) -> bool:
        return self.watched.get(request_id) == model

    def add_draft(self, request_id: str, tokens: list[int], max_prob: list[float], margin: list[float],
                  entropy: list[float]) -> None:
        """One settled block of a traced draft-only request."""
        self.positions[request_id].extend(zip(tokens, max_prob, margin, entropy))

    def add_target(self, request_id: str, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        """One target-only step of a traced request."""
        self.positions[request_id].append((token, logprob, [t for t, _ in top], [lp for _, lp in top]))

    def pop(self, request_id: str) -> dict | None:
        """What was recorded for a request, as plain lists (JSON-ready), and forget it; None if not traced."""
        model = self.watched.pop(request_id, None)
        rows = self.positions.pop(request_id, None)
        if model is None or rows is None:
            return None
        cols = list(zip(*rows)) if rows else [()] * 4
        names = (("tokens", "max_prob", "margin", "entropy") if model == "draft"
                 else ("tokens", "logprob", "top_ids", "top_logprobs"))
        return {"model": model, **{name: list(col) for name, col in zip(names, cols)}}
