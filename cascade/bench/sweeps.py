"""The parameter grids the harness sweeps, per policy family, and the request-level points it derives
exactly from the baseline runs (``quantile``, ``quantile-spec`` and ``oracle``).

A grid lists parameter dicts for ``make_policy``; together they span each policy from "never escalate"
to "escalate almost everything", so every budget has a calibrated choice. Resolution is the same for
every family: ``RESOLUTION`` values of each policy's main threshold (for ``quantile``, taus at that many
quantiles of its own score over the dev split, not every midpoint of the observed scores, which fitted
~300 configurations in-sample). Two-parameter families cross it with a short second axis: the rules'
draft-only trigger, BiLD's rollback and ``k`` (its hand-over interval), handoff's window (its entry either
Chow's threshold or the cost-aware price), quantile's level; ``takeover`` crosses its log-prob level with
quantile's levels and two decision points, each once or continuously, and adds its token-level entry. ``chow`` and ``chow-cut`` also get up
to 2 x ``RESOLUTION`` alphas placed at quantiles of the dev split's answer and block confidence
(``placed_alphas``), so that their cost has no jump the fixed alphas leave.
"""

from __future__ import annotations

import math
from typing import Sequence

from cascade.bench.paths import PathStats
from cascade.bench.replay import ReplaySet, one_intra_op_thread
from cascade.bench.runs import RunRecord, add_counters, first_token_counters
from cascade.policies import DEFAULT_K, Policy, make_policy
from cascade.policies.routing import linear_quantile

ALPHAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
RESOLUTION = len(ALPHAS)  # values of each family's main threshold
# the rules' draft-only trigger, spanning Chow's own (1 - alpha for alpha in ALPHAS: escalate almost never ..
# always) so that the rules reach every budget Chow reaches; 1 = verify every block (the paper's setting)
TRIGGERS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
WINDOWS = (0.0, 16.0, 64.0, math.inf)  # handoff's window: the entry block alone .. to the end of the request
PRICES = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # handoff's cost-aware entry (expected errors per position paid)
# takeover's log-prob levels, RESOLUTION of them, down to near-certain tokens (quantile's dev choices on MATH-500 sit
# at the median log-prob < -0.007); 0.5: hand over at the first chance, as no log-prob is above 0
TAKEOVER_TAUS = (-8.0, -5.0, -3.0, -2.0, -1.5, -1.0, -0.7, -0.5, -0.3, -0.2, -0.1, -0.05, -0.02, -0.01, -0.005, -0.002, 0.5)
# takeover's token-level entry (a block with a drafted max q below it is verified and hands the request over),
# crossed with no log-prob evidence (tau = -inf) and with quantile's at one level, decided continuously
TAKEOVER_ENTRIES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
FALLBACKS = tuple(round(0.05 + 0.9 * i / (RESOLUTION - 1), 4) for i in range(RESOLUTION))  # 0.05 .. 0.95

GRIDS: dict[str, list[dict]] = {
    "speculative": [{}],
    "chow": [{"alpha": a} for a in ALPHAS],
    "chow-cut": [{"alpha": a} for a in ALPHAS],
    **{rule: [{"alpha": a, "trigger_below": t} for a in ALPHAS for t in TRIGGERS]
       for rule in ("diff", "opt", "token-v1", "token-v2", "token-v3")},
    "bild": [{"fallback": f, "rollback": r, "k": k} for f in FALLBACKS for r in (2.0, 5.0) for k in (5, 10, 16)],
    # entry by Chow's threshold (price 0), or cost-aware (any block, expected errors >= price x positions paid)
    "handoff": [{"trigger_below": round(1.0 - a, 4), "window": w} for a in ALPHAS for w in WINDOWS]
               + [{"trigger_below": 1.0, "price": c, "window": w} for c in PRICES for w in WINDOWS],
    # the learned router's P(disagree) opens the window (threshold), or its expected disagreements per position paid
    "learned": [{"threshold": a, "window": w} for a in ALPHAS for w in WINDOWS]
               + [{"threshold": 0.0, "price": c, "window": w} for c in PRICES for w in WINDOWS],
    "handoff-v3": [{"alpha": a, "trigger_below": t, "window": w} for a in ALPHAS for t in (0.3, 0.5, 0.7, 0.9, 1.0)
                   for w in (16.0, math.inf)],
    # the hand-over's evidence: quantile's score over the answer so far (tau x level), decided once at a fixed
    # early point (until = after) or continuously from it (until = inf)
    **{fam: [{"tau": t, "quantile": q, "after": a, "until": u} for t in TAKEOVER_TAUS for q in (0.05, 0.1, 0.25, 0.5)
             for a in (16.0, 64.0) for u in (a, math.inf)]
          + [{"tau": t, "quantile": 0.25, "after": 16.0, "until": math.inf, "trigger_below": e}
             for e in TAKEOVER_ENTRIES for t in (-math.inf, *TAKEOVER_TAUS)] for fam in ("takeover", "takeover-spec")},
}
TOKEN_LEVEL = tuple(GRIDS)  # replayed families
QUANTILE_LEVELS = (0.0, 0.05, 0.1, 0.25, 0.5)  # which quantile of the draft's token log-probs
REQUEST_LEVEL = ("quantile", "quantile-spec")  # derived exactly from the baselines (and the target's path)


PLACED = ("chow", "chow-cut")  # single-threshold families whose grid also gets alphas placed on the dev split


def block_min_confidence(paths: Sequence[PathStats], k: int = DEFAULT_K) -> list[float]:
    """The least draft max-prob of each consecutive ``k``-position block of every path's answer: what Chow's
    trigger compares with ``1 - alpha`` once per round (approximately: rounds after an escalation shift)."""
    out = []
    for p in paths:
        q = p.q_max[: max(p.emitted, 1)]
        out += [min(q[i:i + k]) for i in range(0, len(q), k)]
    return out


def placed_alphas(paths: Sequence[PathStats], resolution: int = RESOLUTION, k: int = DEFAULT_K) -> list[float]:
    """Alphas at evenly spaced quantiles, over ``paths`` (pass the dev split's), of two confidences: each answer's
    least confident position (``1 - alpha`` above it: the answer is escalated at least once, and its catch-up
    makes the target read it up to there, which is most of Chow's target FLOPs on long answers) and each block's
    (``block_min_confidence``: the share of rounds escalated). The fixed ``ALPHAS`` leave gaps there (chow on
    MATH-500 jumped from 14 % to 48 % of target FLOPs between alpha 0.8 and 0.7). Rounded to 4 decimals, without
    the fixed ones."""
    per_answer = [min(p.q_max[: max(p.emitted, 1)]) for p in paths if p.q_max]
    placed = set()
    for values in (per_answer, block_min_confidence(paths, k)):
        if values:
            placed |= {round(1.0 - linear_quantile(values, (i + 0.5) / resolution), 4) for i in range(resolution)}
    return sorted(a for a in placed - set(ALPHAS) if 0.0 <= a <= 1.0)


def grid_policies(family: str, placed_on: Sequence[PathStats] | None = None) -> list[Policy]:
    """The family's grid; for ``PLACED`` families with ``placed_on`` (dev paths), plus ``placed_alphas`` of them."""
    if family not in GRIDS:
        raise ValueError(f"policies: no sweep grid for {family!r}; known: {', '.join(GRIDS)}")
    grid = list(GRIDS[family])
    if family in PLACED and placed_on:
        grid += [{"alpha": a} for a in placed_alphas(placed_on)]
    return [make_policy(family, **params) for params in grid]


def draft_logprob_quantile(path: PathStats, level: float) -> float:
    """The ``level`` quantile of the draft's T = 1 log-probs of its own emitted tokens (EOS excluded): the
    score the engine's ``quantile`` policy computes when its draft phase ends (same function)."""
    return linear_quantile([math.log(max(q, 1e-30)) for q in path.q_max[: path.emitted]], level)


def quantile_config(tau: float, level: float) -> str:
    """The policy string of the real ``quantile`` policy with these parameters."""
    return make_policy("quantile", tau=float(tau), quantile=float(level)).describe()


def quantile_records(draft: Sequence[RunRecord], answer: Sequence[RunRecord], paths: Sequence[PathStats],
                     level: float, tau: float, config: str) -> list[RunRecord]:
    """Request-level cascade, exactly from recorded runs: answers whose log-prob quantile is below ``tau``
    are answered again from scratch by ``answer`` (both runs' work counted). ``answer`` = the target-only
    records gives ``quantile``; speculative's records on the target's answer give ``quantile-spec``, the
    router at its strongest: its target answer decoded by lossless speculative decoding with the same
    draft, as a router in front of an engine with speculative decoding runs it. Nothing is reported before
    the decision: the first token comes after the draft's whole answer (kept), or after it and the first
    round of the target's answer (routed)."""
    out = []
    for d, a, path in zip(draft, answer, paths):
        if draft_logprob_quantile(path, level) < tau:
            out.append(RunRecord(
                dataset=d.dataset, problem_id=d.problem_id, policy=config, correct=a.correct,
                emitted_tokens=a.emitted_tokens, prompt_tokens=d.prompt_tokens,
                draft_tokens=d.draft_tokens + a.draft_tokens,
                draft_prefill_tokens=d.draft_prefill_tokens + a.draft_prefill_tokens,
                target_tokens=a.target_tokens, target_prefill_tokens=a.target_prefill_tokens,
                escalations=a.escalations, target_scored_tokens=a.scored, target_passes=a.passes,
                target_stateless_tokens=a.stateless, mode="replay-estimate" if a.mode == "replay-estimate" else "derived",
                time_share_s=d.time_share_s + a.time_share_s,
                first_token=add_counters(d.counters(), first_token_counters(a))))
        else:
            out.append(RunRecord(**{**d.to_json(), "policy": config, "mode": "derived", "first_token": d.counters(),
                                    "ttft_s": None, "latency_s": None}))
    return out


def quantile_taus(paths: Sequence[PathStats], level: float, resolution: int = RESOLUTION) -> list[float]:
    """``resolution`` thresholds at evenly spaced quantiles of the score over ``paths`` (pass the dev split's),
    plus both ends (never / always route)."""
    stats = [draft_logprob_quantile(p, level) for p in paths]
    inner = sorted({linear_quantile(stats, (i + 0.5) / resolution) for i in range(resolution)})
    return [-math.inf] + inner + [math.inf]


def oracle_records(draft: Sequence[RunRecord], target: Sequence[RunRecord]) -> list[RunRecord]:
    """Per request the cheaper correct answer: draft if it is right, else target if it is right, else draft."""
    out = []
    for d, t in zip(draft, target):
        pick = t if (d.correct < 0.5 and t.correct >= 0.5) else d
        out.append(RunRecord(**{**pick.to_json(), "policy": "oracle", "mode": "derived",
                                "first_token": first_token_counters(pick)}))
    return out


def sweep_records(families: Sequence[str], problems, draft: Sequence[RunRecord], target: Sequence[RunRecord],
                  dpaths: Sequence[PathStats], tpaths: Sequence[PathStats | None], tau_paths: Sequence[PathStats],
                  on_config=lambda: None) -> dict[str, list[tuple[str, list[RunRecord]]]]:
    """family -> [(config, one record per problem)] for every configuration of each family: token-level
    families replayed on the recorded answers, request-level ones derived exactly (``quantile``'s taus at
    quantiles of its score over ``tau_paths``, the split it is calibrated on; ``quantile-spec`` needs the
    target's recorded answers). ``on_config`` is called after each replayed configuration (progress). The walks
    run on one intra-op thread (``replay.one_intra_op_thread``)."""
    with one_intra_op_thread():
        return _sweep_records(families, problems, draft, target, dpaths, tpaths, tau_paths, on_config)


def _sweep_records(families, problems, draft, target, dpaths, tpaths, tau_paths, on_config):
    runs: dict[str, list[tuple[str, list[RunRecord]]]] = {}
    t_correct = [t.correct for t in target]
    replay = ReplaySet(problems, dpaths, tpaths, [d.correct for d in draft], t_correct)
    for fam in (f for f in families if f not in REQUEST_LEVEL):
        runs[fam] = []
        for pol in grid_policies(fam, tau_paths):
            runs[fam].append((pol.describe(), replay.records(pol)))
            on_config()
    spec_on_target = None
    for fam in (f for f in families if f in REQUEST_LEVEL):
        if fam == "quantile-spec" and spec_on_target is None:
            if any(tp is None for tp in tpaths):
                raise ValueError("quantile-spec needs the target's recorded answers (tpaths)")
            spec = make_policy("speculative")
            spec_on_target = ReplaySet(problems, tpaths, [None] * len(tpaths), t_correct, t_correct).records(spec)
        runs[fam] = []
        for level in QUANTILE_LEVELS:
            for tau in quantile_taus(tau_paths, level):
                config = quantile_config(tau, level)
                if fam == "quantile-spec":
                    config = "quantile-spec" + config[len("quantile"):]
                answer = target if fam == "quantile" else spec_on_target
                runs[fam].append((config, quantile_records(draft, answer, dpaths, level, tau, config)))
    return runs
