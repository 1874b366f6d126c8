"""First speed benchmark: the same prompts, greedy, in one run, for

- transformers: target-only `generate` and assisted generation (`assistant_model=` the draft), batch 1;
- cascade: target-only, draft-only, speculative and chow at two alphas, at batch 1 and batch 8;
- with ``--backends torch,llama.cpp``: the same cascade rows on the llama.cpp runner (the default pair's GGUFs as
  they ship, ``cascade fetch-models --backend llama.cpp``), beside llama.cpp's own figures for the same files
  (``llama-bench`` tg for each model alone, ``llama-speculative`` with the draft), from the tools
  ``scripts/build_llama_tools.sh`` builds out of the same llama.cpp source as the runner.

Every system runs in every dtype of ``--dtypes`` (default: float32 and the runner's default on this
machine, bf16 on a CPU with avx512_bf16), and each ratio compares rows of the same dtype: a bf16 cascade
against fp32 transformers would flatter the cascade (a 1.5B transformers step: 445 ms fp32, 216 ms bf16).

Reports tokens/s, target_token_fraction, mean acceptance length and relative cost; prints ratios to
cascade's target-only and to transformers' assisted generation measured in the same run and dtype; checks
that speculative greedy output equals target-only greedy output. Writes CSV, a PNG bar chart and machine
info to benchmarks/results/.

    .venv/bin/python benchmarks/speed.py                    # default pair, 5 prompts x 48 tokens
    .venv/bin/python benchmarks/speed.py --quick            # 2 prompts x 16 tokens, smoke test
    .venv/bin/python benchmarks/speed.py --backends llama.cpp --no-transformers --tag speed_llamacpp
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import re
import subprocess
import time
from pathlib import Path

import torch
from machine import machine_info
from prompts import PROMPTS


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def run_transformers(draft_dir, target_dir, prompts_ids, max_tokens, eos_ids, progress, dtype: torch.dtype) -> tuple[list[dict], dict]:
    """transformers target-only and assisted generation, batch 1, greedy, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=dtype).eval()
    rows, outputs = [], {}
    for name, kwargs in (("hf-target-only", {}), ("hf-assisted", {"assistant_model": draft})):
        with torch.no_grad():  # warm-up
            target.generate(torch.tensor([prompts_ids[0]]), max_new_tokens=4, do_sample=False, **kwargs)
        tokens, t0, outs = 0, time.perf_counter(), []
        for ids in progress(prompts_ids, name):
            with torch.no_grad():
                out = target.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                      eos_token_id=list(eos_ids), pad_token_id=list(eos_ids)[0], **kwargs)
            new = out[0, len(ids):].tolist()
            new = new[: next((i for i, t in enumerate(new) if t in eos_ids), len(new))]
            tokens += len(new)
            outs.append(new)
        wall = time.perf_counter() - t0
        rows.append({"system": "transformers", "policy": name, "dtype": str(dtype).removeprefix("torch."), "batch": 1,
                     "tokens": tokens, "wall_s": wall,
                     "tok_per_s": tokens / wall, "decode_tok_per_s": float("nan"), "target_token_fraction": float("nan"),
                     "mean_acceptance_length": float("nan"), "relative_cost": float("nan")})
        outputs[name] = outs
    del target, draft
    gc.collect()
    return rows, outputs


def llama_tools_dir(text: str | None) -> Path | None:
    """``--llama-tools``: the directory holding ``llama-bench`` and ``llama-speculative`` (default: where
    scripts/build_llama_tools.sh puts them), or None where they are not built."""
    from cascade.weights import cascade_home

    path = Path(text).expanduser() if text else cascade_home() / "llama-tools" / "bin"
    return path if (path / "llama-bench").is_file() and (path / "llama-speculative").is_file() else None


def run_llama_tools(tools: Path, draft_gguf: Path, target_gguf: Path, prompt_texts: list[str], max_tokens: int,
                    threads: int, draft_max: int = 5) -> list[dict]:
    """llama.cpp's own figures for the GGUF pair: ``llama-bench`` token generation (tg ``max_tokens``, 3
    repetitions) for each model alone, and ``llama-speculative`` (greedy, the draft proposing up to ``draft_max``)
    over the same prompts, summed."""
    rows = []
    for name, gguf in (("llama-bench draft", draft_gguf), ("llama-bench target", target_gguf)):
        out = subprocess.run([str(tools / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(max_tokens), "-t",
                              str(threads), "-r", "3", "-o", "json"], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout)[0]
        rows.append({"system": "llama.cpp", "policy": name, "dtype": "gguf", "batch": 1,
                     "tokens": int(result["n_gen"]) * 3, "wall_s": int(result["n_gen"]) * 3 / float(result["avg_ts"]),
                     "tok_per_s": float(result["avg_ts"]), "decode_tok_per_s": float(result["avg_ts"]),
                     "target_token_fraction": float("nan"),
                     "mean_acceptance_length": float("nan"), "relative_cost": float("nan")})
    tokens, seconds, drafted, accepted = 0, 0.0, 0, 0
    for text in prompt_texts:
        out = subprocess.run([str(tools / "llama-speculative"), "-m", str(target_gguf), "-md", str(draft_gguf), "-p", text,
                              "-n", str(max_tokens), "--spec-draft-n-max", str(draft_max), "-t", str(threads), "-td", str(threads),
                              "--temp", "0", "-c", "2048"], capture_output=True, text=True, check=True)
        log = out.stdout + out.stderr
        m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
        if m is None:
            raise RuntimeError(f"llama-speculative printed no timing:\n{log[-2000:]}")
        tokens, seconds = tokens + int(m.group(1)), seconds + float(m.group(2))
        nd, na = re.search(r"n_drafted\s*=\s*(\d+)", log), re.search(r"n_accept\s*=\s*(\d+)", log)
        drafted += int(nd.group(1)) if nd else 0
        accepted += int(na.group(1)) if na else 0
    rows.append({"system": "llama.cpp", "policy": f"llama-speculative(k={draft_max})", "dtype": "gguf", "batch": 1,
                 "tokens": tokens, "wall_s": seconds, "tok_per_s": tokens / seconds, "decode_tok_per_s": tokens / seconds,
                 "target_token_fraction": float("nan"),
                 "mean_acceptance_length": accepted / drafted * draft_max if drafted else float("nan"),
                 "relative_cost": float("nan")})
    return rows


def run_cascade(cascade, prompts_ids, max_tokens, policy, batch, progress) -> tuple[dict, list[list[int]]]:
    """One policy at one batch size over the prompts, greedy. ``tok_per_s``: emitted tokens over the whole wall
    time (prompt prefills included); ``decode_tok_per_s``: the tokens after each request's first over the wall
    time less that of the same groups run to one token (what llama-bench's tg and llama-speculative's "decoded"
    rate count: no prompt processing)."""
    from cascade import SamplingParams

    params = SamplingParams(max_tokens=max_tokens)
    cascade.generate([prompts_ids[0]], SamplingParams(max_tokens=4), policy=policy)  # warm-up
    groups = [prompts_ids[i:i + batch] for i in range(0, len(prompts_ids), batch)]
    t0 = time.perf_counter()
    for group in groups:
        cascade.generate(group, SamplingParams(max_tokens=1), policy=policy)
    first_wall = time.perf_counter() - t0
    results, t0 = [], time.perf_counter()
    for group in progress(groups, f"{policy} b{batch}"):
        results += cascade.generate(group, params, policy=policy)
    wall = time.perf_counter() - t0
    emitted = sum(r.stats.emitted_tokens for r in results)
    target_tokens = sum(r.stats.target_tokens for r in results)
    escalations = sum(r.stats.escalations for r in results)
    verified = sum(r.stats.accepted_tokens + r.stats.bonus_tokens + r.stats.replaced_tokens for r in results)
    dp, tp = cascade.draft.num_params, cascade.target.num_params
    cost_num = sum(r.stats.relative_cost(dp, tp) * (r.stats.prompt_tokens + r.stats.emitted_tokens) for r in results)
    cost_den = sum(r.stats.prompt_tokens + r.stats.emitted_tokens for r in results)
    dtype = "gguf" if getattr(cascade.target, "path", None) else str(getattr(cascade.target, "dtype", "served"))
    dtype = f"gguf draft + {dtype.removeprefix('torch.')} target" if getattr(cascade.draft, "path", None) and \
        not getattr(cascade.target, "path", None) else dtype
    row = {"system": "cascade", "policy": policy, "dtype": dtype.removeprefix("torch."), "batch": batch,
           "tokens": emitted, "wall_s": wall,
           "tok_per_s": emitted / wall,
           "decode_tok_per_s": (emitted - len(results)) / (wall - first_wall) if wall > first_wall else float("nan"),
           "target_token_fraction": target_tokens / emitted if emitted else 0.0,
           "mean_acceptance_length": verified / escalations if escalations else float("nan"),
           "relative_cost": cost_num / cost_den if cost_den else float("nan")}
    return row, [r.token_ids for r in results]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['policy']}\n(b{r['batch']}, {r['dtype']})" for r in rows]
    colors = ["#888888" if r["system"] == "transformers" else ("#1f77b4" if r["batch"] == 1 else "#ff7f0e") for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    bars = ax.bar(range(len(rows)), [r["tok_per_s"] for r in rows], color=colors)
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['tok_per_s']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("tokens / s (greedy)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=5, help="number of built-in prompts (max %d)" % len(PROMPTS))
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens generated per prompt")
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated cascade batch sizes")
    ap.add_argument("--policies", default="target-only,draft-only,speculative,chow(alpha=0.1),chow(alpha=0.3)",
                    help="semicolon- or comma-separated cascade policies (parameters in parentheses)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--draft", default=None, help="draft checkpoint dir (default: the default pair)")
    ap.add_argument("--target", default=None, help="target checkpoint dir (default: the default pair)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default="torch",
                    help="comma-separated runners the cascade rows run on: 'torch' (the checkpoints, in every --dtypes), "
                         "'llama.cpp' (the default pair's GGUFs as they ship, or --draft / --target .gguf files; adds "
                         "llama.cpp's own llama-bench / llama-speculative rows where --llama-tools has them) and / or "
                         "'mixed' (the draft on llama.cpp, the target on the torch runner in fp32)")
    ap.add_argument("--llama-tools", default=None,
                    help="directory with llama.cpp's llama-bench and llama-speculative (default: "
                         "$CASCADE_HOME/llama-tools/bin, built by scripts/build_llama_tools.sh)")
    ap.add_argument("--threads", type=int, default=None,
                    help="llama.cpp threads, for the runner and llama.cpp's tools alike (default: every CPU)")
    ap.add_argument("--dtypes", default="auto",
                    help="comma-separated dtypes every system runs in (default 'auto': float32 and the runner's "
                         "default on this device, e.g. bfloat16 on a CPU with avx512_bf16)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    ap.add_argument("--tag", default="speed", help="file name stem for the outputs")
    ap.add_argument("--quick", action="store_true", help="2 prompts x 16 tokens, batch 1 and 2 (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.max_tokens, args.batch_sizes = 2, 16, "1,2"

    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from cascade.library import Cascade, generation_config_eos, load_tokenizer
    from cascade.models.factory import resolve_pair
    from cascade.policies import split_policy_specs

    console = Console()

    def progress(items, desc):
        return tqdm(items, desc=desc, leave=False)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"torch", "llama.cpp", "mixed"}
    if unknown:
        ap.error(f"--backends: unknown {sorted(unknown)}; choose from torch, llama.cpp, mixed")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    policies = split_policy_specs(args.policies)
    rows, lossless, hf_same = [], {}, {}
    configs = [("torch", d) for d in (_dtypes(args.dtypes, args.device) if "torch" in backends else [])]
    configs += [("llama.cpp", None)] if "llama.cpp" in backends else []
    configs += [("mixed", torch.float32)] if "mixed" in backends else []
    prompts_ids: list[list[int]] = []
    for backend, dtype in configs:
        if backend == "torch":
            draft_dir, target_dir = resolve_pair(args.draft or None, args.target or None)
        elif backend == "mixed":  # the draft local on llama.cpp, the target on the torch runner in fp32
            draft_dir, target_dir = resolve_pair(_llamacpp_name(args.draft), args.target or None)
        else:
            draft_dir, target_dir = resolve_pair(_llamacpp_name(args.draft), _llamacpp_name(args.target))
        tokenizer = load_tokenizer(draft_dir)
        prompts_ids = [chat_ids(tokenizer, p) for p in PROMPTS[: args.prompts]]
        hf_out = {}
        if backend == "torch" and not args.no_transformers:
            eos = {tokenizer.eos_token_id} | generation_config_eos(target_dir)
            hf_rows, hf_out = run_transformers(draft_dir, target_dir, prompts_ids, args.max_tokens, eos, progress, dtype)
            rows += hf_rows
        name = str(dtype).removeprefix("torch.") if dtype is not None else "gguf"
        name = f"gguf draft + {name} target" if backend == "mixed" else name
        if backend == "llama.cpp":
            tools = llama_tools_dir(args.llama_tools)
            threads = args.threads or len(os.sched_getaffinity(0))
            if tools is None:
                console.print("[yellow]llama.cpp's own tools are not built (scripts/build_llama_tools.sh): no "
                              "llama-bench / llama-speculative rows[/]")
            else:
                texts = [tokenizer.decode(ids) for ids in prompts_ids]
                rows += run_llama_tools(tools, draft_dir / "model.gguf", target_dir / "model.gguf", texts,
                                        args.max_tokens, threads)
                for r in rows[-3:]:
                    console.print(f"{r['policy']:>26}: {r['tok_per_s']:.3f} tok/s")
        cascade = Cascade.from_pretrained(draft_dir, target_dir, max_rows=max(batch_sizes), max_len=1024,
                                          device=args.device,
                                          dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
                                          llamacpp={"threads": args.threads} if args.threads else None)
        outputs = {}
        for batch in batch_sizes:
            for policy in policies:
                row, outs = run_cascade(cascade, prompts_ids, args.max_tokens, policy, batch, progress)
                rows.append(row)
                outputs[(policy, batch)] = outs
                console.print(f"{policy:>22} b{batch} {row['dtype']}: {row['tok_per_s']:.3f} tok/s, target fraction "
                              f"{row['target_token_fraction']:.2f}, acceptance {row['mean_acceptance_length']:.2f}")
        lossless[name] = all(outputs[("speculative", b)] == outputs[("target-only", b)] for b in batch_sizes
                             if ("speculative", b) in outputs and ("target-only", b) in outputs)
        hf_same[name] = hf_out.get("hf-target-only") == outputs.get(("target-only", 1)) if hf_out else None
        del cascade
        gc.collect()
    for r in rows:  # ratios within the row's own dtype
        same = [x for x in rows if x["dtype"] == r["dtype"]]
        b = next((x["tok_per_s"] for x in same if x["policy"] == "target-only" and x["batch"] == r["batch"]
                  and x["system"] == "cascade"), None) or \
            next((x["tok_per_s"] for x in same if x["policy"] == "target-only" and x["batch"] == 1), None)
        assisted = next((x["tok_per_s"] for x in same if x["policy"] == "hf-assisted"), None)
        r["x_target_only"] = r["tok_per_s"] / b if b else float("nan")
        r["x_hf_assisted"] = r["tok_per_s"] / assisted if assisted else float("nan")
        # llama.cpp's own rate for the model that decides the tokens: its draft alone for draft-only, else its target
        own = "llama-bench draft" if r["policy"] == "draft-only" else "llama-bench target"
        bench = next((x["decode_tok_per_s"] for x in same if x["policy"] == own), None)
        r["x_llama_bench"] = r["decode_tok_per_s"] / bench if bench and r["system"] == "cascade" else float("nan")
    dtype = ", ".join(str(d).removeprefix("torch.") if d is not None else "gguf (llama.cpp)" for _, d in configs)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {**machine_info(), "dtype": dtype}
    info.update({"prompts": args.prompts, "max_tokens": args.max_tokens, "speculative_equals_target_only": lossless,
                 "cascade_target_only_equals_transformers_greedy": hf_same, "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")})
    with open(out / f"{args.tag}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / f"{args.tag}_machine.json").write_text(json.dumps(info, indent=2) + "\n")
    plot(rows, out / f"{args.tag}.png", f"{info['cpu']} · {dtype} · {args.prompts} prompts × {args.max_tokens} tokens, greedy")

    table = Table(title=f"speed ({info['cpu']}, {dtype})")
    for col in ("system", "policy", "dtype", "batch", "tok/s", "decode tok/s", "× target-only", "× hf-assisted",
                "× llama-bench", "target frac", "accept len", "rel cost"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["system"], r["policy"], r["dtype"], str(r["batch"]), f"{r['tok_per_s']:.3f}",
                      f"{r['decode_tok_per_s']:.3f}", f"{r['x_target_only']:.2f}", f"{r['x_hf_assisted']:.2f}",
                      f"{r['x_llama_bench']:.2f}", f"{r['target_token_fraction']:.2f}",
                      f"{r['mean_acceptance_length']:.2f}", f"{r['relative_cost']:.2f}")
    console.print(table)
    console.print(f"speculative == target-only (greedy): {lossless}; cascade target-only == transformers greedy: {hf_same}")
    console.print(f"wrote {out / (args.tag + '.csv')}, {args.tag}.png, {args.tag}_machine.json")
    return 0


def _llamacpp_name(name: str | None) -> str:
    """A --draft / --target name for the llama.cpp backend: a .gguf file or an llama.cpp: name as given, any other
    name (or none: the default pair's model) behind the llama.cpp: prefix."""
    from cascade.models.gguf_dir import LLAMACPP_PREFIX, names_llamacpp

    return name if names_llamacpp(name) else LLAMACPP_PREFIX + (name or "")


def _dtypes(text: str, device: str) -> list[torch.dtype]:
    """``--dtypes``: 'auto' = float32 and the runner's default on ``device`` (one entry when they agree)."""
    from cascade.models.loading import default_dtype, resolve_dtype

    if text == "auto":
        return list(dict.fromkeys([torch.float32, default_dtype(torch.device(device))]))
    return [resolve_dtype(d.strip(), torch.device(device)) for d in text.split(",") if d.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
