"""The regime a dataset measures, and where on its length axis the policies trade places.

A request the target touches at all costs it a prompt prefill, so the ratio of prompt to answer length
decides how much a request-level router is favoured over a token-level cascade on the target-FLOPs
axis. This module reports, per dataset:

- ``lengths_markdown``: prompt and answer lengths (mean, median) per model, how many answers hit
  ``max_tokens``, and how long the recording took (the baselines' generation and the teacher-forced paths);
- ``tercile_markdown``: the test split cut into terciles of the target-only answer's length, and on each
  tercile the test quality and cost of every family's dev choice (chosen once on the whole dev split) at
  a budget, with the paired difference between each token-level family and the request-level router.
"""

from __future__ import annotations

import statistics
from typing import Sequence

import numpy as np

from cascade.bench.frontier import REFERENCES, REQUEST_BASELINE, Frontier, pct
from cascade.bench.paired import compare
from cascade.bench.runs import RunRecord


def _mean_median(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.fmean(values):.0f} / {statistics.median(values):.0f}"


def lengths_row(dataset: str, draft: Sequence[RunRecord], target: Sequence[RunRecord], max_tokens: int | None) -> dict:
    """The figures of one dataset's lengths table (see ``lengths_markdown``)."""
    return {
        "dataset": dataset, "n": len(draft), "max_tokens": max_tokens,
        "prompt_mean": statistics.fmean(r.prompt_tokens for r in target) if target else 0.0,
        "prompt_median": statistics.median(r.prompt_tokens for r in target) if target else 0.0,
        "draft_answer_mean": statistics.fmean(r.emitted_tokens for r in draft) if draft else 0.0,
        "draft_answer_median": statistics.median(r.emitted_tokens for r in draft) if draft else 0.0,
        "target_answer_mean": statistics.fmean(r.emitted_tokens for r in target) if target else 0.0,
        "target_answer_median": statistics.median(r.emitted_tokens for r in target) if target else 0.0,
        "draft_hit_max_tokens": sum(1 for r in draft if r.finish_reason == "length"),
        "target_hit_max_tokens": sum(1 for r in target if r.finish_reason == "length"),
        "draft_generation_s": sum(r.time_share_s for r in draft),
        "target_generation_s": sum(r.time_share_s for r in target),
    }


def lengths_markdown(rows: Sequence[dict], path_seconds: dict[str, float] | None = None) -> str:
    """One row per dataset: prompt and answer lengths, max_tokens hits and the recording time."""
    path_seconds = path_seconds or {}
    lines = ["## The regime: prompt and answer lengths (tokens, mean / median; all problems of each dataset)", "",
             "| dataset | n | prompt | draft answer | target answer | target ÷ prompt | hit max_tokens (draft / target) | "
             "recording: draft-only / target-only answers / teacher-forced paths (h) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["target_answer_mean"] / r["prompt_mean"] if r["prompt_mean"] else float("nan")
        paths = path_seconds.get(r["dataset"])
        lines.append(f"| {r['dataset']} | {r['n']} | {r['prompt_mean']:.0f} / {r['prompt_median']:.0f} | "
                     f"{r['draft_answer_mean']:.0f} / {r['draft_answer_median']:.0f} | "
                     f"{r['target_answer_mean']:.0f} / {r['target_answer_median']:.0f} | {ratio:.2f} | "
                     f"{r['draft_hit_max_tokens']} / {r['target_hit_max_tokens']} of {r['n']} (max_tokens {r['max_tokens']}) | "
                     f"{r['draft_generation_s'] / 3600:.2f} / {r['target_generation_s'] / 3600:.2f} / "
                     f"{'-' if paths is None else f'{paths / 3600:.2f}'} |")
    lines += ["", "Generation times are each request's share of its batch's rounds, summed (batch as in the report's "
              "header; imported records were timed on the machine the header names), so they add up to the wall "
              "time of those runs; paths are one teacher-forced pass of each model over each answer.", ""]
    return "\n".join(lines) + "\n"


def terciles(lengths: Sequence[int]) -> list[list[int]]:
    """Positions 0..n-1 cut into three groups by ``lengths`` (shortest first; ties keep their order), of
    sizes as equal as possible."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n = len(order)
    cuts = [0, round(n / 3), round(2 * n / 3), n]
    return [sorted(order[cuts[j]:cuts[j + 1]]) for j in range(3)]


def tercile_markdown(fr: Frontier, families: Sequence[str], axes: Sequence[str] = ("target_fraction", "passes_per_token"),
                     budget: float = 0.2) -> tuple[str, list[dict]]:
    """Per axis, the test split by terciles of target-only answer length: each family's dev choice at
    ``budget`` (chosen on the whole dev split), its quality and cost on the tercile, and each token-level
    family minus the request-level router, paired on the tercile's problems. Returns Markdown and rows."""
    test_lengths = [fr.target[i].emitted_tokens for i in fr.test_idx]
    groups = terciles(test_lengths)
    rows: list[dict] = []
    lines = [f"#### {fr.dataset}: the test split by terciles of target-only answer length, budget {budget:g}", ""]
    for axis in axes:
        sels = [fr.select(f, axis, budget) for f in families if f in fr.runs and f not in REFERENCES]
        router = next((s for s in sels if s.family == REQUEST_BASELINE), None)
        spans = []
        for g in groups:
            ls = [test_lengths[j] for j in g]
            spans.append(f"{min(ls)}-{max(ls)} tokens (n = {len(g)})" if ls else "empty")
        lines += [f"Budget on `{axis}`. Cells: test quality on the tercile · its cost on the axis · minus "
                  f"`{REQUEST_BASELINE}` (paired, 95 % interval; * significant).", "",
                  "| policy | " + " | ".join(spans) + " |", "|" + "---|" * (len(groups) + 1)]
        for s in sels:
            cells = []
            for t, g in enumerate(groups):
                if not g:
                    cells.append("-")
                    continue
                idx = [fr.test_idx[j] for j in g]
                records = dict(fr.runs[s.family]).get(s.config) if s.config != "draft-only" else fr.draft
                pt = fr.make_point(s.family, s.config, "test", [records[i] for i in idx], [fr.target[i] for i in idx],
                                   [fr.draft[i] for i in idx])
                cell = f"{pct(pt.quality)} · {getattr(pt, axis):.3f}"
                row = {"dataset": fr.dataset, "axis": axis, "budget": budget, "tercile": t, "family": s.family,
                       "config": s.config, "n": len(g), "quality": pt.quality, "cost": getattr(pt, axis),
                       "min_length": min(test_lengths[j] for j in g), "max_length": max(test_lengths[j] for j in g)}
                if router is not None and s is not router:
                    boot = np.random.default_rng(t).integers(0, len(g), size=(fr.boot.shape[0], len(g)))
                    r = compare(s.correct[g], router.correct[g], boot)
                    cell += f" · {100 * r.difference:+.1f} [{100 * r.ci[0]:+.1f}, {100 * r.ci[1]:+.1f}]{'*' if r.significant else ''}"
                    row.update(minus_router=r.difference, minus_router_ci=r.ci, significant=r.significant)
                cells.append(cell)
                rows.append(row)
            lines.append(f"| {s.family} | " + " | ".join(cells) + " |")
        lines.append("")
        token_level = [x for x in sels if x.family not in (REQUEST_BASELINE, "quantile-spec")]
        if router is not None and token_level:
            lead = max(token_level, key=lambda x: (x.dev.quality, -getattr(x.dev, axis)))  # chosen on dev, not test
            lines += _trade_places(rows, fr.dataset, axis, lead.family, len(groups)) + [""]
    return "\n".join(lines) + "\n", rows


def _trade_places(rows: list[dict], dataset: str, axis: str, family: str, n_groups: int) -> list[str]:
    """Where ``family`` (the token-level family with the best dev quality at the budget) leads or trails the
    router, tercile by tercile."""
    out = []
    for t in range(n_groups):
        best = next((r for r in rows if r["dataset"] == dataset and r["axis"] == axis and r["tercile"] == t
                     and r["family"] == family and "minus_router" in r), None)
        if best is None:
            continue
        verdict = "leads" if best["minus_router"] > 0 else ("ties" if best["minus_router"] == 0 else "trails")
        out.append(f"- tercile {t + 1} ({best['min_length']}-{best['max_length']} tokens): the token-level family with "
                   f"the best dev quality, {family}, {verdict} `{REQUEST_BASELINE}` by {100 * best['minus_router']:+.1f} pp "
                   f"[{100 * best['minus_router_ci'][0]:+.1f}, {100 * best['minus_router_ci'][1]:+.1f}]"
                   f"{' (significant)' if best['significant'] else ' (not significant)'}")
    return out
