"""The hand-over's ceiling: how much of the draft -> target quality gap a decision taken after the draft's first
``t`` answer tokens can recover at a target-FLOPs budget, with the evidence ``takeover`` reads, and with perfect
knowledge; ``t = end`` is request-level routing on the same evidence (``quantile``'s structure).

Why (issue 31): ``takeover`` decides early so that it can stream, and measured it did not reach the issue's goals
(60 % of the gap at 20 % of target FLOPs). Two different things can stop it: the evidence (the draft's token
log-probs over its first ``t`` tokens may not say which answers will be wrong) or the cost structure (a hand-over
after ``t`` tokens makes the target read them: prompt + ``t`` catch-up + the rest, so on target FLOPs a request
handed over at any point costs about what routing it costs; an early decision saves latency, not FLOPs). This
script separates the two on the recorded baselines, without the replay's estimates:

- per request, the evidence at ``t``: the lower ``quantile``-th order statistic of the log-probs the draft gave its
  first ``min(t, its length)`` emitted tokens (greedy: log max q at each position), for each ``quantile`` of
  ``QUANTILES`` (0: the least confident token so far, the token-level entry's evidence);
- the decision rule: hand over when that score is below ``tau``; ``quantile`` and ``tau`` are chosen on the dev
  split (best dev quality within the budget's dev cost) and reported on the test split;
- the model of a hand-over at ``t`` (stated in every output): its answer scores as the target-only answer, and it
  costs prompt + ``min(t, L_draft)`` + max(``L_target - min(t, L_draft)``, 1) target positions (the catch-up over
  the streamed prefix, then the target's own answer's remaining length); at ``t = end`` the target answers from
  scratch, prompt + ``L_target`` (routing). Costs are over target-only's positions (prompt + answer) summed;
- the oracle at ``t``: hands over exactly the requests the draft gets wrong and the target right (cheapest
  first, within the budget, on the test split itself: a ceiling, not a policy);
- paired against routing (``t = end``) on the same test problems: the difference of quality with its 95 %
  paired bootstrap interval.

Reads only the bench cache (``cascade bench`` / ``benchmarks/record_sets.py`` records: both baselines' answers and
the draft answers' teacher-forced paths; import ``benchmarks/cache`` first); loads no model and generates nothing:
a problem without its records is an error naming it.

    .venv/bin/python benchmarks/handover_ceiling.py --dataset humaneval=164 --dataset gsm8k=256 --dataset math500=128

Writes ``<out>/<tag>.csv`` (one row per dataset, budget and decision point), ``<tag>.md``, ``<tag>.png`` and
``<tag>_machine.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info  # noqa: E402

QUANTILES = (0.0, 0.05, 0.1, 0.25, 0.5)
POINTS = (0, 16, 32, 64, 128, 256, math.inf)  # decision points in emitted draft tokens (0: from the prompt alone,
#   before the draft's first token: the target then answers from scratch, with the target's TTFT); inf: the answer's end
BUDGETS = (0.1, 0.2, 0.3)


@dataclass(frozen=True)
class Request:
    """What the ceiling needs of one problem: both baselines' outcomes and lengths, and the draft's log-probs."""

    problem_id: str
    prompt_tokens: int
    draft_correct: float
    target_correct: float
    draft_len: int  # draft-only's emitted tokens
    target_len: int  # target-only's emitted tokens
    draft_logprobs: np.ndarray  # [draft_len] float64: log max q at each emitted draft token
    prompt_state: np.ndarray | None = None  # [hidden] float32: the draft's last-layer state at the prompt's last
    #   position (``--prompt-states``), a pre-generation difficulty signal


def order_statistic(logprobs: np.ndarray, t: float, quantile: float) -> float:
    """The lower ``quantile``-th order statistic of ``logprobs[:t]`` (``takeover``'s evidence:
    ``floor(quantile * (n - 1))``-th smallest); +inf for no tokens (nothing says hand over)."""
    n = int(min(t, logprobs.size))
    if n == 0:
        return math.inf
    return float(np.sort(logprobs[:n])[int(math.floor(quantile * (n - 1)))])


def handover_cost(r: Request, t: float) -> int:
    """Target positions of handing ``r`` over after its draft's first ``t`` tokens (inf: routing from scratch)."""
    if math.isinf(t):
        return r.prompt_tokens + r.target_len
    prefix = int(min(t, r.draft_len))
    return r.prompt_tokens + prefix + max(r.target_len - prefix, 1)


def quality(handed: np.ndarray, draft_correct: np.ndarray, target_correct: np.ndarray) -> np.ndarray:
    """handed [n] bool -> [n] per-problem score: the target's where handed over, else the draft's."""
    return np.where(handed, target_correct, draft_correct)


def choose(scores: np.ndarray, costs: np.ndarray, draft_correct: np.ndarray, target_correct: np.ndarray,
           norm: float, budget: float) -> tuple[float, float]:
    """scores [Q, n] (one row per quantile), costs [n] -> (row, tau) of the best dev quality with the handed-over
    requests' cost / ``norm`` <= budget; ties to the cheaper. Thresholds: between consecutive distinct scores (and
    below all: nothing handed over)."""
    best = (-1.0, math.inf, 0, -math.inf)  # (quality, cost, row, tau)
    for row, s in enumerate(scores):
        values = np.unique(s[np.isfinite(s)])
        taus = np.concatenate([[-math.inf], (values[:-1] + values[1:]) / 2 if values.size > 1 else [], values[-1:] + 1e-9])
        for tau in taus:
            handed = s < tau
            cost = float(costs[handed].sum()) / norm
            if cost > budget + 1e-12:
                continue
            q = float(quality(handed, draft_correct, target_correct).mean())
            if (q, -cost) > (best[0], -best[1]):
                best = (q, cost, row, float(tau))
    return best[2], best[3]


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive's score < a negative's) + half the ties (Mann-Whitney); positives are the requests to hand
    over, so a low score should mean positive. NaN when a class is empty."""
    pos, neg = scores[positive], scores[~positive]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    less = (pos[:, None] < neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((less + 0.5 * ties) / (pos.size * neg.size))


def oracle_handed(costs: np.ndarray, draft_correct: np.ndarray, target_correct: np.ndarray, norm: float,
                  budget: float) -> np.ndarray:
    """-> [n] bool: the requests the draft gets wrong and the target right, cheapest first, within the budget."""
    worth = np.flatnonzero((draft_correct < 0.5) & (target_correct >= 0.5))
    handed = np.zeros(costs.size, dtype=bool)
    spent = 0.0
    for i in worth[np.argsort(costs[worth], kind="stable")]:
        if spent + costs[i] > budget * norm + 1e-9:
            break
        handed[i] = True
        spent += costs[i]
    return handed


def paired_difference(a: np.ndarray, b: np.ndarray, reps: int, seed: int) -> tuple[float, float, float]:
    """Mean of a - b over the same problems and its 95 % paired bootstrap interval."""
    rng = np.random.default_rng(seed)
    diff = a - b
    boot = diff[rng.integers(0, diff.size, size=(reps, diff.size))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def features(r: Request, t: float) -> np.ndarray:
    """What a request offers a learned rule after its draft's first ``t`` tokens: the mean and the ``QUANTILES``
    order statistics of their log-probs, log prompt length, log tokens so far, and whether the answer already
    ended (a request-level router's features, at a decision point)."""
    n = int(min(t, r.draft_len))
    lp = r.draft_logprobs[:n]
    stats = [float(lp.mean()) if n else 0.0] + [order_statistic(lp, n, q) if n else 0.0 for q in QUANTILES]
    return np.array(stats + [math.log(r.prompt_tokens), math.log1p(n), float(r.draft_len <= t)])


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [n, f], y [n] 0/1 -> (mean [f], scale [f], weights [f + 1]) of an L2-regularised logistic regression
    on standardised features (Newton's method; the intercept not penalised)."""
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    z = np.hstack([(x - mean) / scale, np.ones((x.shape[0], 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(z.shape[1])
        w -= np.linalg.solve(hess, grad)
    return mean, scale, w


def logit(model: tuple[np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    mean, scale, w = model
    return np.hstack([(x - mean) / scale, np.ones((x.shape[0], 1))]) @ w


PROMPT_COMPONENTS = 16  # principal components of the prompt states (fitted on dev) a learned rule reads
FEATURE_NAMES = ("mean log-prob",) + tuple(f"log-prob q{q}" for q in QUANTILES) + ("log prompt tokens", "log tokens so far", "ended")
EVIDENCE = ("log-prob quantile", "learned", "learned: prompt length only")
PROMPT_STATE_EVIDENCE = ("learned: prompt state", "learned: prompt state + log-probs")


def principal_components(x: np.ndarray, dev: np.ndarray, k: int) -> np.ndarray:
    """x [n, d] -> [n, k]: projections on the top ``k`` principal directions of the dev rows (centred on them)."""
    centre = x[dev].mean(axis=0)
    _, _, vt = np.linalg.svd(x[dev] - centre, full_matrices=False)
    return (x - centre) @ vt[:k].T


def evidence_scores(kind: str, requests: Sequence[Request], t: float, dev: np.ndarray, worth: np.ndarray,
                    quantiles=QUANTILES) -> tuple[np.ndarray, list]:
    """-> (scores [R, n], labels [R]): candidate rules' scores at ``t`` (low: hand over). ``log-prob quantile``:
    one row per quantile; ``learned``: one row, minus the logit of P(worth handing over) of a logistic
    regression on ``features`` fitted on the dev split's requests alone; ``learned: prompt length only``: the
    same on the prompt's length alone (a pre-generation difficulty signal: no draft token read); ``learned:
    prompt state``: the same on the top ``PROMPT_COMPONENTS`` principal components (fitted on dev) of the draft's
    last-layer state at the prompt's end; ``... + log-probs``: those and ``features`` together."""
    if kind == "log-prob quantile":
        return np.array([[order_statistic(r.draft_logprobs, t, q) for r in requests] for q in quantiles]), list(quantiles)
    x = np.array([features(r, t) for r in requests])
    if kind in PROMPT_STATE_EVIDENCE:
        if any(r.prompt_state is None for r in requests):
            raise ValueError(f"evidence: {kind!r} needs the prompt states (--prompt-states)")
        states = principal_components(np.array([r.prompt_state for r in requests], dtype=float), dev, PROMPT_COMPONENTS)
        x = states if kind == PROMPT_STATE_EVIDENCE[0] else np.hstack([states, x])
    elif kind == "learned: prompt length only":
        x = x[:, [FEATURE_NAMES.index("log prompt tokens")]]
    elif kind != "learned":
        raise ValueError(f"evidence: unknown kind {kind!r} (one of {EVIDENCE + PROMPT_STATE_EVIDENCE})")
    model = fit_logistic(x[dev], worth[dev].astype(float))
    return -logit(model, x)[None, :], ["-"]


def ceiling_rows(dataset: str, requests: Sequence[Request], dev: Sequence[int], test: Sequence[int],
                 points=POINTS, budgets=BUDGETS, quantiles=QUANTILES, evidence=EVIDENCE, reps: int = 2000,
                 seed: int = 0) -> list[dict]:
    """One row per (budget, evidence, decision point): the dev-chosen rule's test quality, cost and gap recovered,
    its paired difference from routing at the end on the log-prob quantile (``quantile``'s structure), the
    evidence's test AUC, and the oracle's gap at that point."""
    dc = np.array([r.draft_correct for r in requests], dtype=float)
    tc = np.array([r.target_correct for r in requests], dtype=float)
    dev, test = np.asarray(dev), np.asarray(test)
    norm = {name: float(sum(requests[i].prompt_tokens + requests[i].target_len for i in idx))
            for name, idx in (("dev", dev), ("test", test))}
    gap = tc[test].mean() - dc[test].mean()
    worth = (dc < 0.5) & (tc >= 0.5)
    ordered = sorted(points)  # the answer's end (inf) last
    cached = {(kind, t): evidence_scores(kind, requests, t, dev, worth, quantiles) for kind in evidence for t in ordered}

    def rule(kind: str, t: float, budget: float):
        """-> (row, tau, handed [test] bool, costs [n]) of the dev choice at ``t`` within ``budget``."""
        scores, _ = cached[kind, t]
        costs = np.array([handover_cost(r, t) for r in requests], dtype=float)
        row, tau = choose(scores[:, dev], costs[dev], dc[dev], tc[dev], norm["dev"], budget)
        return row, tau, scores[row, test] < tau, costs

    rows = []
    for budget in budgets:
        routing = quality(rule(evidence[0], math.inf, budget)[2], dc[test], tc[test])  # the reference: routing at the end
        for kind in evidence:
            for t in ordered:
                scores, labels = cached[kind, t]
                row, tau, handed, costs = rule(kind, t, budget)
                score = quality(handed, dc[test], tc[test])
                diff, lo, hi = paired_difference(score, routing, reps, seed)
                oracle = quality(oracle_handed(costs[test], dc[test], tc[test], norm["test"], budget), dc[test], tc[test])
                rows.append(dict(
                    dataset=dataset, n_dev=int(dev.size), n_test=int(test.size), budget=budget, evidence=kind,
                    point="end" if math.isinf(t) else int(t), quantile=labels[row], tau=tau,
                    test_quality=float(score.mean()), draft_only=float(dc[test].mean()), target_only=float(tc[test].mean()),
                    gap_recovered=float((score.mean() - dc[test].mean()) / gap) if gap > 0 else math.nan,
                    test_cost=float(costs[test][handed].sum()) / norm["test"], handed_over=float(handed.mean()),
                    minus_routing=diff, minus_routing_lo=lo, minus_routing_hi=hi,
                    auc=auc(scores[row, test], worth[test]),
                    oracle_quality=float(oracle.mean()),
                    oracle_gap_recovered=float((oracle.mean() - dc[test].mean()) / gap) if gap > 0 else math.nan,
                ))
    return rows


def prompt_states(bench, problems) -> dict[str, np.ndarray]:
    """problem key -> the draft's last-layer hidden state (after the final norm) at the prompt's last position,
    [hidden] float32, by ``transformers`` on the converted draft in fp32 (one prefill per problem), cached in
    ``$CASCADE_HOME/prompt-states/<pair fingerprint>.npz``."""
    import torch
    from transformers import AutoModelForCausalLM

    from cascade.library import encode_text, load_tokenizer
    from cascade.weights import cascade_home

    path = cascade_home() / "prompt-states" / f"{bench.pair_fp}.npz"
    have = dict(np.load(path)) if path.exists() else {}
    todo = [p for p in problems if p.key() not in have]
    if todo:
        tokenizer = load_tokenizer(bench.draft_dir)
        model = AutoModelForCausalLM.from_pretrained(bench.draft_dir, dtype=torch.float32).eval()
        for i, p in enumerate(todo):
            ids = torch.tensor([encode_text(tokenizer, p.as_prompt())])
            with torch.inference_mode():
                out = model(input_ids=ids, output_hidden_states=True)
            have[p.key()] = out.hidden_states[-1][0, -1].float().numpy()
            if (i + 1) % 50 == 0 or i + 1 == len(todo):
                print(f"  prompt states: {i + 1} / {len(todo)}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **have)
    return {p.key(): have[p.key()] for p in problems}


def load_requests(dataset: str, limit: int | None, seed: int, cache_dir: Path | None,
                  with_prompt_states: bool = False) -> list[Request]:
    """The first ``limit`` problems of the bench's seeded sample, from the cache alone (no model loaded; with
    ``with_prompt_states``, the draft once per problem not seen before: ``prompt_states``)."""
    from cascade.bench.datasets import load_dataset, select
    from cascade.bench.harness import Bench, BenchConfig
    from cascade.bench.paths import PathStats, path_key

    bench = Bench(BenchConfig(datasets=(dataset,), limit=limit, seed=seed, cache_dir=cache_dir, progress=False,
                              device="cpu"), say=lambda s: None)
    problems = select(load_dataset(dataset), limit, seed)
    for policy in ("draft-only", "target-only"):
        missing = [p.problem_id for p, k in zip(problems, bench.runner.keys(policy, problems)) if bench.cache.get(k) is None]
        if missing:
            raise ValueError(f"{dataset}: no cached {policy} answer for {len(missing)} problems (first: {missing[0]}); "
                             "record them first (benchmarks/record_sets.py) or lower the limit")
    draft = bench.run("draft-only", problems)
    target = bench.run("target-only", problems)
    states = prompt_states(bench, problems) if with_prompt_states else {}
    out = []
    for p, d, t in zip(problems, draft, target):
        hit = bench.cache.get(path_key(bench.pair_fp, p.key(), "draft", d.extra["token_ids"]))
        if hit is None:
            raise ValueError(f"{dataset}: no teacher-forced path of the draft's answer to {p.problem_id}; record it first")
        path = PathStats.from_json(hit)
        logq = np.log(np.maximum(np.asarray(path.q_max[:path.emitted], dtype=float), 1e-300))
        out.append(Request(p.problem_id, d.prompt_tokens, float(d.correct), float(t.correct), d.emitted_tokens,
                           t.emitted_tokens, logq, states.get(p.key())))
    return out


def feature_aucs(dataset: str, requests: Sequence[Request], test: Sequence[int], points=POINTS) -> list[dict]:
    """Each feature's test AUC alone for "worth handing over" (low value: hand over; 0.5: no signal, below 0.5:
    the other way round) at each decision point: which evidence carries the signal."""
    dc = np.array([r.draft_correct for r in requests], dtype=float)
    tc = np.array([r.target_correct for r in requests], dtype=float)
    worth = ((dc < 0.5) & (tc >= 0.5))[np.asarray(test)]
    out = []
    for t in points:
        x = np.array([features(requests[i], t) for i in test])
        out.append({"dataset": dataset, "point": "end" if math.isinf(t) else int(t),
                    **{name: auc(x[:, j], worth) for j, name in enumerate(FEATURE_NAMES)}})
    return out


def markdown(rows: Sequence[dict], machine: dict, aucs: Sequence[dict] = ()) -> str:
    lines = ["# The hand-over's ceiling: deciding after the draft's first t tokens vs routing at the end", "",
             f"machine: `{json.dumps(machine)}`", "",
             "Model: a request handed over at t scores as target-only's answer and costs prompt + min(t, L_draft) + "
             "max(L_target - min(t, L_draft), 1) target positions (end: prompt + L_target, routing). Rule: "
             "hand over when the lower q-quantile of the draft's token log-probs so far is below tau; q and tau chosen "
             "on dev within the budget. Oracle: the draft-wrong / target-right requests, cheapest first, on test.", ""]
    for (ds, budget) in dict.fromkeys((r["dataset"], r["budget"]) for r in rows):
        sel = [r for r in rows if r["dataset"] == ds and r["budget"] == budget]
        r0 = sel[0]
        lines += [f"## {ds}, {budget:.0%} of target-only's target FLOPs (test n = {r0['n_test']}, dev n = {r0['n_dev']}; "
                  f"draft-only {r0['draft_only']:.1%}, target-only {r0['target_only']:.1%})", "",
                  "| evidence | decision at | q (dev) | test quality | gap recovered | test cost | handed over | minus routing [95 %] | AUC | oracle gap |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            lines.append(f"| {r['evidence']} | {r['point']} | {r['quantile']} | {r['test_quality']:.1%} | {r['gap_recovered']:.0%} | "
                         f"{r['test_cost']:.3f} | {r['handed_over']:.0%} | {100 * r['minus_routing']:+.1f} pp "
                         f"[{100 * r['minus_routing_lo']:+.1f}, {100 * r['minus_routing_hi']:+.1f}] | {r['auc']:.2f} | "
                         f"{r['oracle_gap_recovered']:.0%} |")
        lines.append("")
    if aucs:
        lines += ["## Which evidence carries the signal: each feature's test AUC alone for 'worth handing over'", "",
                  "(low value: hand over; 0.5: none; below 0.5: the other way round)", "",
                  "| dataset | decided at | " + " | ".join(FEATURE_NAMES) + " |",
                  "|---|---|" + "---|" * len(FEATURE_NAMES)]
        for a in aucs:
            lines.append(f"| {a['dataset']} | {a['point']} | " + " | ".join(f"{a[n]:.2f}" for n in FEATURE_NAMES) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: Path) -> None:
    """Gap recovered against the decision point: one panel per dataset (columns) and budget (rows), a line per
    evidence and the oracle's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    fig, axes = plt.subplots(len(budgets), len(datasets), figsize=(4.5 * len(datasets), 3.2 * len(budgets)), squeeze=False)
    for i, budget in enumerate(budgets):
        for ax, ds in zip(axes[i], datasets):
            here = [r for r in rows if r["dataset"] == ds and r["budget"] == budget]
            for kind in dict.fromkeys(r["evidence"] for r in here):
                sel = [r for r in here if r["evidence"] == kind]
                ax.plot([str(r["point"]) for r in sel], [100 * r["gap_recovered"] for r in sel], marker="o", label=kind)
            sel = [r for r in here if r["evidence"] == here[0]["evidence"]]
            ax.plot([str(r["point"]) for r in sel], [100 * r["oracle_gap_recovered"] for r in sel], ls=":", color="k",
                    label="oracle")
            ax.axhline(60, color="grey", lw=0.5)
            ax.set_title(f"{ds} (test n = {here[0]['n_test']}), {budget:.0%} of target FLOPs", fontsize=9)
            ax.set_xlabel("decided after t draft tokens", fontsize=8)
            ax.set_ylabel("% of the gap recovered", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_dataset(text: str) -> tuple[str, int | None]:
    name, _, n = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--dataset: expected NAME or NAME=N, got {text!r}")
    try:
        limit = int(n) if n else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dataset: N must be an integer, got {n!r}") from None
    return name, (limit or None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", action="append", type=parse_dataset, required=True, metavar="NAME[=N]",
                    help="dataset and how many problems of the bench's seeded sample (repeatable; N 0 or absent: all)")
    ap.add_argument("--seed", type=int, default=0, help="sample and split seed, as cascade bench's (default: 0)")
    ap.add_argument("--dev-fraction", type=float, default=0.5, help="dev share, as cascade bench's (default: 0.5)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples (default: 2000)")
    ap.add_argument("--prompt-states", action="store_true",
                    help="also the learned rules on the draft's state at the prompt's end (runs the draft once per "
                         "problem through transformers, cached; ~2 GB for the default draft in fp32)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="bench cache (default: $CASCADE_HOME/bench-cache)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory (default: benchmarks/results)")
    ap.add_argument("--tag", default="handover_ceiling", help="output file stem (default: handover_ceiling)")
    args = ap.parse_args(argv)
    from cascade.bench.datasets import split_indices

    rows, aucs = [], []
    for name, limit in args.dataset:
        requests = load_requests(name, limit, args.seed, args.cache_dir, args.prompt_states)
        dev, test = split_indices(len(requests), args.dev_fraction, args.seed)
        print(f"[{name}] {len(requests)} problems (dev {len(dev)}, test {len(test)})", flush=True)
        evidence = EVIDENCE + (PROMPT_STATE_EVIDENCE if args.prompt_states else ())
        rows += ceiling_rows(name, requests, dev, test, evidence=evidence, reps=args.bootstrap, seed=args.seed)
        aucs += feature_aucs(name, requests, test)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    machine = machine_info()
    (args.out / f"{args.tag}_machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    text = markdown(rows, machine, aucs)
    (args.out / f"{args.tag}.md").write_text(text + "\n")
    plot(rows, args.out / f"{args.tag}.png")
    print(text)
    print(f"\nwrote {args.out / args.tag}.csv, .md, .png and _machine.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
