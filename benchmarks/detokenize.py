"""Text of a growing answer, round by round: one decode of the whole answer every round (what the engine did
before) against ``cascade.detokenize.extend_text`` (a window per round), with the default pair's tokenizer.

    .venv/bin/python benchmarks/detokenize.py            # answers of 256 / 1024 / 4096 tokens, 5 per round

Writes benchmarks/results/detokenize.{csv,json}: milliseconds of detokenisation per answer and per round,
and their ratio, with the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

from machine import machine_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="256,1024,4096", help="answer lengths in tokens (default: 256,1024,4096)")
    ap.add_argument("--per-round", type=int, default=5, help="tokens a round emits (default: 5)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings (default: 3)")
    ap.add_argument("--out", default="benchmarks/results", help="output directory")
    args = ap.parse_args()

    from cascade.detokenize import extend_text
    from cascade.library import load_tokenizer
    from cascade.models.factory import resolve_member

    tok = load_tokenizer(resolve_member(None, 0))
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    source = Path(__file__).read_text() * 40  # real text: code and prose
    ids_all = tok.encode(source, add_special_tokens=False)
    rng = random.Random(0)
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        start = rng.randrange(0, len(ids_all) - n)
        ids = ids_all[start:start + n]
        steps = list(range(args.per_round, n + 1, args.per_round)) + ([n] if n % args.per_round else [])

        def full() -> str:
            text = ""
            for m in steps:
                text = decode(ids[:m])
            return text

        def incremental() -> str:
            text, prefix, read = "", 0, 0
            for m in steps:
                added, prefix, read = extend_text(decode, ids[:m], prefix, read, final=m == n)
                text += added
            return text

        assert full() == incremental() == decode(ids)
        times = {}
        for name, fn in (("full", full), ("incremental", incremental)):
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[name] = best
        rows.append({"answer_tokens": n, "rounds": len(steps), "full_ms": times["full"] * 1e3,
                     "incremental_ms": times["incremental"] * 1e3,
                     "full_ms_per_round": times["full"] * 1e3 / len(steps),
                     "incremental_ms_per_round": times["incremental"] * 1e3 / len(steps),
                     "speedup": times["full"] / times["incremental"]})
        print(f"{n:5d} tokens, {len(steps)} rounds: full re-decode {times['full'] * 1e3:8.1f} ms, incremental "
              f"{times['incremental'] * 1e3:6.1f} ms ({times['full'] / times['incremental']:.1f}x)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "detokenize.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "detokenize.json").write_text(json.dumps({"machine": machine_info(), "per_round": args.per_round,
                                                     "rows": rows}, indent=1) + "\n")
    print(f"wrote {out / 'detokenize.csv'} and .json")


if __name__ == "__main__":
    main()
