"""The benchmark commands: ``cascade bench`` (every policy on quality / cost / latency), ``cascade calibrate``
(the configuration that meets a budget on the dev splits) and ``cascade train-router`` (the learned deferral
router)."""

from __future__ import annotations

import argparse

from cascade.cli.options import BENCH_DTYPE_HELP, add_dataset_options, add_model_options, add_run_options, \
    dataset_limits


def _add_pair_options(p) -> None:
    """The pair and how the benchmark commands run it: float32 by default (replay is exact there)."""
    add_model_options(p, target=False, dtype_default="float32", dtype_help=BENCH_DTYPE_HELP, llamacpp=False)
    add_run_options(p)


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="compare every policy on quality / cost / latency on real datasets",
                       description="Run draft-only and target-only for real on each dataset subset, record both answers "
                                   "by teacher forcing, sweep every policy's parameter by replay, choose each family's "
                                   "configuration on the dev split, report the test split with paired intervals, run the "
                                   "dev choices for real at each --real-check, and write CSV, Markdown and a PNG Pareto "
                                   "plot. Generations are cached on disk, so an interrupted run resumes and a "
                                   "repeated one costs nothing.")
    add_dataset_options(b, default_names="humaneval and gsm8k", limit=20)
    b.add_argument("--policies", default=None,
                   help="comma-separated policy families to sweep (default: every cascade policy and quantile)")
    b.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95 %% intervals (default: 2000)")
    b.add_argument("--real-check", action="append", default=None, metavar="AXIS:BUDGET",
                   help="run for real, on the first --real-limit test problems, the dev choices at this budget on this "
                        "axis (target = target FLOPs: prompt prefill + positions incl. catch-up, / target-only's; passes = "
                        "target passes per token; scored = positions that decided a token; time = modelled time; ttft = "
                        "modelled time to first token / draft-only's), and check replay against them; repeatable "
                        "(default: target:0.2 and passes:0.2; 'none': no real runs)")
    b.add_argument("--real-limit", type=int, default=60,
                   help="test problems per dataset for those real runs, the first of the test split (default: 60; 0 = all)")
    b.add_argument("--real-policies", default=None, metavar="A,B",
                   help="comma-separated families to run for real at each check (default: quantile and the two "
                        "token-level families with the best dev quality there)")
    b.add_argument("--export-runs", default=None, metavar="DIR",
                   help="export each dataset's real-check runs (and their re-timed baselines) from the cache to "
                        "DIR/<dataset>-real-checks-<tag>.jsonl.gz, so another machine reproduces the report without "
                        "running them (e.g. benchmarks/cache)")
    b.add_argument("--cost-file", default=None, metavar="CSV",
                   help="benchmarks/runner_cost.py CSV whose per-pass costs give the modelled-time axis "
                        "(default: the committed CPU figures)")
    _add_pair_options(b)
    b.add_argument("--out", default="benchmarks/results", help="output directory (default: benchmarks/results)")
    b.add_argument("--tag", default="bench", help="output file stem (default: bench)")
    b.set_defaults(handler=cmd_bench)

    c = sub.add_parser("calibrate", help="pick the policy configuration that meets a budget on the dev splits",
                       description="On the dev split of every --dataset: baselines and replayed sweeps of every family "
                                   "in --policy; the choice is the configuration whose cost on --axis is within "
                                   "--budget on every dataset with the highest mean dev gap recovered (draft-only -> "
                                   "target-only). On the test splits: real runs of that configuration and of both "
                                   "baselines. Prints the chosen policy string for `cascade generate --policy` and writes "
                                   "a JSON summary; --ship makes it the project's default policy.")
    c.add_argument("--policy", required=True, metavar="FAMILY[,FAMILY...]",
                   help="policy families to choose among, e.g. chow or handoff,chow,token-v3,quantile")
    c.add_argument("--budget", type=float, required=True, help="budget on --axis, e.g. 0.2")
    c.add_argument("--axis", choices=list(AXIS_NAMES), default="target",
                   help="the budget's cost axis: target = target FLOPs (prompt prefill + positions incl. catch-up, / target-only's), "
                        "passes = target passes per token, scored = positions that decided a token, time = modelled "
                        "time / target-only, ttft = modelled time to first token / draft-only's (default: target)")
    c.add_argument("--limit-axis", action="append", default=[], metavar="AXIS:MAX",
                   help="a further limit every dataset's dev point must meet, on an axis named as for --axis, "
                        "repeatable: e.g. ttft:1.5 (modelled time to first token within 1.5x draft-only's) and time:1.0 "
                        "(modelled latency below target-only's), the shipped default's criterion")
    add_dataset_options(c, default_names="gsm8k", limit=40)
    c.add_argument("--test-limit", type=int, default=None,
                   help="real test runs on the first N test problems per dataset (default: the whole test split; 0 = none)")
    _add_pair_options(c)
    c.add_argument("--out", default=None, help="JSON summary path (default: benchmarks/results/calibration-<policy>-<dataset>.json)")
    c.add_argument("--ship", action="store_true",
                   help="also write the summary as the project's default policy (cascade/calibrated_default.json), "
                        "which generate, serve and the library use when no policy is given")
    c.set_defaults(handler=cmd_calibrate)

    t = sub.add_parser("train-router", help="train the learned deferral router (policy `learned`) on the dev splits",
                       description="Train a tiny MLP on the draft's confidence statistics to predict where the target's "
                                   "greedy token differs from the draft's. Labels come free from teacher-forced target "
                                   "passes over the draft's own answers on each dataset's dev split (cached, as cascade "
                                   "bench records them); the test splits measure its AUC against the draft's max-prob. "
                                   "The router is saved next to the draft model, where Cascade.from_pretrained, "
                                   "cascade serve and cascade bench load it.")
    add_dataset_options(t, default_names="humaneval and gsm8k", limit=250,
                        limit_help="problems per dataset, a seeded sample (default: 250, the committed bench's samples: "
                                   "all 164 of HumanEval, 250 of GSM8K; 0 = all). Use the bench's sample and seed, so "
                                   "that its test splits stay unseen")
    t.add_argument("--hidden", type=int, default=16, help="hidden units of the MLP (default: 16)")
    t.add_argument("--steps", type=int, default=400, help="full-batch Adam steps (default: 400)")
    t.add_argument("--out", default=None, help="router file (default: router.json in the draft model's directory)")
    t.add_argument("--report", default="benchmarks/results/router.json", help="JSON report path (default: benchmarks/results/router.json)")
    _add_pair_options(t)
    t.set_defaults(handler=cmd_train_router)

    k = sub.add_parser("bench-cache", help="export or import the benchmark's generation cache (resume or reproduce a bench elsewhere)",
                       description="The bench's generations (real runs of draft-only, target-only and every policy, and "
                                   "the teacher-forced paths) are cached per request under $CASCADE_HOME/bench-cache. "
                                   "`export` writes them to one gzipped JSON-lines file; `import` adds such a file's "
                                   "entries to this machine's cache, so `cascade bench` and `cascade calibrate` resume or "
                                   "reproduce a committed report without generating again. Entries are keyed by both "
                                   "models' fingerprints, so they are used only with the same converted pair and dtype.")
    k.add_argument("action", choices=["export", "import"], help="export this cache to FILE, or import FILE into it")
    k.add_argument("file", nargs="+", metavar="FILE", help="the .jsonl.gz file (import: one or more)")
    k.add_argument("--runs-only", action="store_true",
                   help="export: only the real runs' records, not the teacher-forced paths (the next bench "
                        "recomputes them by teacher forcing, one pass per answer and model)")
    k.add_argument("--cache-dir", default=None, help="the cache (default: $CASCADE_HOME/bench-cache)")
    k.set_defaults(handler=cmd_bench_cache)


AXIS_NAMES = {"target": "target_fraction", "passes": "passes_per_token", "scored": "scored_fraction",
              "time": "modelled_time", "ttft": "ttft", "stock-remote": "stock_remote_fraction"}  # --real-check / --axis -> cascade.bench.frontier.AXES


def axis_values(specs: list[str], option: str) -> list[tuple[str, float]]:
    """``AXIS:VALUE`` option values -> [(the ``frontier.AXES`` name, value)]; ValueError naming ``option``."""
    out = []
    for spec in specs:
        axis, sep, budget = spec.partition(":")
        if not sep or axis not in AXIS_NAMES:
            raise ValueError(f"{option}: {spec!r} is not AXIS:BUDGET with AXIS one of {', '.join(AXIS_NAMES)}"
                             + (" (or 'none')" if option == "--real-check" else ""))
        try:
            value = float(budget)
        except ValueError:
            raise ValueError(f"{option}: budget {budget!r} of {spec!r} is not a number") from None
        if not value >= 0:
            raise ValueError(f"{option}: budget {value} of {spec!r} must be >= 0")
        out.append((AXIS_NAMES[axis], value))
    return out


def real_checks(specs: list[str] | None) -> tuple[tuple[str, float], ...]:
    """``--real-check AXIS:BUDGET`` values -> ((axis, budget), ...); None: the default; ['none']: ()."""
    if specs is None:
        return (("target_fraction", 0.2), ("passes_per_token", 0.2))
    if specs == ["none"]:
        return ()
    return tuple(axis_values(specs, "--real-check"))


def axis_limits(specs: list[str]) -> dict[str, float]:
    """``calibrate --limit-axis AXIS:MAX`` values -> {axis: max}."""
    return dict(axis_values(specs, "--limit-axis"))


def _bench_config(args: argparse.Namespace, **overrides):
    from pathlib import Path

    from cascade.bench.harness import BenchConfig

    return BenchConfig(
        limit=args.limit or None, seed=args.seed, batch_size=args.batch_size, draft=args.draft, target=args.target,
        device=args.device, dtype=args.dtype, max_len=args.max_len,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None, progress=not args.no_progress, **overrides)


def _families(text: str, option: str) -> tuple[str, ...]:
    from cascade.bench.sweeps import GRIDS, REQUEST_LEVEL

    families = tuple(p.strip() for p in text.split(",") if p.strip())
    known = set(GRIDS) | set(REQUEST_LEVEL)
    bad = [f for f in families if f not in known]
    if bad:
        raise ValueError(f"{option}: unknown {bad}; choose from {', '.join(sorted(known))}")
    return families


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cascade.bench.harness import BenchConfig, run_bench

    families = _families(args.policies, "--policies") if args.policies else BenchConfig.families
    limits = dataset_limits(args.dataset_limit)
    cfg = _bench_config(args, datasets=tuple(args.dataset or ("humaneval", "gsm8k")), families=families,
                        dataset_limits=limits, dev_fraction=args.dev_fraction, bootstrap=args.bootstrap,
                        real_checks=real_checks(args.real_check),
                        cost_file=Path(args.cost_file) if args.cost_file else None,
                        real_families=_families(args.real_policies, "--real-policies") if args.real_policies else None,
                        real_limit=args.real_limit or None, out_dir=Path(args.out), tag=args.tag,
                        export_runs=Path(args.export_runs) if args.export_runs else None)
    md = run_bench(cfg)
    print(md.read_text())
    print(f"wrote {md} and its .csv / .png beside it")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from cascade.bench.calibrate import calibrate, write_calibration
    from cascade.bench.datasets import load_dataset, select
    from cascade.bench.harness import Bench
    from cascade.bench.sweeps import GRIDS
    from cascade.defaults import shipped_path

    tunable = {name for name, grid in GRIDS.items() if len(grid) > 1} | {"quantile"}
    families = [f.strip() for f in args.policy.split(",") if f.strip()]
    bad = [f for f in families if f not in tunable]
    if not families or bad:
        raise ValueError(f"--policy: {bad or args.policy!r} has no parameter to calibrate; choose from {', '.join(sorted(tunable))}")
    if args.budget < 0:
        raise ValueError(f"--budget must be >= 0, got {args.budget}")
    if args.test_limit is not None and args.test_limit < 0:
        raise ValueError(f"--test-limit must be >= 0, got {args.test_limit}")
    bounds = axis_limits(args.limit_axis)
    names = args.dataset or ["gsm8k"]
    limits = dataset_limits(args.dataset_limit)
    datasets = {name: select(load_dataset(name), limits.get(name, args.limit or None), args.seed) for name in names}
    bench = Bench(_bench_config(args))
    cal = calibrate(bench, families, args.budget, datasets, args.dev_fraction, args.seed, axis=AXIS_NAMES[args.axis],
                    test_limit=args.test_limit, limits=bounds)
    stem = "+".join(Path(n).stem if n.endswith((".jsonl", ".gz")) else n for n in names)
    out = Path(args.out) if args.out else Path("benchmarks/results") / f"calibration-{'+'.join(families)}-{stem}.json"
    write_calibration(cal, out)
    print(json.dumps(cal.summary(), indent=1))
    print(f"chosen: {cal.policy}\nuse it:  cascade generate --policy \"{cal.policy}\" \"...\"\nwrote {out}")
    if args.ship:
        write_calibration(cal, shipped_path())
        print(f"shipped as the default policy: {shipped_path()}")
    return 0


def cmd_train_router(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from cascade.bench.datasets import load_dataset, select
    from cascade.bench.harness import Bench
    from cascade.bench.train_router import run_train_router

    if args.hidden < 1 or args.steps < 1:
        raise ValueError("--hidden and --steps must be >= 1")
    names = args.dataset or ["humaneval", "gsm8k"]
    if any("mbpp" in n.lower() for n in names):
        raise ValueError("--dataset: MBPP is reserved for checking that calibration transfers; do not train on it")
    limits = dataset_limits(args.dataset_limit)
    datasets = {name: select(load_dataset(name), limits.get(name, args.limit or None), args.seed) for name in names}
    bench = Bench(_bench_config(args))
    rep = run_train_router(bench, datasets, Path(args.out) if args.out else None, Path(args.report),
                           args.dev_fraction, args.seed, args.hidden, args.steps)
    print(json.dumps(rep.summary, indent=1))
    print(f"wrote {rep.summary['router_file']} and {args.report}")
    return 0


def cmd_bench_cache(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cascade.bench.runs import RunCache

    cache = RunCache.at(args.cache_dir)
    if args.action == "export":
        if len(args.file) != 1:
            raise ValueError(f"FILE: export writes one file, got {len(args.file)}")
        n = cache.export(args.file[0], runs_only=args.runs_only)
        print(f"exported {n} entries of {cache.root} to {args.file[0]}")
        return 0
    if args.runs_only:
        raise ValueError("--runs-only applies to export only")
    for name in args.file:
        if not Path(name).is_file():
            raise ValueError(f"FILE: {name} does not exist")
        added, kept = cache.import_file(name)
        print(f"{name}: {added} entries added to {cache.root}, {kept} already there")
    return 0
