"""The policy contract, the registry, and the distribution-level speculative sampling helpers.

A policy is a small frozen dataclass registered under a name; nothing branches on strings. What the
engine calls, each on whole tensors for all sequences that share the policy:

- ``trigger(conf) -> (block_len [B], escalate [B])``: the draft-only test over a drafted block;
- ``stop_drafting(max_prob [B]) -> stop [B] | None``: optional, stops a sequence's drafting right after
  the current token (BiLD's fallback); the base policy never stops early;
- per-request state (``cascade.policies.state``): ``State`` (a frozen dataclass of scalars, ``NoState`` by
  default), ``init_state()``, ``plan(state) -> RoundPlan`` (does the draft propose this round, is the output
  held back), ``after_round(state, outcome) -> state`` over its requests' stacked states after every round
  they drafted in (``outcome``: a ``RoundOutcome``, what the round escalated and emitted; ``handoff``'s window,
  ``takeover``'s evidence), and ``at_finish(state, token_logprobs) ->
  (state, answer_again)`` when a request's answer ends (``quantile``'s routing decision). The trigger reads
  the stacked state as ``conf.state``;
- ``deferral(v) -> delta [R]`` and ``acceptance(v, delta) -> accept_prob [R]`` from the fused verify
  statistics ``v`` (``cascade.verification.VerifyStats``) of escalated positions: speculative sampling
  against ``pi = (1 - delta) q + delta p``, i.e. ``min(1, pi(x) / q(x))``. At the first rejection the
  engine emits ``v.residual_token`` (a draw from ``norm(max(0, pi - q))``, which equals
  ``norm(max(0, p - q))`` for every delta > 0), or ``v.target_token`` (a draw from ``p``) for policies
  with ``replace_from_target``; after a fully accepted escalated block it emits a bonus token from ``p``
  (a free target token: the pass computed ``p`` there anyway), except after a block that ends the request
  (EOS, a stop string or max_tokens), where no bonus position is scored at all.

Extension point for rules that are not of the delta-mixture form (``needs_distributions = True``): the
engine builds ``VerifyDistributions`` (the full ``[R, V]`` draft / target distributions of the verified
positions) and calls ``target_distribution(d, v) -> (pi [R, V], deferred [R])``. It then accepts the draft
token ``x`` with ``speculative_acceptance(pi, d.q, x) = min(1, pi(x) / q(x))`` and, at the first
rejection, draws the replacement from ``residual_distribution(pi, d.q) = norm(max(0, pi - q))`` with the
request's generator. Accepting with that probability and resampling from that residual outputs exactly
``pi`` (the speculative sampling lemma), whatever ``pi`` is. ``deferred`` labels the kept tokens
(``VERIFIED`` where 1, ``DRAFT`` where 0).

Request-level policies let the draft answer the whole request, holding it back (``RoundPlan.holds_output``),
and decide once, when it finishes (``at_finish``); see ``cascade.policies.routing``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from cascade.policies.state import NoState, RoundOutcome, RoundPlan

if TYPE_CHECKING:
    from cascade.verification import VerifyStats

DEFAULT_K = 5  # draft block length; DESIGN measured ~4.3 tokens per target pass at k=4 on the default pair


@dataclass(frozen=True)
class BlockConfidence:
    """The draft's confidence over each sequence's drafted block (padded to the longest block).

    All tensors are [B, K]; positions at or past ``drafted[b]`` are padding (``valid`` is False there)."""

    max_prob: torch.Tensor  # [B, K] float32
    margin: torch.Tensor  # [B, K] float32, top-1 minus top-2 probability
    entropy: torch.Tensor  # [B, K] float32, nats
    token_logprob: torch.Tensor  # [B, K] float32, log q of the drafted token
    valid: torch.Tensor  # [B, K] bool
    drafted: torch.Tensor  # [B] int64, tokens drafted per sequence
    # the round's context (None where a caller has none, read as zeros):
    catch_up: torch.Tensor | None = None  # [B] int64, generated tokens the target has not read yet (what an
    #   escalation now pays before the block; the prompt's prefill is counted apart)
    state: Any = None  # the policy's per-request state, stacked (``Policy.State`` with [B] tensor fields), or
    #   None where the policy has none or the caller gives none (read as the initial state)
    router: torch.Tensor | None = None  # [B, K] float32, the learned router's P(target disagrees) per drafted
    #   position (``cascade.router``); given only to policies with ``uses_router``

    def catch_up_tokens(self) -> torch.Tensor:
        """catch_up [B] int64, zeros where the caller gave none."""
        if self.catch_up is not None:
            return self.catch_up
        return torch.zeros(self.drafted.shape[0], dtype=torch.int64, device=self.drafted.device)


@dataclass(frozen=True)
class VerifyDistributions:
    """Full distributions of verified positions, for rules that need more than the fused statistics.

    Sampling distributions (what speculative acceptance is against) are ``softmax(logits / T)`` on sampled
    rows and the one-hot at the argmax on greedy rows, as in ``cascade.kernels.verify``. Rule
    distributions (what a deferral rule reads) are ``softmax(logits / T)`` with ``T = 1`` on greedy rows,
    the same convention as the fused rule statistics ``max_q``, ``max_p``, ``tv``."""

    tokens: torch.Tensor  # [R] int64, the draft token x at each row
    q: torch.Tensor  # [R, V] float32, draft sampling distribution
    p: torch.Tensor  # [R, V] float32, target sampling distribution
    q_rule: torch.Tensor  # [R, V] float32, draft rule distribution
    p_rule: torch.Tensor  # [R, V] float32, target rule distribution


def verify_distributions(
    q_logits: torch.Tensor,  # [R, V] filtered draft logits (-inf = removed by top-k / top-p)
    p_logits: torch.Tensor,  # [R, V] filtered target logits
    tokens: torch.Tensor,  # [R] int64
    temperature: torch.Tensor,  # [R] float32, 0 = greedy row
) -> VerifyDistributions:
    """Sampling and rule distributions of both models at the verified rows (fp32 math)."""
    temperature = temperature.to(device=q_logits.device, dtype=torch.float32)
    greedy = temperature <= 0
    inv_t = torch.where(greedy, torch.ones_like(temperature), 1.0 / torch.where(greedy, torch.ones_like(temperature), temperature))

    def both(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rule = torch.softmax(logits.float() * inv_t[:, None], dim=-1)
        one_hot = torch.zeros_like(rule).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        return torch.where(greedy[:, None], one_hot, rule), rule

    q, q_rule = both(q_logits)
    p, p_rule = both(p_logits)
    return VerifyDistributions(tokens=tokens.to(q_logits.device), q=q, p=p, q_rule=q_rule, p_rule=p_rule)


def speculative_acceptance(pi: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-> [R] ``min(1, pi(x) / q(x))`` for pi, q ``[R, V]`` and the draft tokens x ``[R]`` (x ~ q, so q(x) > 0)."""
    idx = tokens.view(-1, 1).to(pi.device)
    ratio = pi.gather(1, idx).squeeze(1) / q.gather(1, idx).squeeze(1).clamp_min(1e-30)
    return ratio.clamp(0.0, 1.0)


def residual_distribution(pi: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """-> [R, V] ``norm(max(0, pi - q))``; a row with no residual mass (pi == q, where rejection cannot
    happen) gets ``pi`` itself so that it is still a distribution."""
    res = (pi - q).clamp_min(0.0)
    mass = res.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, res / mass.clamp_min(1e-30), pi / pi.sum(dim=-1, keepdim=True).clamp_min(1e-30))


@dataclass(frozen=True)
class Policy:
    """Base policy: the trigger and deferral rule of plain speculative decoding (always escalate, delta = 1)."""

    name: ClassVar[str] = "base"
    State: ClassVar[type] = NoState  # what it carries between rounds of a request (``cascade.policies.state``)
    replace_from_target: ClassVar[bool] = False  # at a rejection, draw from p instead of the residual
    needs_distributions: ClassVar[bool] = False  # True: the engine calls target_distribution (see module doc)
    stops_drafting: ClassVar[bool] = False  # True: the engine asks stop_drafting after every drafted token
    request_level: ClassVar[bool] = False  # descriptive (CLI, reports): the draft answers alone and the policy
    #   decides at the end; the engine reads ``plan`` / ``at_finish`` instead
    benchmark_only: ClassVar[bool] = False  # True: the engine refuses it (the benchmark harness derives it)
    uses_router: ClassVar[bool] = False  # True: the trigger reads conf.router (the engine needs a router loaded)
    lossless: ClassVar[bool] = False  # True: the output is the target's whatever the block length (dynamic k applies)
    k: int = DEFAULT_K  # draft block length

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= 64:
            raise ValueError(f"k must be an integer in [1, 64], got {self.k!r}")
        for f in fields(self):  # canonical floats, so that describe() reads the same whatever was passed
            value = getattr(self, f.name)
            if f.type in ("float", float) and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))

    # -- trigger ---------------------------------------------------------------------------------
    def trigger(self, conf: BlockConfidence) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (block_len [B] int64, escalate [B] bool). Default: keep the whole block, always escalate."""
        return conf.drafted.clone(), torch.ones_like(conf.drafted, dtype=torch.bool)

    def stop_drafting(self, max_prob: torch.Tensor) -> torch.Tensor | None:
        """max_prob [B] of the token just drafted -> stop [B] bool (stop drafting after it), or None."""
        return None

    # -- per-request state (``cascade.policies.state``) -----------------------------------------------
    def init_state(self) -> Any:
        """A new request's state."""
        return self.State()

    def plan(self, state: Any) -> RoundPlan:
        """What the engine must know of a request (its state: one ``State``) before its round."""
        return RoundPlan()

    def after_round(self, state: Any, outcome: RoundOutcome) -> Any:
        """state: the stacked states of requests that drafted this round; ``outcome``: what the round did for
        them (escalated [B], emitted [B], the emitted tokens' log-probs [B, W]) -> their next states (host
        tensors). Not called for a policy whose ``State`` has no fields."""
        return state

    def at_finish(self, state: Any, token_logprobs: Sequence[float]) -> tuple[Any, bool]:
        """A request's answer ended (EOS, stop, max_tokens); ``token_logprobs``: its emitted tokens'. ->
        (its state, answer again: discard the answer and let the target answer from the prompt)."""
        return state, False

    # -- deferral and acceptance ------------------------------------------------------------------
    def deferral(self, v: "VerifyStats") -> torch.Tensor:
        """-> delta [R] float32 in [0, 1]."""
        return torch.ones_like(v.q_token)

    def acceptance(self, v: "VerifyStats", delta: torch.Tensor) -> torch.Tensor:
        """-> accept_prob [R] = min(1, pi(x) / q(x)) with pi = (1 - delta) q + delta p."""
        ratio = v.p_token / v.q_token.clamp_min(1e-30)
        return ((1.0 - delta) + delta * ratio).clamp(0.0, 1.0)

    def target_distribution(self, d: VerifyDistributions, v: "VerifyStats") -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pi [R, V], deferred [R] float32). Only called when ``needs_distributions``; the default is the
        delta-mixture, so that a subclass can switch paths and keep its rule."""
        delta = self.deferral(v).float().to(d.q.device)
        return (1.0 - delta)[:, None] * d.q + delta[:, None] * d.p, delta

    # -- naming ------------------------------------------------------------------------------------
    def describe(self) -> str:
        """``name(k=5, alpha=0.1)``; ``parse_policy`` reads it back to an equal policy."""
        args = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
        return f"{self.name}({args})"


_REGISTRY: dict[str, type[Policy]] = {}


def register(name: str):
    def wrap(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def policy_names(*, runnable: bool = False) -> list[str]:
    """The registered policy names, sorted; ``runnable``: only those the engine runs (not the benchmark-only
    ones the harness derives, such as ``oracle``)."""
    return sorted(n for n, cls in _REGISTRY.items() if not (runnable and cls.benchmark_only))


def check_unit(field_name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{field_name} must be in [0, 1], got {value!r}")


def check_number(field_name: str, value: float, *, low: float = -math.inf) -> None:
    """A real number (infinities allowed, NaN not) that is >= low."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < low:
        bound = "" if low == -math.inf else f" >= {low:g}"
        raise ValueError(f"{field_name} must be a number{bound}, got {value!r}")


def make_policy(name: str, **params) -> Policy:
    """Instantiate a registered policy. Unknown names and parameters raise ValueError naming them."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"policy: unknown policy {name!r}; known policies: {', '.join(policy_names())}")
    allowed = {f.name for f in fields(cls)}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"policy {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(allowed)}")
    return cls(**params)


def parse_value(text: str):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"policy parameter value {text!r} is not a number") from None
    if math.isnan(value):
        raise ValueError(f"policy parameter value {text!r} is not a number")
    return value


def split_policy_specs(text: str) -> list[str]:
    """Split a list of policy specs written as one string, on ``;`` or on commas outside parentheses:
    ``"target-only,chow(alpha=0.3, k=4)"`` -> ``["target-only", "chow(alpha=0.3, k=4)"]`` (empty items dropped)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch in ",;" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return [part for part in parts if part]


def parse_policy(spec: "str | Policy") -> Policy:
    """Parse ``name``, ``name(a=1, b=2)`` or ``name:v1:v2`` (values in field order, ``k`` last) into a policy."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"policy must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    m = re.fullmatch(r"([\w-]+)\s*\((.*)\)", spec)
    if m:
        name, body = m.group(1), m.group(2)
        params = {}
        for part in filter(None, (p.strip() for p in body.split(","))):
            if "=" not in part:
                raise ValueError(f"policy parameter {part!r} must be written name=value")
            key, value = part.split("=", 1)
            params[key.strip()] = parse_value(value)
        return make_policy(name, **params)
    name, *values = spec.split(":")
    cls = _REGISTRY.get(name)
    if cls is None:
        return make_policy(name)  # raises the unknown-policy error
    order = [f.name for f in fields(cls) if f.name != "k"] + ["k"]
    if len(values) > len(order):
        raise ValueError(f"policy {name!r} takes at most {len(order)} positional values ({order}), got {values}")
    return make_policy(name, **{key: parse_value(v) for key, v in zip(order, values)})
