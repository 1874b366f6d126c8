"""The parameter grids the harness sweeps, per policy family, and the request-level points it derives
exactly from the two baseline runs (``quantile`` and ``oracle``).

A grid lists parameter dicts for ``make_policy``; together they span each policy from "never escalate"
to "escalate almost everything", so every target-token budget has a calibrated choice.
"""

from __future__ import annotations

import math
from typing import Sequence

from cascade.bench.replay import PathStats
from cascade.bench.runs import RunRecord
from cascade.policies import Policy, make_policy
from cascade.policies.routing import linear_quantile

ALPHAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

GRIDS: dict[str, list[dict]] = {
    "speculative": [{}],
    "chow": [{"alpha": a} for a in ALPHAS],
    "chow-cut": [{"alpha": a} for a in ALPHAS],
    "diff": [{"alpha": a} for a in ALPHAS],
    "opt": [{"alpha": a} for a in ALPHAS],
    "token-v1": [{"alpha": a} for a in ALPHAS],
    "token-v2": [{"alpha": a} for a in ALPHAS],
    "token-v3": [{"alpha": a} for a in ALPHAS],
    "bild": [{"fallback": f, "rollback": r} for f in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
             for r in (1.0, 2.0, 3.0, 5.0)],
}
TOKEN_LEVEL = tuple(GRIDS)  # replayed families
QUANTILE_LEVELS = (0.0, 0.05, 0.1, 0.25, 0.5)  # which quantile of the draft's token log-probs


def grid_policies(family: str) -> list[Policy]:
    if family not in GRIDS:
        raise ValueError(f"policies: no sweep grid for {family!r}; known: {', '.join(GRIDS)}")
    return [make_policy(family, **params) for params in GRIDS[family]]


def draft_logprob_quantile(path: PathStats, level: float) -> float:
    """The ``level`` quantile of the draft's T = 1 log-probs of its own emitted tokens (EOS excluded): the
    score the engine's ``quantile`` policy computes when its draft phase ends (same function)."""
    return linear_quantile([math.log(max(q, 1e-30)) for q in path.q_max[: path.emitted]], level)


def quantile_config(tau: float, level: float) -> str:
    """The policy string of the real ``quantile`` policy with these parameters."""
    return make_policy("quantile", tau=float(tau), quantile=float(level)).describe()


def quantile_records(draft: Sequence[RunRecord], target: Sequence[RunRecord], paths: Sequence[PathStats],
                     level: float, tau: float, config: str) -> list[RunRecord]:
    """Request-level cascade, exactly from the baselines: answers whose log-prob quantile is below ``tau``
    are answered again by the target from scratch (both runs' work counted)."""
    out = []
    for d, t, path in zip(draft, target, paths):
        if draft_logprob_quantile(path, level) < tau:
            out.append(RunRecord(
                dataset=d.dataset, problem_id=d.problem_id, policy=config, correct=t.correct,
                emitted_tokens=t.emitted_tokens, prompt_tokens=d.prompt_tokens,
                draft_tokens=d.draft_tokens, draft_prefill_tokens=d.draft_prefill_tokens,
                target_tokens=t.target_tokens, target_prefill_tokens=t.target_prefill_tokens,
                escalations=0, target_scored_tokens=t.scored, mode="derived",
                time_share_s=d.time_share_s + t.time_share_s))
        else:
            out.append(RunRecord(**{**d.to_json(), "policy": config, "mode": "derived"}))
    return out


def quantile_taus(paths: Sequence[PathStats], level: float) -> list[float]:
    """Thresholds between every pair of observed statistics, plus both ends (never / always)."""
    stats = sorted({draft_logprob_quantile(p, level) for p in paths})
    mids = [(a + b) / 2 for a, b in zip(stats, stats[1:])]
    return [-math.inf] + mids + [math.inf]


def oracle_records(draft: Sequence[RunRecord], target: Sequence[RunRecord]) -> list[RunRecord]:
    """Per request the cheaper correct answer: draft if it is right, else target if it is right, else draft."""
    out = []
    for d, t in zip(draft, target):
        pick = t if (d.correct < 0.5 and t.correct >= 0.5) else d
        out.append(RunRecord(**{**pick.to_json(), "policy": "oracle", "mode": "derived"}))
    return out
