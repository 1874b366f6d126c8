"""``cascade bench``: every policy on one quality / cost / latency plane, on real datasets and the real pair.

Per dataset:
1. real runs of ``draft-only`` and ``target-only`` (cached per request, see ``runs``);
2. both answers of every problem recorded by teacher forcing (``paths.record_path``, cached);
3. every token-level policy swept over its grid by replay; ``quantile`` and ``oracle`` derived exactly
   from the two baseline runs;
4. REAL runs at the configurations the replay chose on dev for each checkpoint (``real_checks``: a budget
   on an axis; by default 20 % of target FLOPs and 20 % of target passes), of ``quantile`` and the two
   token-level families with the best dev quality there (or ``real_families``), on the first
   ``real_limit`` test problems, with draft-only and target-only timed on the same problems right before:
   real quality, cost, tokens/s, time to first token and latency, and the replayed records of the same
   configuration checked against them;
5. CSV, Markdown (the frontier on every axis with paired tests, the lengths table, the frontier by answer
   length) and a PNG into ``out_dir``.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from cascade.bench.costs import PassCosts
from cascade.bench.datasets import split_indices
from cascade.bench.frontier import REQUEST_BASELINE, Frontier, frontier_markdown, pct, summary_markdown
from cascade.bench.regime import lengths_markdown, lengths_row, tercile_markdown
from cascade.bench.plot import plot_frontier
from cascade.bench.report import Point, aggregate, write_csv
from cascade.bench.paths import PathStats, path_key, record_path, score_paths
from cascade.bench.runs import PolicyRunner, RunCache, RunRecord, model_fingerprint
from cascade.bench.sweeps import GRIDS, REQUEST_LEVEL, TOKEN_LEVEL, grid_policies, oracle_records, sweep_records
from cascade.policies import make_policy
from cascade.router import ROUTER_FILE, load_router


@dataclass
class BenchConfig:
    """What ``cascade bench`` runs (every field is a CLI option)."""

    datasets: tuple[str, ...] = ("humaneval", "gsm8k")
    limit: int | None = 20  # problems per dataset (a seeded sample, see datasets.select); None: all
    dataset_limits: dict = field(default_factory=dict)  # per-dataset overrides of ``limit``
    seed: int = 0  # subset seed
    families: tuple[str, ...] = TOKEN_LEVEL + REQUEST_LEVEL  # policies to sweep (baselines always run)
    dev_fraction: float = 0.5  # share of each dataset's problems in the dev split (parameters are chosen there)
    bootstrap: int = 2000  # bootstrap resamples for the test-split intervals
    real_checks: tuple[tuple[str, float], ...] = (("target_fraction", 0.2), ("passes_per_token", 0.2))  # (axis,
    #   budget) points at which dev choices run for real (axis: one of cascade.bench.frontier.AXES); () = none
    real_limit: int | None = 60  # test problems per dataset for those real runs, the first of the split (None: all)
    real_families: tuple[str, ...] | None = None  # families run for real (None: quantile and the two token-level
    #   families with the best dev quality at each checkpoint)
    batch_size: int = 8  # engine rows for real runs
    cost_file: Path | None = None  # runner_cost CSV for the modelled-time axis (default: costs.DEFAULT_COST_FILE)
    max_len: int = 2048
    dtype: str = "float32"  # both models' dtype in real runs and recording: fp32 by default, where the
    #   teacher-forced pass and the incremental decode round alike, so replay and lossless hold (README);
    #   "auto": the runner's choice for the device
    device: str = "auto"  # where the pair runs: "cpu", "cuda[:n]", or "auto" (CUDA when present)
    draft: str | None = None  # model dirs or names (default pair when None)
    target: str | None = None
    out_dir: Path = Path("benchmarks/results")
    tag: str = "bench"
    export_runs: Path | None = None  # a directory: each dataset's real-check runs exported there (carried with git)
    cache_dir: Path | None = None  # default: $CASCADE_HOME/bench-cache
    progress: bool = True


@dataclass
class DatasetResult:
    points: list[Point] = field(default_factory=list)
    frontier: Frontier | None = None
    checks: list[dict] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)  # one row per real-run request (the per-request CSV)
    lengths: dict = field(default_factory=dict)  # regime.lengths_row of the dataset
    path_seconds: float = 0.0  # time the teacher-forced paths took to record (where they were recorded)
    real_keys: list[str] = field(default_factory=list)  # cache keys of the real checks' runs (re-timed baselines too)


class Bench:
    """Holds the loaded pair, the run cache and the recorded paths for one ``cascade bench`` invocation."""

    def __init__(self, cfg: BenchConfig, say: Callable[[str], None] = print) -> None:
        from cascade.models.factory import resolve_pair
        from cascade.models.loading import read_config

        from cascade.config import resolve_device
        from cascade.models.loading import default_dtype

        self.device = resolve_device(cfg.device)
        self.dtype = cfg.dtype if cfg.dtype != "auto" else str(default_dtype(self.device)).removeprefix("torch.")
        self.cfg, self.say = cfg, say
        self.draft_dir, self.target_dir = resolve_pair(cfg.draft or None, cfg.target or None)
        # the dtype is part of every cached generation's key: bf16 and fp32 runs answer differently (and so is
        # a device other than the CPU, whose records' timings are not the CPU's)
        where = "" if self.device == "cpu" else f"-{self.device}"
        self.pair_fp = f"{model_fingerprint(self.draft_dir)}-{model_fingerprint(self.target_dir)}-{self.dtype}{where}"
        self.cache = RunCache.at(cfg.cache_dir)
        self.draft_params = read_config(self.draft_dir).num_params
        self.target_params = read_config(self.target_dir).num_params
        self.costs = _load_costs(cfg.cost_file, say)
        self._cascade = None
        self.timed_on: set[str] = set()  # machines that timed records imported by ``cascade bench-cache import``
        self.router = load_router(self.draft_dir)  # the learned deferral router, when one was trained
        self.runner = PolicyRunner(lambda: self.cascade, self.cache, self.pair_fp,
                                   router_fingerprint=self.router.info.get("fingerprint", "unnamed") if self.router else "none")

    @property
    def cascade(self):
        """The loaded pair, loaded on first use: a fully cached bench never loads a model."""
        if self._cascade is None:
            from cascade.library import Cascade

            t0 = time.perf_counter()
            self._cascade = Cascade.from_pretrained(self.draft_dir, self.target_dir, max_rows=self.cfg.batch_size,
                                                    max_len=self.cfg.max_len, dtype=self.dtype, device=self.device)
            self.say(f"loaded the pair in {time.perf_counter() - t0:.0f} s (draft {self.draft_dir.name}, target {self.target_dir.name})")
        return self._cascade

    # ------------------------------------------------------------------ pieces
    def run(self, policy, problems, label: str | None = None) -> list[RunRecord]:
        """Real runs (cached); the baselines keep their traces, so their paths cost one pass (``cascade.trace``)."""
        records, stats = self.runner.run(policy, problems, progress=self.cfg.progress, label=label, trace=True)
        self.timed_on.update(r.extra["timed_on"] for r in records if "timed_on" in r.extra)
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
                                   path_model=model, trace=rec.extra.get("trace"))
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
                "prompt_tokens": r.prompt_tokens, "emitted_tokens": r.emitted_tokens,
                "target_positions": r.target_tokens + r.target_prefill_tokens,
                "target_fraction": (r.target_tokens + r.target_prefill_tokens) / max(1, t.target_tokens + t.target_prefill_tokens),
                "target_passes": r.passes,
                "relative_cost": r.flops(self.draft_params, self.target_params) / t.flops(self.draft_params, self.target_params),
                "ttft_s": r.ttft_s, "latency_s": r.latency_s,
                "modelled_ttft_ms": self.costs.ttft_ms(r) if self.costs else None,
                "modelled_latency_ms": self.costs.record_ms(r) if self.costs else None,
                "wall_time_s": r.wall_time_s, "time_share_s": r.time_share_s,
                "tokens_per_s": r.emitted_tokens / r.time_share_s if r.time_share_s else None,
                "finish_reason": r.finish_reason, "score_detail": r.score_detail,
            })

    def point(self, ds: str, family: str, config: str, source: str, records, target_only, draft_only=None) -> Point:
        return aggregate(ds, family, config, source, records, target_only, self.draft_params, self.target_params,
                         self.costs, draft_only)

    # ------------------------------------------------------------------ one dataset
    def sweeps(self, ds: str, problems, draft, target, dpaths, tpaths, dev_idx) -> dict[str, list[tuple[str, list[RunRecord]]]]:
        """``sweeps.sweep_records`` for the configured families, with a progress bar; quantile's taus come
        from the dev split alone."""
        from tqdm.auto import tqdm

        fams = list(self.cfg.families)
        if self.router is None and any(make_policy(f).uses_router for f in fams if f in GRIDS):
            fams = [f for f in fams if f not in GRIDS or not make_policy(f).uses_router]
            self.say(f"  no learned router next to the draft ({self.draft_dir / ROUTER_FILE}): `learned` not swept "
                     "(train one with `cascade train-router`)")
        dev_paths = [dpaths[i] for i in dev_idx]
        bar = tqdm(total=sum(len(grid_policies(f, dev_paths)) for f in fams if f in GRIDS), desc=f"{ds} replay sweeps",
                   unit="config", disable=not self.cfg.progress)
        runs = sweep_records(fams, problems, draft, target, dpaths, tpaths, dev_paths, on_config=lambda: bar.update(1))
        bar.close()
        return runs

    def dataset(self, ds: str, problems) -> DatasetResult:
        cfg = self.cfg
        res = DatasetResult()
        dev_idx, test_idx = split_indices(len(problems), cfg.dev_fraction, cfg.seed)
        self.say(f"[{ds}] {len(problems)} problems (dev {len(dev_idx)}, test {len(test_idx)}): baselines")
        draft = self.run("draft-only", problems, f"{ds} draft-only")
        target = self.run("target-only", problems, f"{ds} target-only")
        dpaths = self.paths(problems, draft, "draft")
        tpaths = self.paths(problems, target, "target")
        if self.router is not None:
            score_paths(self.router, dpaths + tpaths)
        self._request_rows(res, draft, target)
        self._request_rows(res, target, target)
        runs = self.sweeps(ds, problems, draft, target, dpaths, tpaths, dev_idx)
        runs_with_refs = {**runs, "oracle": [("oracle", oracle_records(draft, target))]}
        res.frontier = Frontier(ds, runs_with_refs, draft, target, dev_idx, test_idx,
                                lambda *a: self.point(ds, *a), reps=cfg.bootstrap, seed=cfg.seed, costs=self.costs)
        for fam, configs in runs_with_refs.items():
            source = "derived" if fam in REQUEST_LEVEL + ("oracle",) else "replay"
            for config, recs in configs:
                for split_name, idx in (("dev", dev_idx), ("test", test_idx)):
                    pt = self.point(ds, fam, config, f"{source}-{split_name}", [recs[i] for i in idx],
                                    [target[i] for i in idx], [draft[i] for i in idx])
                    res.points.append(pt)
        for name, recs in (("draft-only", draft), ("target-only", target)):
            for split_name, idx in (("dev", dev_idx), ("test", test_idx)):
                res.points.append(self.point(ds, name, name, f"real-{split_name}", [recs[i] for i in idx],
                                             [target[i] for i in idx], [draft[i] for i in idx]))
        res.lengths = lengths_row(ds, draft, target, problems[0].max_tokens if problems else None)
        res.path_seconds = sum(p.record_s for p in dpaths + tpaths)
        if cfg.real_checks:
            self._real_checks(ds, problems, res, runs, draft, target, test_idx)
        return res

    def real_configs(self, fr: Frontier) -> list[tuple[str, str, str, float]]:
        """(family, config, axis, budget) of every real run: at each checkpoint, ``quantile`` and the two
        token-level families with the best dev quality (or ``real_families``), each dev choice once."""
        cfg = self.cfg
        out, seen = [], set()
        for axis, budget in cfg.real_checks:
            if cfg.real_families is not None:
                fams = [f for f in cfg.real_families if f in fr.runs]
            else:
                token = [f for f in fr.runs if f in TOKEN_LEVEL and f != "speculative"]
                ranked = sorted(token, key=lambda f: (-fr.select(f, axis, budget).dev.quality,
                                                      getattr(fr.select(f, axis, budget).dev, axis), f))
                fams = ([REQUEST_BASELINE] if REQUEST_BASELINE in fr.runs else []) + ranked[:2]
            for fam in fams:
                if fam == "quantile-spec":  # a composition of two engines' runs: derived only
                    continue
                chosen = fr.select(fam, axis, budget)
                if chosen.config == "draft-only":
                    self.say(f"  {fam}: no configuration within {budget:g} ({axis}) on dev; real run skipped")
                    continue
                if chosen.config not in seen:
                    seen.add(chosen.config)
                    out.append((fam, chosen.config, axis, budget))
        return out

    def _real_checks(self, ds, problems, res: DatasetResult, runs, draft, target, test_idx) -> None:
        """Real runs of the dev choices (``real_configs``) on the first ``real_limit`` test problems, with
        draft-only and target-only timed on the same problems right before (same machine state). The timing
        runs are kept under their own cache tag: while every real run is cached, so are they (a report
        written again compares the times that were measured together); otherwise they are timed afresh."""
        cfg = self.cfg
        idx = test_idx[: cfg.real_limit] if cfg.real_limit else list(test_idx)
        sub = [problems[i] for i in idx]
        targets, drafts = [target[i] for i in idx], [draft[i] for i in idx]
        configs = self.real_configs(res.frontier)
        retime = not all(self.runner.is_cached(config, sub) for _, config, _, _ in configs)
        timed = {}
        for name in ("draft-only", "target-only"):
            recs, _ = self.runner.run(name, sub, progress=cfg.progress, label=f"{ds} {name} (timing)", fresh=retime,
                                      tag="timing")
            timed[name] = recs
            pt = self.point(ds, name, name, "real", recs, targets, drafts)
            pt.ref_draft_quality, pt.ref_target_quality = _quality(drafts), _quality(targets)
            res.points.append(pt)
        tps = {name: sum(r.emitted_tokens for r in recs) / max(1e-9, sum(r.time_share_s for r in recs))
               for name, recs in timed.items()}
        res.real_keys += [k for name in timed for k in self.runner.keys(name, sub, "timing")]
        for fam, config, axis, budget in configs:
            res.real_keys += self.runner.keys(config, sub)
            recs = self.run(config, sub, f"{ds} {config} (real)")
            self._request_rows(res, recs, targets)
            pt = self.point(ds, fam, config, "real", recs, targets, drafts)
            pt.ref_draft_quality, pt.ref_target_quality = _quality(drafts), _quality(targets)
            pt.ref_draft_tokens_per_s, pt.ref_target_tokens_per_s = tps["draft-only"], tps["target-only"]
            res.points.append(pt)
            rep = dict(runs.get(fam, [])).get(config)
            if rep is not None:
                res.checks.append(replay_check(ds, config, [rep[i] for i in idx], recs, targets,
                                               self.costs, f"{axis} {budget:g}"))


def _quality(records: Sequence[RunRecord]) -> float:
    return sum(r.correct for r in records) / max(1, len(records))


def _target_positions(records: Sequence[RunRecord]) -> int:
    return sum(r.target_tokens + r.target_prefill_tokens for r in records)


def replay_check(ds: str, config: str, replayed: Sequence[RunRecord], real: Sequence[RunRecord],
                 target_only: Sequence[RunRecord], costs=None, chosen_at: str = "") -> dict:
    """How well replayed records of ``config`` agree with real runs of it on the same problems: quality, the
    target-FLOPs axis (target positions with the prompt prefill, ÷ target-only's on the same problems), and
    on the problems replay calls exact, the same answer length, target positions, correctness and (where the
    real run recorded it) the same counters at the first token."""
    n = len(real)
    agree = sum(1 for a, b in zip(replayed, real) if round(a.correct) == round(b.correct))
    exact = [(a, b) for a, b in zip(replayed, real) if a.mode in ("replay-exact", "derived")]
    base = max(1, _target_positions(target_only))

    def same(a: RunRecord, b: RunRecord) -> bool:
        return ((a.target_tokens + a.target_prefill_tokens, a.emitted_tokens, a.correct)
                == (b.target_tokens + b.target_prefill_tokens, b.emitted_tokens, b.correct))

    out = {
        "dataset": ds, "config": config, "chosen_at": chosen_at, "n": n,
        "replay_quality": _quality(replayed), "real_quality": _quality(real),
        "score_agreement": agree / max(1, n),
        "replay_target_fraction": _target_positions(replayed) / base, "real_target_fraction": _target_positions(real) / base,
        "exact_mode_problems": len(exact),
        "exact_mode_same_tokens": sum(1 for a, b in exact if same(a, b)),
        "exact_mode_same_first_token": sum(1 for a, b in exact if b.first_token is not None and a.first_token == b.first_token),
        "modes": {m: k for m in ("replay-exact", "replay-target-path", "replay-estimate", "derived")
                  if (k := sum(1 for a in replayed if a.mode == m))},
    }
    if costs is not None:
        out["replay_ttft_ms"] = sum(map(costs.ttft_ms, replayed)) / max(1, n)
        out["real_counters_ttft_ms"] = sum(map(costs.ttft_ms, real)) / max(1, n)
    return out


def _load_costs(path: Path | None, say: Callable[[str], None]) -> PassCosts | None:
    from cascade.bench.costs import DEFAULT_COST_FILE

    try:
        return PassCosts.from_runner_cost_csv(path or DEFAULT_COST_FILE)
    except (OSError, ValueError, KeyError) as exc:
        if path is not None:
            raise ValueError(f"cost_file: {exc}") from exc
        say(f"(no modelled-time axis: {exc})")
        return None


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


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
        if cfg.export_runs is not None and results[name].real_keys:
            Path(cfg.export_runs).mkdir(parents=True, exist_ok=True)
            path = Path(cfg.export_runs) / f"{name.replace(':', '-')}-real-checks-{cfg.tag}.jsonl.gz"
            say(f"[{name}] {bench.cache.export(path, keys=results[name].real_keys)} real-check runs exported to {path}")
    elapsed = time.perf_counter() - t0
    return write_outputs(cfg, results, elapsed, commit, bench.costs.source if bench.costs else "none",
                         imported_timings=sorted(bench.timed_on))


def write_outputs(cfg: BenchConfig, results: dict[str, DatasetResult], elapsed: float, commit: str,
                  costs_source: str = "none", imported_timings: Sequence[str] = ()) -> Path:
    """Write the report files; ``imported_timings``: the machines that timed records this bench read from an
    imported cache (their wall times and tokens / s are those machines', not this one's)."""
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
    from cascade.machine import machine_info

    machine = machine_info()
    frontiers = {ds: r.frontier for ds, r in results.items() if r.frontier is not None}
    families = [f for f in cfg.families] + ["oracle"]
    if frontiers:  # (no dataset with a frontier: nothing to plot)
        plot_frontier(frontiers, families, out / f"{cfg.tag}.png", f"cascade bench · commit {commit[:12]} · {cfg.tag}")
    sizes = ", ".join(f"{ds} {len(fr.dev_idx) + len(fr.test_idx)}" for ds, fr in frontiers.items())
    head = (f"commit `{commit}` · {time.strftime('%Y-%m-%d %H:%M')} · wall {elapsed / 60:.1f} min · seeded samples "
            f"(seed {cfg.seed}): {sizes} problems, split dev / test {cfg.dev_fraction:.0%} / {1 - cfg.dev_fraction:.0%} · "
            f"{cfg.dtype} · batch {cfg.batch_size} · greedy · {cfg.bootstrap} bootstrap resamples")
    lines = [f"# cascade bench: {cfg.tag}", "", head, ""]
    if machine:
        lines += [f"machine: `{json.dumps(machine)}`", ""]
    if imported_timings:
        lines += [f"Some records were imported (`cascade bench-cache import`): their wall times and tokens / s "
                  f"were measured on {'; '.join(imported_timings)}, not on this machine (quality and target "
                  f"cost are the pair's: the same converted weights and dtype).", ""]
    lines += ["Every policy's parameter is chosen on the dev split (best dev quality within the budget on the "
              "axis) and reported on the test split. Token-level figures come from replaying the engine's round "
              "on teacher-forced statistics (`cascade/bench/replay.py`); request-level ones are derived exactly "
              "from the baseline runs. `quantile-spec` is quantile routing whose target answer is decoded by "
              "lossless speculative decoding with the same draft. The modelled-time axis uses per-pass costs "
              f"from `{costs_source}`.", ""]
    selections, tercile_rows = [], []
    if frontiers:
        lines += ["## Summary: quality at 10 / 20 / 30 % of target FLOPs and of target passes", ""]
        lines += [summary_markdown(fr, families) for fr in frontiers.values()]
    length_rows = [r.lengths for r in results.values() if r.lengths]
    if length_rows:
        lines.append(lengths_markdown(length_rows, {ds: r.path_seconds for ds, r in results.items() if r.path_seconds}))
    for ds, fr in frontiers.items():
        md, sel = frontier_markdown(fr, families)
        lines.append(md)
        tmd, trows = tercile_markdown(fr, families)
        lines.append(tmd)
        tercile_rows += trows
        best = {}
        for s in sel:
            if s.family not in ("oracle",):
                key = (s.axis, s.budget)
                if key not in best or s.test.quality > best[key].test.quality:
                    best[key] = s
        router = {(s.axis, s.budget): s for s in sel if s.family == REQUEST_BASELINE}
        for s in sel:
            entry = {"dataset": ds, "family": s.family, "axis": s.axis, "budget": s.budget, "config": s.config,
                     "dev_quality": s.dev.quality, "dev_cost": getattr(s.dev, s.axis), "test_quality": s.test.quality,
                     "test_quality_ci": s.quality_ci, "test_cost": getattr(s.test, s.axis), "gap": s.gap,
                     "gap_ci": s.gap_ci, "test_target_fraction": s.test.target_fraction,
                     "test_passes_per_token": s.test.passes_per_token, "test_scored_fraction": s.test.scored_fraction,
                     "test_modelled_time": s.test.modelled_time, "test_latency_ci": s.latency_ci,
                     "test_ttft": s.test.ttft, "test_ttft_ci": s.ttft_ci, "test_ttft_ms": s.test.ttft_ms,
                     "test_latency_ms": s.test.latency_ms}
            for name, other in (("vs_best", best.get((s.axis, s.budget))), ("vs_" + REQUEST_BASELINE, router.get((s.axis, s.budget)))):
                if other is not None and other is not s:
                    r = fr.compare(s, other)
                    entry[name] = {"family": other.family, "difference": r.difference, "ci": r.ci, "p_value": r.p_value,
                                   "wins": r.wins, "losses": r.losses, "significant": r.significant}
            selections.append(entry)
        det = fr.detectable()
        selections.append({"dataset": ds, "detectable": det})
    (out / f"{cfg.tag}_selections.json").write_text(json.dumps(selections, indent=1, default=float))
    if tercile_rows:
        (out / f"{cfg.tag}_terciles.json").write_text(json.dumps(tercile_rows, indent=1, default=float))
    real = [p for r in results.values() for p in r.points if p.source == "real"]
    if real:
        checks_at = ", ".join(f"{b:g} of `{a}`" for a, b in cfg.real_checks)
        lines += [f"## Real runs of the dev choices at {checks_at}", "",
                  "On the first test problems of each dataset (n below), draft-only and target-only re-timed right "
                  f"before on the same problems; batch {cfg.batch_size}. Time to first token and latency are measured "
                  "from each request's admission into the running batch (the harness queues every problem at once); "
                  "the modelled columns price the same records' counters alone on the machine.", "",
                  "| dataset | config | n | quality (gap vs the same problems) | target FLOPs | passes / token | scored frac | "
                  "tok/s | TTFT s (measured / modelled) | latency s (measured / modelled) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in real:
            lines.append(f"| {p.dataset} | `{p.config}` | {p.n} | {100 * p.quality:.1f} % (gap {pct(p.gap)}) | "
                         f"{p.target_fraction:.3f} | {p.passes_per_token:.3f} | {p.scored_fraction:.3f} | "
                         f"{p.tokens_per_s or float('nan'):.2f} | {_secs(p.ttft_s)} / {p.ttft_ms / 1000:.2f} | "
                         f"{_secs(p.latency_s)} / {p.latency_ms / 1000:.2f} |")
        lines.append("")
    checks = [c for r in results.values() for c in r.checks]
    if checks:
        lines += ["## Replay vs real runs (same configuration, same problems)", "",
                  "Target FLOPs as on the frontier (target positions with the prompt prefill ÷ target-only's on the "
                  "same problems). Exact-mode problems: those replay calls exact; in brackets how many of them the "
                  "real run matched in answer length, target positions and score, and in its counters at the first "
                  "token (the modelled time to first token's input).", "",
                  "| dataset | config (chosen at) | n | quality replay / real | per-problem score agreement | "
                  "target FLOPs replay / real | exact-mode problems (same cost; same first token) | modes |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['dataset']} | `{c['config']}` ({c['chosen_at']}) | {c['n']} | {c['replay_quality']:.3f} / "
                         f"{c['real_quality']:.3f} | {c['score_agreement']:.0%} | {c['replay_target_fraction']:.3f} / "
                         f"{c['real_target_fraction']:.3f} | {c['exact_mode_problems']} ({c['exact_mode_same_tokens']}; "
                         f"{c['exact_mode_same_first_token']}) | {c['modes']} |")
        (out / f"{cfg.tag}_replay_check.json").write_text(json.dumps(checks, indent=1))
    md = out / f"{cfg.tag}.md"
    md.write_text("\n".join(lines) + "\n")
    (out / f"{cfg.tag}_config.json").write_text(json.dumps({**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                                                            "commit": commit, "machine": machine,
                                                            "imported_timings": list(imported_timings)}, indent=1, default=str))
    return md
