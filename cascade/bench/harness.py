"""``cascade bench``: every policy on one quality / cost / latency plane, on real datasets and the real pair.

Per dataset:
1. real runs of ``draft-only`` and ``target-only`` (cached per request, see ``runs``);
2. both answers of every problem recorded by teacher forcing (``replay.record_path``, cached);
3. every token-level policy swept over its grid by replay; ``quantile`` and ``oracle`` derived exactly
   from the two baseline runs;
4. for each policy, a REAL run at the configuration the replay calibrated for ``real_budget``: the
   figures reported at that budget (quality, target fraction, relative cost, tokens/s) are real, and the
   replayed records of the same configuration are checked against them;
5. CSV, Markdown and a PNG into ``out_dir``.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from cascade.bench.report import Point, aggregate, best_within, budget_table, plot, write_csv
from cascade.bench.replay import PathStats, path_key, record_path, replay_record
from cascade.bench.runs import PolicyRunner, RunCache, RunRecord, model_fingerprint
from cascade.bench.sweeps import (QUANTILE_LEVELS, TOKEN_LEVEL, grid_policies, oracle_records, quantile_config,
                                  quantile_records, quantile_taus)


@dataclass
class BenchConfig:
    """What ``cascade bench`` runs (every field is a CLI option)."""

    datasets: tuple[str, ...] = ("humaneval", "gsm8k")
    limit: int | None = 20  # problems per dataset (a seeded sample, see datasets.select); None: all
    dataset_limits: dict = field(default_factory=dict)  # per-dataset overrides of ``limit``
    seed: int = 0  # subset seed
    families: tuple[str, ...] = TOKEN_LEVEL + ("quantile",)  # policies to sweep (baselines always run)
    real_budget: float | None = 0.2  # run each policy for real at its calibrated config for this budget
    real_axis: str = "target_fraction"  # the budget's axis: "target_fraction" (catch-up counted) or "scored_fraction"
    real_limit: int | None = 5  # problems per dataset for those real runs, the first of the sample (None: all)
    batch_size: int = 8  # engine rows for real runs
    record_target_path: bool = False  # also teacher-force the target's answers (more exact replay, 2x recording)
    max_len: int = 2048
    dtype: str = "float32"  # both models' dtype in real runs and recording: fp32 by default, where the
    #   teacher-forced pass and the incremental decode round alike, so replay and lossless hold (README)
    draft: str | None = None  # model dirs or names (default pair when None)
    target: str | None = None
    out_dir: Path = Path("benchmarks/results")
    tag: str = "bench"
    cache_dir: Path | None = None  # default: $CASCADE_HOME/bench-cache
    progress: bool = True


@dataclass
class DatasetResult:
    points: list[Point] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)  # one row per real-run request (the per-request CSV)


class Bench:
    """Holds the loaded pair, the run cache and the recorded paths for one ``cascade bench`` invocation."""

    def __init__(self, cfg: BenchConfig, say: Callable[[str], None] = print) -> None:
        from cascade.models.loading import read_config
        from cascade.weights import DEFAULT_PAIR, cascade_home, resolve_model

        self.cfg, self.say = cfg, say
        self.draft_dir = resolve_model(cfg.draft or DEFAULT_PAIR[0].name)
        self.target_dir = resolve_model(cfg.target or DEFAULT_PAIR[1].name)
        # the dtype is part of every cached generation's key: bf16 and fp32 runs answer differently
        self.pair_fp = f"{model_fingerprint(self.draft_dir)}-{model_fingerprint(self.target_dir)}-{cfg.dtype}"
        self.cache = RunCache(cfg.cache_dir or cascade_home() / "bench-cache")
        self.draft_params = read_config(self.draft_dir).num_params
        self.target_params = read_config(self.target_dir).num_params
        self._cascade = None
        self.runner = PolicyRunner(lambda: self.cascade, self.cache, self.pair_fp)

    @property
    def cascade(self):
        """The loaded pair, loaded on first use: a fully cached bench never loads a model."""
        if self._cascade is None:
            from cascade.library import Cascade

            t0 = time.perf_counter()
            self._cascade = Cascade.from_pretrained(self.draft_dir, self.target_dir, max_rows=self.cfg.batch_size,
                                                    max_len=self.cfg.max_len, dtype=self.cfg.dtype)
            self.say(f"loaded the pair in {time.perf_counter() - t0:.0f} s (draft {self.draft_dir.name}, target {self.target_dir.name})")
        return self._cascade

    # ------------------------------------------------------------------ pieces
    def run(self, policy, problems, label: str | None = None) -> list[RunRecord]:
        records, stats = self.runner.run(policy, problems, progress=self.cfg.progress, label=label)
        if stats.generated:
            self.say(f"  {label or policy}: {stats.generated} generated ({stats.generated_tokens / max(stats.generated_time_s, 1e-9):.1f} tok/s), {stats.cached} cached")
        return records

    def paths(self, problems, records: Sequence[RunRecord], model: str) -> list[PathStats]:
        """Teacher-forced statistics along each record's answer (cached)."""
        from tqdm.auto import tqdm

        out = []
        bar = tqdm(total=len(problems), desc=f"record {model} answers", unit="req", disable=not self.cfg.progress)
        for problem, rec in zip(problems, records):
            ids = rec.extra["token_ids"]
            key = path_key(self.pair_fp, problem.key(), model, ids)
            hit = self.cache.get(key)
            if hit is None:
                path = record_path(self.cascade.draft, self.cascade.target, self.cascade.encode(problem.as_prompt()), ids,
                                   ended_on_eos=rec.finish_reason == "stop", eos_token_ids=self.cascade.engine.eos_token_ids,
                                   path_model=model)
                self.cache.put(key, path.to_json())
            else:
                path = PathStats.from_json(hit)
            out.append(path)
            bar.update(1)
        bar.close()
        return out

    def _request_rows(self, res: DatasetResult, records: Sequence[RunRecord], target_only: Sequence[RunRecord]) -> None:
        for r, t in zip(records, target_only):
            res.requests.append({
                "dataset": r.dataset, "problem_id": r.problem_id, "policy": r.policy, "correct": r.correct,
                "emitted_tokens": r.emitted_tokens, "target_tokens": r.target_tokens,
                "target_token_fraction": r.target_tokens / max(1, r.emitted_tokens),
                "relative_cost": r.flops(self.draft_params, self.target_params) / t.flops(self.draft_params, self.target_params),
                "wall_time_s": r.wall_time_s, "time_share_s": r.time_share_s,
                "tokens_per_s": r.emitted_tokens / r.time_share_s if r.time_share_s else None,
                "finish_reason": r.finish_reason, "score_detail": r.score_detail,
            })

    def point(self, ds: str, family: str, config: str, source: str, records, target_only) -> Point:
        return aggregate(ds, family, config, source, records, target_only, self.draft_params, self.target_params)

    # ------------------------------------------------------------------ one dataset
    def dataset(self, ds: str, problems) -> DatasetResult:
        cfg = self.cfg
        res = DatasetResult()
        self.say(f"[{ds}] {len(problems)} problems: baselines")
        draft = self.run("draft-only", problems, f"{ds} draft-only")
        target = self.run("target-only", problems, f"{ds} target-only")
        dpaths = self.paths(problems, draft, "draft")
        tpaths = self.paths(problems, target, "target") if cfg.record_target_path else [None] * len(problems)
        self._request_rows(res, draft, target)
        self._request_rows(res, target, target)
        res.points += [self.point(ds, "draft-only", "draft-only", "real", draft, target),
                       self.point(ds, "target-only", "target-only", "real", target, target),
                       self.point(ds, "oracle", "oracle", "derived", oracle_records(draft, target), target)]
        replayed: dict[str, list[tuple[str, list[RunRecord]]]] = {}
        for fam in cfg.families:
            if fam == "quantile":
                continue
            runs = []
            for pol in grid_policies(fam):
                recs = [replay_record(pol, p, dp, tp, d.correct, t.correct)
                        for p, dp, tp, d, t in zip(problems, dpaths, tpaths, draft, target)]
                runs.append((pol.describe(), recs))
                res.points.append(self.point(ds, fam, pol.describe(), "replay", recs, target))
            replayed[fam] = runs
        if "quantile" in cfg.families:
            runs = []
            for level in QUANTILE_LEVELS:
                for tau in quantile_taus(dpaths, level):
                    config = quantile_config(tau, level)
                    recs = quantile_records(draft, target, dpaths, level, tau, config)
                    runs.append((config, recs))  # derived exactly; checked against a real run like the replays
                    res.points.append(self.point(ds, "quantile", config, "derived", recs, target))
            replayed["quantile"] = runs
        if cfg.real_budget is not None:
            self._real_at_budget(ds, problems, res, replayed, draft, target)
        return res

    def _real_at_budget(self, ds, problems, res: DatasetResult, replayed, draft, target) -> None:
        cfg = self.cfg
        floor = next(p for p in res.points if p.family == "draft-only")
        sub = problems[: cfg.real_limit] if cfg.real_limit else problems
        idx = list(range(len(sub)))
        timed = {}  # the baselines' throughput on the same problems, measured now (same machine state)
        for name in ("draft-only", "target-only"):
            recs, _ = self.runner.run(name, sub, progress=cfg.progress, label=f"{ds} {name} (timing)", fresh=True)
            timed[name] = sum(r.emitted_tokens for r in recs) / max(1e-9, sum(r.time_share_s for r in recs))
        for fam in cfg.families:
            pts = [p for p in res.points if p.family == fam]
            chosen = best_within(pts, cfg.real_budget, floor, cfg.real_axis)
            if chosen is floor:
                self.say(f"  {fam}: no configuration within {cfg.real_budget:.0%} ({cfg.real_axis}) beats draft-only; real run skipped")
                continue
            recs = self.run(chosen.config, sub, f"{ds} {chosen.config} (real)")
            self._request_rows(res, recs, [target[i] for i in idx])
            pt = self.point(ds, fam, chosen.config, "real", recs, [target[i] for i in idx])
            pt.ref_draft_quality = sum(draft[i].correct for i in idx) / len(idx)
            pt.ref_target_quality = sum(target[i].correct for i in idx) / len(idx)
            pt.ref_draft_tokens_per_s, pt.ref_target_tokens_per_s = timed["draft-only"], timed["target-only"]
            res.points.append(pt)
            rep = dict(replayed.get(fam, [])).get(chosen.config)
            if rep is not None:
                res.checks.append(replay_check(ds, chosen.config, rep[: len(sub)], recs))


def replay_check(ds: str, config: str, replayed: Sequence[RunRecord], real: Sequence[RunRecord]) -> dict:
    """How well replayed records of ``config`` agree with real runs of it on the same problems."""
    n = len(real)
    agree = sum(1 for a, b in zip(replayed, real) if round(a.correct) == round(b.correct))
    exact = [(a, b) for a, b in zip(replayed, real) if a.mode in ("replay-exact", "derived")]
    rf = sum(a.target_tokens for a in replayed) / max(1, sum(a.emitted_tokens for a in replayed))
    ff = sum(b.target_tokens for b in real) / max(1, sum(b.emitted_tokens for b in real))
    return {
        "dataset": ds, "config": config, "n": n,
        "replay_quality": sum(a.correct for a in replayed) / max(1, n),
        "real_quality": sum(b.correct for b in real) / max(1, n),
        "score_agreement": agree / max(1, n),
        "replay_target_fraction": rf, "real_target_fraction": ff,
        "exact_mode_problems": len(exact),
        "exact_mode_same_tokens": sum(1 for a, b in exact if (a.target_tokens, a.emitted_tokens, a.correct) == (b.target_tokens, b.emitted_tokens, b.correct)),
        "modes": {m: n for m in ("replay-exact", "replay-target-path", "replay-estimate", "derived")
                  if (n := sum(1 for a in replayed if a.mode == m))},
    }


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_bench(cfg: BenchConfig, say: Callable[[str], None] = print) -> Path:
    """Run the whole benchmark; returns the Markdown report's path."""
    from cascade.bench.datasets import load_dataset, select

    problems = {ds: select(load_dataset(ds), cfg.dataset_limits.get(ds, cfg.limit), cfg.seed) for ds in cfg.datasets}  # bad names fail before loading models
    commit = git_commit()  # the code that produced the results (taken before the run, not after)
    bench = Bench(cfg, say)
    results: dict[str, DatasetResult] = {}
    t0 = time.perf_counter()
    for spec, probs in problems.items():
        name = probs[0].dataset if probs else spec  # "humaneval", "gsm8k", "jsonl:<stem>"
        results[name] = bench.dataset(name, probs)
    elapsed = time.perf_counter() - t0
    return write_outputs(cfg, results, elapsed, commit)


def write_outputs(cfg: BenchConfig, results: dict[str, DatasetResult], elapsed: float, commit: str) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = [p for r in results.values() for p in r.points]
    write_csv(points, out / f"{cfg.tag}.csv")
    rows = [row for r in results.values() for row in r.requests]
    if rows:
        import csv

        with (out / f"{cfg.tag}_requests.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    datasets = list(results)
    families, refs, real = {}, {}, {}
    for ds, r in results.items():
        refs[ds] = {p.family: p for p in r.points if p.family in ("draft-only", "target-only", "oracle")}
        families[ds] = {}
        for p in r.points:
            if p.source in ("replay", "derived") and p.family not in refs[ds]:
                families[ds].setdefault(p.family, []).append(p)
        real[ds] = [p for p in r.points if p.source == "real" and p.family not in refs[ds]]
    plot(datasets, families, refs, real, out / f"{cfg.tag}.png", f"cascade bench · commit {commit[:12]} · {cfg.tag}")
    from cascade.machine import machine_info

    machine = machine_info()
    sizes = ", ".join(f"{ds} {next(p.n for p in r.points if p.family == 'draft-only')}" for ds, r in results.items())
    head = (f"commit `{commit}` · {time.strftime('%Y-%m-%d %H:%M')} · wall {elapsed / 60:.1f} min · seeded subsets "
            f"(seed {cfg.seed}): {sizes} problems · real runs at budget {cfg.real_budget} on the first "
            f"{cfg.real_limit or 'all'} problems of each · batch {cfg.batch_size} · greedy")
    lines = [f"# cascade bench: {cfg.tag}", "", head, ""]
    if machine:
        lines += [f"machine: `{json.dumps(machine)}`", ""]
    lines += ["Gap recovered at a budget = best replayed configuration within that target_token_fraction "
              "(replay figures are labelled; see `cascade/bench/replay.py`). The (real) columns are REAL runs of "
              f"the configuration the replay chose for the {cfg.real_budget} budget on the `{cfg.real_axis}` axis.", ""]
    for ds in datasets:
        real_at = {p.family: p for p in real[ds]}
        lines.append(budget_table(ds, families[ds], refs[ds], real_at))
    checks = [c for r in results.values() for c in r.checks]
    if checks:
        lines += ["## Replay vs real runs (same configuration, same problems)", "",
                  "| dataset | config | n | quality replay / real | per-problem score agreement | target frac replay / real | exact-mode problems (same cost) | modes |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['dataset']} | `{c['config']}` | {c['n']} | {c['replay_quality']:.3f} / {c['real_quality']:.3f} | "
                         f"{c['score_agreement']:.0%} | {c['replay_target_fraction']:.3f} / {c['real_target_fraction']:.3f} | "
                         f"{c['exact_mode_problems']} ({c['exact_mode_same_tokens']}) | {c['modes']} |")
        (out / f"{cfg.tag}_replay_check.json").write_text(json.dumps(checks, indent=1))
    md = out / f"{cfg.tag}.md"
    md.write_text("\n".join(lines) + "\n")
    (out / f"{cfg.tag}_config.json").write_text(json.dumps({**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                                                            "commit": commit, "machine": machine}, indent=1, default=str))
    return md
