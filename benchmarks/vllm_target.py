"""The target in vLLM against the target in-process, on the same checkpoint and prompts, in one run:

- cascade with the in-process target runner (``LlamaRunner``), with an in-process vLLM engine as target
  (``--target vllm:DIR``) and with a real ``vllm`` OpenAI server on 127.0.0.1 as target (``--target-url``):
  tokens/s of target-only, speculative and chow at batch 1 and batch 4;
- vLLM alone on the same prompts: plain greedy decoding of the target, and vLLM's own speculative decoding
  with the draft model as speculator (``speculative_config={"method": "draft_model", ...}``);
- ``cascade target-serve`` as the remote target (its verify endpoint, prefix-cache reads on): on vLLM
  (``--target vllm:DIR``) and on the project's runner;
- the cost of one escalation (a 6-position verification after a ~300-token prefix) on each path, as seconds
  and as a ratio to in-process vLLM's, and the bare HTTP round trip to the server, so the network overhead
  per escalation is read off directly;
- whether speculative greedy output through each vLLM path equals target-only greedy output in-process.

Runs in the vLLM venv (``CASCADE_VENV=.venv-vllm bash scripts/setup.sh dev,vllm``); writes
``vllm_target.csv``, ``vllm_target.png`` and ``vllm_target_machine.json`` (overheads included) to
benchmarks/results/.

    .venv-vllm/bin/python benchmarks/vllm_target.py            # default pair, 4 prompts x 48 tokens
    .venv-vllm/bin/python benchmarks/vllm_target.py --quick    # 2 prompts x 12 tokens, batch 1
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from machine import machine_info
from prompts import PROMPTS
from speed import chat_ids, plot, run_cascade


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_vllm_server(target_dir: Path, max_len: int, memory_fraction: float) -> tuple[str, subprocess.Popen]:
    """A real (stock) vLLM OpenAI server serving the target on 127.0.0.1 (prefix caching on, fp32 like ours)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(target_dir),
           "--served-model-name", "target", "--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init",
           "--max-model-len", str(max_len), "--dtype", "float32", "--enable-prefix-caching",
           "--gpu-memory-utilization", str(memory_fraction), "--block-size", "32"]
    return wait_until_up(cmd, port, "vllm_target_server")


def start_target_serve(target: str, max_len: int, memory_fraction: float, max_rows: int) -> tuple[str, subprocess.Popen]:
    """``cascade target-serve`` on 127.0.0.1: ``target`` "vllm:DIR" (vLLM with the verify middleware) or a
    checkpoint dir (the project's runner); fp32 like the others."""
    port = _free_port()
    cmd = [sys.executable, "-m", "cascade.cli", "target-serve", "--target", target, "--port", str(port),
           "--max-len", str(max_len), "--dtype", "float32", "--max-rows", str(max_rows), "--log-level", "warning"]
    if target.startswith("vllm:"):
        cmd += ["--vllm-memory-fraction", str(memory_fraction), "--", "--skip-tokenizer-init"]
    return wait_until_up(cmd, port, "vllm_target_verify_server")


def wait_until_up(cmd: list[str], port: int, log_name: str) -> tuple[str, subprocess.Popen]:
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"{log_name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return url, proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{' '.join(cmd[:5])} did not come up in 15 minutes") from None
            time.sleep(2)


def verify_cost(runner, prefix: list[int], span: list[int], reps: int) -> float:
    """Median seconds of one escalation's verification over ``reps`` calls (after one warm-up call): the
    row holds ``prefix``; ``span`` (the last emitted token + k drafted ones) is scored at every position,
    then rolled back."""
    runner.free([0])
    runner.forward_span([0], [prefix], num_logits=[1])
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        runner.forward_span([0], [span], num_logits=[len(span)])
        times.append(time.perf_counter() - t0)
        runner.truncate([0], [len(prefix)])
    runner.free([0])
    return statistics.median(times[1:])  # the first call warms caches


def http_round_trip(url: str, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            r.read()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_vllm_alone(target_dir: Path, draft_dir: Path | None, prompts_ids, max_tokens: int, eos: set[int], batch: int,
                   max_len: int, memory_fraction: float, progress) -> tuple[dict, list[list[int]]]:
    """vLLM decoding the target alone (draft_dir None) or with its own draft-model speculative decoding."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=str(target_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=max_len,
                  gpu_memory_utilization=memory_fraction, enable_prefix_caching=True, seed=0, block_size=32)
    name = "vllm target-only"
    if draft_dir is not None:
        kwargs["speculative_config"] = {"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": 5}
        name = "vllm speculative (draft model, k=5)"
    llm = LLM(**kwargs)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=sorted(eos), detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=prompts_ids[0])], SamplingParams(max_tokens=4, temperature=0.0, detokenize=False),
                 use_tqdm=False)  # warm-up
    groups = [prompts_ids[i:i + batch] for i in range(0, len(prompts_ids), batch)]
    outs, t0 = [], time.perf_counter()
    for group in progress(groups, f"{name} b{batch}"):
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in group], params, use_tqdm=False)
        outs += [[t for t in r.outputs[0].token_ids if t not in eos] for r in res]
    wall = time.perf_counter() - t0
    tokens = sum(len(o) for o in outs)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    row = {"system": "vllm", "target": "vllm alone", "policy": name, "batch": batch, "tokens": tokens, "wall_s": wall,
           "tok_per_s": tokens / wall, "target_token_fraction": float("nan"), "mean_acceptance_length": float("nan"),
           "relative_cost": float("nan")}
    return row, outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="number of built-in prompts (max %d)" % len(PROMPTS))
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens generated per prompt")
    ap.add_argument("--batch-sizes", default="1,4", help="comma-separated batch sizes")
    ap.add_argument("--policies", default="target-only,speculative,chow(alpha=0.3)", help="cascade policies")
    ap.add_argument("--paths", default="local,vllm,remote,remote-verify,runner-remote-verify,vllm-alone",
                    help="what to run: local (in-process runner), vllm (in-process vLLM), remote (stock vllm serve), "
                         "remote-verify (cascade target-serve on vLLM: the verify endpoint), runner-remote-verify "
                         "(cascade target-serve on the project's runner), vllm-alone (vLLM target-only and vLLM "
                         "speculative decoding)")
    ap.add_argument("--memory-fraction", type=float, default=0.45,
                    help="vLLM's gpu_memory_utilization (on its CPU backend: share of RAM for weights + KV)")
    ap.add_argument("--spec-memory-fraction", type=float, default=0.75,
                    help="the same for vLLM's own speculative decoding (target + draft + compile workspace)")
    ap.add_argument("--max-len", type=int, default=1024, help="cache positions per sequence")
    ap.add_argument("--reps", type=int, default=10, help="repetitions of the escalation-cost measurement")
    ap.add_argument("--draft", default=None, help="draft checkpoint dir (default: the default pair)")
    ap.add_argument("--target", default=None, help="target checkpoint dir (default: the default pair)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    ap.add_argument("--tag", default="vllm_target", help="file name stem for the outputs")
    ap.add_argument("--quick", action="store_true", help="2 prompts x 12 tokens, batch 1 (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.max_tokens, args.batch_sizes, args.reps = 2, 12, "1", 3

    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from cascade.library import Cascade, generation_config_eos, load_tokenizer
    from cascade.models.vllm import VLLMTargetOptions
    from cascade.models.factory import resolve_pair
    from cascade.policies import split_policy_specs

    console = Console()

    def progress(items, desc):
        return tqdm(items, desc=desc, leave=False)

    draft_dir, target_dir = resolve_pair(args.draft or None, args.target or None)
    tokenizer = load_tokenizer(draft_dir)
    prompts_ids = [chat_ids(tokenizer, p) for p in PROMPTS[: args.prompts]]
    eos = {tokenizer.eos_token_id} | generation_config_eos(draft_dir) | generation_config_eos(target_dir)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    policies = split_policy_specs(args.policies)
    paths = [p.strip() for p in args.paths.split(",")]
    prefix = (prompts_ids[0] * 8)[:300]
    span = ([int(t) for t in tokenizer.encode(" return a + b\n    pass", add_special_tokens=False)] * 2)[:6]
    options = VLLMTargetOptions(memory_fraction=args.memory_fraction)
    B = max(batch_sizes)

    rows, outputs, overhead = [], {}, {}

    def run_policies(cascade, target_label):
        for batch in batch_sizes:
            for policy in policies:
                row, outs = run_cascade(cascade, prompts_ids, args.max_tokens, policy, batch, progress)
                row["target"] = target_label
                rows.append(row)
                outputs[(target_label, policy, batch)] = outs
                console.print(f"{target_label:>16} {policy:>18} b{batch}: {row['tok_per_s']:.3f} tok/s, "
                              f"target fraction {row['target_token_fraction']:.2f}")

    if "local" in paths:
        c = Cascade.from_pretrained(draft_dir, target_dir, max_rows=B, max_len=args.max_len, dtype="float32")
        run_policies(c, "in-process")
        overhead["verify_s_in_process_runner"] = verify_cost(c.target, prefix, span, args.reps)
        del c
        gc.collect()
    if "vllm" in paths:
        c = Cascade.from_pretrained(draft_dir, f"vllm:{target_dir}", max_rows=B, max_len=args.max_len, dtype="float32",
                                    vllm_options=options)
        run_policies(c, "vllm in-process")
        overhead["verify_s_vllm_in_process"] = verify_cost(c.target, prefix, span, args.reps)
        c.target.close()
        del c
        gc.collect()
    remote_servers = {  # path -> (label, cost key, how to start the server)
        "remote": ("vllm remote", "verify_s_vllm_remote",
                   lambda: start_vllm_server(target_dir, args.max_len, args.memory_fraction)),
        "remote-verify": ("vllm remote verify", "verify_s_vllm_remote_verify",
                          lambda: start_target_serve(f"vllm:{target_dir}", args.max_len, args.memory_fraction, B)),
        "runner-remote-verify": ("runner remote verify", "verify_s_runner_remote_verify",
                                 lambda: start_target_serve(str(target_dir), args.max_len, args.memory_fraction, B)),
    }
    for path, (label, key, start) in remote_servers.items():
        if path not in paths:
            continue
        url, proc = start()
        try:
            c = Cascade.from_pretrained(draft_dir, target_dir, max_rows=B, max_len=args.max_len, dtype="float32",
                                        target_url=url, vllm_options=options)
            run_policies(c, label)
            overhead[key] = verify_cost(c.target, prefix, span, args.reps)
            overhead[key.replace("verify_s", "cached_tokens_read")] = c.target.backend.cached_tokens
            if path == "remote":
                overhead["http_round_trip_s"] = http_round_trip(url, args.reps)
            del c
            gc.collect()
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    errors = {}
    if "vllm-alone" in paths:
        for d in (None, draft_dir):
            for batch in batch_sizes:
                fraction = args.memory_fraction if d is None else args.spec_memory_fraction
                try:
                    row, outs = run_vllm_alone(target_dir, d, prompts_ids, args.max_tokens, eos, batch, args.max_len,
                                               fraction, progress)
                except Exception as exc:  # noqa: BLE001 -- recorded in the machine JSON; the other rows stand
                    errors[f"vllm alone {'speculative' if d else 'target-only'} b{batch}"] = f"{type(exc).__name__}: {exc}"
                    console.print(f"[red]vLLM alone failed: {exc}[/red]")
                    continue
                rows.append(row)
                outputs[("vllm alone", row["policy"], batch)] = outs
                console.print(f"{row['policy']:>36} b{batch}: {row['tok_per_s']:.3f} tok/s")

    base = {b: next((r["tok_per_s"] for r in rows if r.get("target") == "in-process" and r["policy"] == "target-only"
                     and r["batch"] == b), None) for b in batch_sizes}
    for r in rows:
        r["x_in_process_target_only"] = r["tok_per_s"] / base[r["batch"]] if base.get(r["batch"]) else float("nan")
    reference = {b: outputs.get(("in-process", "target-only", b)) for b in batch_sizes}
    equal = {}
    for (t, p, b), outs in outputs.items():
        lossless_kind = p in ("speculative", "target-only", "vllm target-only") or p.startswith("vllm speculative")
        if lossless_kind and reference.get(b) is not None and (t, p) != ("in-process", "target-only"):
            equal[f"{t} {p} b{b} == in-process target-only"] = outs == reference[b]
    if "verify_s_vllm_remote" in overhead and "verify_s_vllm_in_process" in overhead:
        overhead["remote_minus_in_process_per_escalation_s"] = overhead["verify_s_vllm_remote"] - overhead["verify_s_vllm_in_process"]
    ratios = {f"{k.removeprefix('verify_s_')}_x_vllm_in_process": v / overhead["verify_s_vllm_in_process"]
              for k, v in overhead.items() if k.startswith("verify_s_") and "verify_s_vllm_in_process" in overhead}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {**machine_info(), "dtype": "float32", "prompts": args.prompts, "max_tokens": args.max_tokens,
            "escalation_cost": {"prefix_tokens": len(prefix), "span_tokens": len(span), "reps": args.reps, **overhead},
            "escalation_cost_x_vllm_in_process": ratios,
            "greedy_equal": equal, "errors": errors, "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")}
    fields = ["system", "target", "policy", "batch", "tokens", "wall_s", "tok_per_s", "x_in_process_target_only",
              "target_token_fraction", "mean_acceptance_length", "relative_cost"]
    with open(out / f"{args.tag}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / f"{args.tag}_machine.json").write_text(json.dumps(info, indent=2) + "\n")
    labelled = [{**r, "policy": f"{r['target']}: {r['policy']}"} for r in rows]
    plot(labelled, out / f"{args.tag}.png",
         f"{info['cpu']} · fp32 · {args.prompts} prompts × {args.max_tokens} tokens, greedy · target in-process vs in vLLM")

    table = Table(title=f"target in vLLM vs in-process ({info['cpu']}, fp32)")
    for col in ("target", "policy", "batch", "tok/s", "× in-process target-only", "target frac"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["target"], r["policy"], str(r["batch"]), f"{r['tok_per_s']:.3f}",
                      f"{r['x_in_process_target_only']:.2f}", f"{r['target_token_fraction']:.2f}")
    console.print(table)
    console.print({k: round(v * 1000, 1) for k, v in overhead.items() if k.endswith("_s")}, "(ms)")
    console.print({k: round(v, 2) for k, v in ratios.items()}, "(x in-process vLLM)")
    console.print(equal)
    console.print(f"wrote {out / (args.tag + '.csv')}, {args.tag}.png, {args.tag}_machine.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
