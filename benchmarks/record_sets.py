"""Record what ``cascade bench`` needs for whole datasets (the draft-only and target-only answers, and both
answers' teacher-forced paths) in pieces that survive an interruption and travel between machines.

Recording HumanEval 164, GSM8K 1,319 and MATH-500 takes many hours on 2 CPU cores, longer than one
sitting. So, per dataset, problems are taken in the order of ``datasets.select`` (a seeded shuffle: any
prefix is a uniform random sample, so a recording stopped midway still benches a fair subset with
``--dataset-limit``), chunk by chunk:

1. draft-only, then target-only answers of the chunk (the bench's real runs, cached per request);
2. the teacher-forced paths of both answers (cached per answer);
3. the chunk's cache entries exported to ``<out>/<dataset>-seed<seed>-chunk<size>-<number>.jsonl.gz``
   (rewritten only when it gains entries, never dropping one: a finished chunk's file never changes again, so git
   keeps one copy).

It starts by importing every ``*.jsonl.gz`` in ``<out>`` (``cascade bench-cache import``), so a new machine
resumes where the last one stopped. Then ``cascade bench`` reads everything from the cache.

A step's answers are cached one by one as they finish but exported when the step ends; before a machine is
given up mid-step, ``--export-only`` writes each chunk's file with whatever of it is recorded (no model is
loaded, nothing generated), so the next machine starts from every finished answer.

    .venv/bin/python benchmarks/record_sets.py                      # math500, gsm8k, humaneval, whole
    .venv/bin/python benchmarks/record_sets.py --dataset gsm8k --chunk 200 --batch-size 32
    .venv/bin/python benchmarks/record_sets.py --dataset math500 --export-only   # before leaving a machine
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATASETS = ("math500", "gsm8k", "humaneval")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run nothing else heavy beside it: the fp32 pair at batch 32 holds ~15 GB.")
    p.add_argument("--dataset", action="append", choices=DATASETS, default=None,
                   help="dataset to record, repeatable, in this order (default: math500, gsm8k, humaneval)")
    p.add_argument("--limit", type=int, default=0, help="problems per dataset, a seeded sample (default: 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed, as cascade bench's --seed (default: 0)")
    p.add_argument("--chunk", type=int, default=128, help="problems per chunk and export file (default: 128)")
    p.add_argument("--batch-size", type=int, default=32, help="engine rows for the runs (default: 32)")
    p.add_argument("--max-len", type=int, default=None,
                   help="KV-cache positions per request (default: per dataset, the longest prompt + max_tokens + 1, "
                        "rounded up to 64: MATH-500 1920, GSM8K 768, HumanEval 704)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="both models' dtype, part of every cache key (default: float32, where replay is exact)")
    p.add_argument("--no-paths", action="store_true", help="record the answers only, not the teacher-forced paths")
    p.add_argument("--export-only", action="store_true",
                   help="generate nothing: write each chunk's file with the entries recorded so far (stop the "
                        "recorder first; run it before a machine is given up mid-chunk)")
    p.add_argument("--out", default="benchmarks/cache", help="where the chunk files go (default: benchmarks/cache)")
    p.add_argument("--cache-dir", default=None, help="the bench cache (default: $CASCADE_HOME/bench-cache)")
    return p.parse_args(argv)


def sample_chunks(problems: list, size: int, n: int, seed: int) -> list[list]:
    """``n`` problems in chunks of ``size``: chunk j holds the problems that ``select(problems, (j + 1) *
    size, seed)`` adds to ``select(problems, j * size, seed)`` (seeded samples are nested), each chunk in the
    dataset's order; so the first j chunks are exactly the seeded sample of j * size problems."""
    from cascade.bench.datasets import select

    if size < 1:
        raise ValueError(f"--chunk must be >= 1, got {size}")
    order = {p.problem_id: i for i, p in enumerate(problems)}
    out, seen = [], set()
    for end in range(size, n + size, size):
        part = [p for p in select(problems, min(end, n), seed) if p.problem_id not in seen]
        seen.update(p.problem_id for p in part)
        if part:
            out.append(sorted(part, key=lambda p: order[p.problem_id]))
    return out


def file_keys(path: Path) -> set[str]:
    """The entry keys of an export file (empty if there is none)."""
    if not path.exists():
        return set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return {json.loads(line)["key"] for n, line in enumerate(f) if n > 0}


def export(cache, name: Path, keys: list[str], say) -> None:
    """Write the chunk file with these entries and those it already holds (a step's export never drops what
    an ``--export-only`` run put there), unless it already holds them all."""
    held = file_keys(name)
    if set(keys) <= held:
        return
    say(f"{name.name}: {cache.export(name, keys=sorted(held | set(keys)))} entries exported")


def chunk_keys(bench, problems, records: dict[str, list], with_paths: bool) -> list[str]:
    """The cache keys of a chunk's baseline answers recorded so far (``records``: policy -> records) and
    (``with_paths``) their teacher-forced paths."""
    from cascade.bench.paths import path_key
    from cascade.bench.runs import run_key, sampling_for
    from cascade.policies import parse_policy

    keys = []
    for policy, model in (("draft-only", "draft"), ("target-only", "target")):
        if policy not in records:
            continue
        pol = parse_policy(policy)
        for problem, rec in zip(problems, records[policy]):
            keys.append(run_key(bench.pair_fp, problem, pol, sampling_for(problem)))
            if with_paths:
                keys.append(path_key(bench.pair_fp, problem.key(), model, rec.extra["token_ids"]))
    return keys


def recorded_keys(bench, cache, problems) -> list[str]:
    """The cache keys of a chunk's entries recorded so far: each baseline answer that is cached, and the
    teacher-forced path of each such answer that is cached too."""
    from cascade.bench.paths import path_key
    from cascade.bench.runs import run_key, sampling_for
    from cascade.policies import parse_policy

    keys = []
    for policy, model in (("draft-only", "draft"), ("target-only", "target")):
        pol = parse_policy(policy)
        for problem in problems:
            key = run_key(bench.pair_fp, problem, pol, sampling_for(problem))
            answer = cache.get(key)
            if answer is None:
                continue
            keys.append(key)
            token_ids = (answer.get("extra") or {}).get("token_ids")
            if token_ids is not None:
                path = path_key(bench.pair_fp, problem.key(), model, token_ids)
                if cache.get(path) is not None:
                    keys.append(path)
    return keys


def needed_len(problems) -> int:
    """KV-cache positions the longest request of ``problems`` needs (prompt + max_tokens + 1), rounded up to
    64: a smaller cache would cut answers short; a larger one holds memory the batch could use."""
    from cascade.library import encode_text, load_tokenizer
    from cascade.models.factory import resolve_member

    tokenizer = load_tokenizer(resolve_member(None, 0))
    need = max(len(encode_text(tokenizer, p.as_prompt())) + p.max_tokens + 1 for p in problems)
    return -(-need // 64) * 64


def main(argv=None) -> int:
    args = parse_args(argv)
    from cascade.bench.datasets import load_dataset
    from cascade.bench.harness import Bench, BenchConfig
    from cascade.bench.runs import RunCache

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = RunCache.at(args.cache_dir)
    for f in sorted(out.glob("*.jsonl.gz")):
        added, kept = cache.import_file(f)
        print(f"[record] imported {f.name}: {added} new, {kept} already here", flush=True)
    say = lambda m: print(f"[record {time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    for ds in args.dataset or DATASETS:
        everything = load_dataset(ds)
        max_len = args.max_len or needed_len(everything)
        say(f"{ds}: {len(everything)} problems, max_len {max_len}, batch {args.batch_size}, {args.dtype}")
        cfg = BenchConfig(batch_size=args.batch_size, max_len=max_len, dtype=args.dtype, device="cpu",
                          cache_dir=Path(args.cache_dir) if args.cache_dir else None, real_checks=())
        bench = Bench(cfg, say=say)
        for number, part in enumerate(sample_chunks(everything, args.chunk, args.limit or len(everything), args.seed)):
            name = out / f"{ds}-seed{args.seed}-chunk{args.chunk}-{number:03d}.jsonl.gz"
            if args.export_only:
                keys = recorded_keys(bench, cache, part)
                if keys:
                    export(cache, name, keys, bench.say)
                continue
            t0 = time.perf_counter()
            records: dict[str, list] = {}
            for policy in ("draft-only", "target-only"):  # each step exported as it ends: a machine that stops
                records[policy] = bench.run(policy, part, f"{ds} {policy} ({len(part)} problems, {name.name})")
                export(cache, name, chunk_keys(bench, part, records, False), bench.say)  # mid-chunk loses less
            if not args.no_paths:
                bench.paths(part, records["draft-only"], "draft")
                bench.paths(part, records["target-only"], "target")
                export(cache, name, chunk_keys(bench, part, records, True), bench.say)
            bench.say(f"{name.name}: done ({len(part)} problems, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
