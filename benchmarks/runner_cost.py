"""Cost of a 1-token decode step vs a k-token forward_span of ``LlamaRunner`` on random weights of the
default pair's real shapes (Qwen2.5-Coder 0.5B / 1.5B), at a context of ~300 positions.

Speculative verification pays off only if a k-token forward costs little more than a 1-token step, so
the figure that matters is ``ratio = span_ms / step_ms``. Every row of the CSV carries the machine it ran
on. On CPU it compares linear implementations (``torch`` = F.linear / MKL, ``onednn`` = prepacked
oneDNN) and optionally transformers eager (``--hf``); on CUDA it compares eager vs CUDA-graph decode.

    PYTHONPATH=. python benchmarks/runner_cost.py                       # this machine, defaults
    PYTHONPATH=. python benchmarks/runner_cost.py --models 0.5b --dtypes float32 --impls torch,onednn --hf

With ``--gguf`` it times the llama.cpp runner instead, on the default pair's GGUFs as they ship (``cascade
fetch-models --backend llama.cpp``; real weights, ``dtype`` q4_k_m, ``linear_impl`` llama.cpp), after a real
prefill of the context; its CSV is a cost file for ``cascade bench --cost-file`` (the modelled-time axis of a
deployment whose models run on llama.cpp).

    PYTHONPATH=. python benchmarks/runner_cost.py --gguf --batches 1 --ks 2,3,4,5,6,8 --machine llamacpp-cpu-avx2-2c

Writes ``benchmarks/results/runner_cost_<machine>.csv`` (``--out`` to override). All variants of one
model and dtype are built at once and timed in interleaved rounds, so that load drifting on a shared
machine hits them alike. ``runner_cost_cpu-avx2-2c.csv`` joins three runs (``--models 0.5b --dtypes
float32 --impls torch,onednn --hf --prefill --reps 7``; ``--models 1.5b`` the same with ``--impls onednn``,
as three 1.5B fp32 models do not fit in 24 GiB; ``--dtypes bfloat16 --reps 3``).
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from cascade.models.factory import RunnerOptions, random_runner
from cascade.models.llama import LlamaRunner
from cascade.models.loading import DecoderConfig
from machine import machine_info

SHAPES = {
    "0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864),
    "1.5b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960),
    # Qwen2.5 7B: the same tokenizer, its embedding padded to 152,064 rows
    "7b": dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944, vocab_size=152064),
}
VOCAB = 151936  # the 0.5B / 1.5B embedding rows
TOKENIZER_VOCAB = 151665  # the Qwen2.5 tokenizer's ids (len(tokenizer))


def shape_config(name: str, shapes: Mapping[str, dict] = SHAPES) -> DecoderConfig:
    s = dict(shapes[name])
    return DecoderConfig(
        architecture="Qwen2ForCausalLM", vocab_size=s.pop("vocab_size", VOCAB), head_dim=s["hidden_size"] // s["num_heads"],
        rope_theta=1e6, qkv_bias=True, tie_word_embeddings=False, **s,
    )


def default_machine_name(info: dict, device: str) -> str:
    if device.startswith("cuda"):
        name = info["gpu"].lower().replace("nvidia", "")
    else:
        name = f"cpu-{info['cpu_capability'].lower()}-{info['cpu_count']}c"
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def fill_context(runner, rows: list[int], context: int) -> None:
    """Make each row hold ``context`` cached positions. ``LlamaRunner``: random K/V without paying for a prefill
    (benchmark-only: touches the runner's private lengths); any other runner: a real prefill of random tokens."""
    if not isinstance(runner, LlamaRunner):
        runner.free(rows)
        runner.forward_span(rows, torch.randint(0, runner.vocab_size, (len(rows), context)).tolist(),
                            num_logits=[0] * len(rows))
        return
    runner.cache.normal_(0.0, 1.0)
    for r in rows:
        runner._len[r] = context
    runner._sync_len_dev(rows)


def runner_ops(runner: LlamaRunner, batch: int, context: int, ks: list[int]) -> dict:
    """(op, tokens_per_row) -> callable doing that forward and rolling back to ``context``."""
    rows = list(range(batch))
    fill_context(runner, rows, context)
    rows_t = torch.tensor(rows, dtype=torch.long)
    ids = torch.randint(0, runner.vocab_size, (batch,), device=runner.device)
    base = [context] * batch

    def step():
        runner.decode(rows_t, ids)
        runner.truncate(rows, base)

    ops = {("step", 1): step}
    for k in ks:
        spans = torch.randint(0, runner.vocab_size, (batch, k)).tolist()

        def span(spans=spans):
            runner.forward_span(rows, spans)  # all k logits per row, as verification needs
            runner.truncate(rows, base)

        ops[("span", k)] = span
    return ops


def hf_model(name: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    s = SHAPES[name]
    cfg = Qwen2Config(hidden_size=s["hidden_size"], num_hidden_layers=s["num_layers"],
                      num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                      intermediate_size=s["intermediate_size"], vocab_size=VOCAB, tie_word_embeddings=False,
                      rope_theta=1e6, max_position_embeddings=4096)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def hf_ops(model, context: int, ks: list[int]) -> dict:
    """transformers eager at batch 1 (the "before" figure of DESIGN's measured facts), same ops."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, context)), past_key_values=cache, use_cache=True)

    def run(k):
        with torch.no_grad():
            model(torch.randint(0, VOCAB, (1, k)), past_key_values=cache, use_cache=True)
        cache.crop(context)

    ops = {("step", 1): lambda: run(1)}
    for k in ks:
        ops[("span", k)] = lambda k=k: run(k)
    return ops


def interleaved(providers: dict, device: torch.device, reps: int, warmup: int = 1) -> dict:
    """Time every (provider, op) once per round, ``warmup + reps`` rounds, so that load drifting on a
    shared machine hits all of them alike. Returns provider -> op -> [ms]."""
    out = {name: {op: [] for op in ops} for name, ops in providers.items()}
    for rnd in range(warmup + reps):
        for name, ops in providers.items():
            for op, fn in ops.items():
                ms = _timed(fn, device)
                if rnd >= warmup:
                    out[name][op].append(ms)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="0.5b,1.5b")
    ap.add_argument("--dtypes", default=None, help="default: float32,bfloat16 on CPU; bfloat16 on CUDA")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--ks", default="2,4,5,8")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 5 CPU, 50 CUDA)")
    ap.add_argument("--impls", default=None, help="CPU linear impls, default torch,onednn (onednn: fp32, or bf16 "
                    "where the CPU supports it)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--hf", action="store_true", help="also time transformers eager (CPU, batch 1)")
    ap.add_argument("--prefill", action="store_true", help="also time one prefill of --context tokens")
    ap.add_argument("--gguf", action="store_true",
                    help="time the llama.cpp runner on the default pair's GGUFs (needs the llamacpp extra and cascade "
                         "fetch-models --backend llama.cpp); --dtypes and --impls do not apply")
    ap.add_argument("--machine", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtypes = (a.dtypes or ("bfloat16" if cuda else "float32,bfloat16")).split(",")
    reps = a.reps or (50 if cuda else 5)
    ks = [int(k) for k in a.ks.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    info = machine_info()
    machine = a.machine or default_machine_name(info, a.device)
    out = Path(a.out or Path(__file__).parent / "results" / f"runner_cost_{machine}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"machine={machine} {info}", flush=True)
    bf16_dnn = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())

    rows_out: list[dict] = []

    def emit(model, dtype, variant, batch, res):
        impl, decode = variant
        step = statistics.median(res[("step", 1)]) if ("step", 1) in res else None
        for (op, k), times in res.items():
            med = statistics.median(times)
            row = {"machine": machine, "model": model, "device": str(device), "dtype": dtype, "linear_impl": impl,
                   "decode": decode, "batch": batch, "context": a.context, "op": op, "tokens_per_row": k,
                   "ms_median": round(med, 3), "ms_min": round(min(times), 3),
                   "ratio_to_step": round(med / step, 3) if step else "", "reps": len(times),
                   **{f"m_{k2}": v for k2, v in info.items()}}
            rows_out.append(row)
            ratio = f"x{med / step:.2f}" if step else ""
            print(f"{model:5s} {dtype:9s} {impl:8s} {decode:10s} B={batch} {op:7s} k={k}: "
                  f"{med:9.2f} ms (min {min(times):.2f})  {ratio}", flush=True)
        with out.open("w", newline="") as f:  # rewritten each time: partial results survive a kill
            w = csv.DictWriter(f, fieldnames=list(rows_out[0]))
            w.writeheader()
            w.writerows(rows_out)

    if a.gguf:
        from cascade.models.factory import local_runner, resolve_member

        for index, model in enumerate(("0.5b", "1.5b")):
            if model not in a.models.split(","):
                continue
            runner = local_runner(resolve_member("llama.cpp:", index),
                                  RunnerOptions(max_rows=max(batches), max_len=a.context + max(ks) + 8,
                                                llamacpp={"threads": a.threads} if a.threads else {}))
            print(f"loaded {model} {runner.describe()}", flush=True)
            for batch in batches:
                res = interleaved({("llama.cpp", "eager"): runner_ops(runner, batch, a.context, ks)}, device, reps)
                for v, r in res.items():
                    emit(model, "q4_k_m", v, batch, r)
            runner.close()
        print(f"wrote {out}")
        return 0

    for model in a.models.split(","):
        cfg = shape_config(model)
        for dtype in dtypes:
            if cuda:
                variants = [("torch", "eager"), ("torch", "cuda_graph")]
            else:
                impls = (a.impls or "torch,onednn").split(",")
                variants = [(i, "eager") for i in impls
                            if i != "onednn" or dtype == "float32" or (dtype == "bfloat16" and bf16_dnn)]
            runners = {}
            for impl, decode in variants:  # all variants live at once: their timings are interleaved
                t0 = time.perf_counter()
                runners[(impl, decode)] = random_runner(
                    cfg, RunnerOptions(max_rows=max(batches), max_len=a.context + max(ks) + 8, device=device, dtype=dtype),
                    linear_impl=impl, cuda_graphs=decode == "cuda_graph")
                print(f"built {model} {dtype} {impl} {decode} in {time.perf_counter() - t0:.1f}s "
                      f"{runners[(impl, decode)].describe()}", flush=True)
            hf = hf_model(model, getattr(torch, dtype)) if a.hf and not cuda else None
            for batch in batches:
                providers = {v: runner_ops(r, batch, a.context, ks) for v, r in runners.items()}
                if hf is not None and batch == 1:
                    providers[("hf-eager", "eager")] = hf_ops(hf, a.context, ks)
                res = interleaved(providers, device, reps)
                for v, r in res.items():
                    emit(model, dtype, v, batch, r)
            if a.prefill:
                for v, r in runners.items():
                    r.free(list(range(r.max_rows)))
                    prompt = torch.randint(0, r.vocab_size, (a.context,)).tolist()
                    emit(model, dtype, v, 1,
                         {("prefill", a.context): [_timed(lambda r=r, p=prompt: r.prefill([0], [p]), device)]})
            del runners, hf
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
