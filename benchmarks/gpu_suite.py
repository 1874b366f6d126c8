"""The GPU suite: everything the project wants to know from a GPU, measured in one command, into one JSON.

Runs from a bare checkout on a machine with only its own torch, triton and numpy: no weights (every model
is random weights of the real shapes, made on the GPU), no network, nothing to install::

    PYTHONPATH=. python benchmarks/gpu_suite.py                # on a GPU, < 8 minutes
    PYTHONPATH=. python benchmarks/gpu_suite.py --smoke        # every section on the CPU, tiny shapes, seconds

Sections, in order (the JSON is rewritten after each, so a run cut short keeps what it measured; a section
that raises records its error and the run goes on):

- ``environment``: GPU, torch / triton / CUDA versions, peak HBM bandwidth used for the bounds;
- ``kernels``: the confidence and verify kernels at 8 / 64 / 256 rows x 151,936, bf16 and fp32 (median
  time, achieved GB/s, % of the HBM bound, checked against the torch reference), the cache attention
  kernel at decode shapes, and the learned router scoring a round's drafted positions (rows x 5);
- ``runner_steps``: a decode step and a 6-token verify span of the 0.5B / 1.5B / 7B shapes, eager vs
  CUDA graph, batch 1 and 8, contexts 512 and 2048, against the weight-read time (parameter bytes / HBM
  bandwidth);
- ``graph_parity``: graph vs eager logits of the same weights at a padded bucket (3 rows of ragged spans in
  the (4 rows, 8 tokens) graph): max |diff| and argmax agreement;
- ``engine_rounds``: whole cascade rounds of the 0.5B draft -> 1.5B target (and 0.5B -> 7B, whose
  embeddings are padded to different sizes) on random weights at batch 1 / 8 / 32: ms per round, per phase
  (draft, target, kernels, the rest) with a synchronising wrapper, and the host syncs per round counted by
  ``torch.cuda.set_sync_debug_mode`` without it;
- ``sampled_request``: temperature 0.7 requests (per-request generators on the GPU): finished, seeded
  output equal run to run and alone vs in a batch.

``--smoke`` runs the same code on the CPU with tiny shapes, the Triton kernels through the interpreter and
the static steps uncaptured (``cuda_graphs="uncaptured"``); CI runs it (``tests/test_gpu_suite.py``), so a
first GPU contact does not fail on a typo. The JSON layout is documented in the README ("GPU suite").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):  # run from the checkout without installing
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SMOKE_SHAPES = {  # tiny stand-ins of the real shapes (GQA groups and padded vocabularies kept)
    "0.5b": dict(hidden_size=112, num_layers=2, num_heads=7, num_kv_heads=1, intermediate_size=128, vocab_size=1000),
    "1.5b": dict(hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=160, vocab_size=1000),
    "7b": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192, vocab_size=1024),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter, uncaptured graphs")
    ap.add_argument("--out", type=Path, default=None,
                    help="the JSON file (default: benchmarks/results/gpu_suite_<device>.json)")
    ap.add_argument("--sections", nargs="+", default=None, help="run only these sections (default: all)")
    ap.add_argument("--peak-gbps", type=float, default=None, help="peak HBM bandwidth, GB/s (default: from the GPU's name)")
    ap.add_argument("--rounds", type=int, default=None, help="engine rounds timed per point (default 20; smoke 3)")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    return args


class Suite:
    """Runs the sections and keeps the JSON on disk up to date."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args, self.torch = args, torch
        self.smoke = args.smoke
        self.device = torch.device("cpu" if self.smoke or not torch.cuda.is_available() else "cuda")
        if not self.smoke and self.device.type != "cuda":
            raise SystemExit("no CUDA device: run with --smoke on a CPU")
        from kernel_bench import machine_info, peak_gbps, slug

        self.machine = machine_info(torch, self.device)
        self.peak = peak_gbps(self.machine["device"], args.peak_gbps)
        name = "smoke" if self.smoke else slug(self.machine["device"])
        self.out = args.out or ROOT / "benchmarks" / "results" / f"gpu_suite_{name}.json"
        self.result: dict = {"suite": "gpu_suite", "smoke": self.smoke, "sections": {}}
        self.graphs = "uncaptured" if self.smoke else True
        self.dtype = torch.float32 if self.smoke else torch.bfloat16

    # -------------------------------------------------------------- plumbing
    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        tmp.replace(self.out)

    def run(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        print(f"[gpu_suite] {name} ...", flush=True)
        try:
            body = fn()
            status = "ok"
        except Exception as exc:  # noqa: BLE001 -- one section failing must not lose the others
            body, status = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, "error"
            print(body["traceback"], file=sys.stderr, flush=True)
        self.result["sections"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 2), **body}
        self.save()
        self.free()
        print(f"[gpu_suite] {name}: {status} in {time.perf_counter() - t0:.1f} s", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def timed_ms(self, fn, reps: int) -> float:
        """Median milliseconds of ``fn`` (synchronised), after one warm-up call."""
        import statistics

        fn()
        times = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def shapes(self) -> dict:
        from runner_cost import SHAPES

        return SMOKE_SHAPES if self.smoke else SHAPES

    def runner(self, shape: str, *, max_rows: int, max_len: int, graphs, seed: int = 0):
        from runner_cost import shape_config

        from cascade.models.factory import RunnerOptions, random_runner

        config = shape_config(shape, self.shapes())
        options = RunnerOptions(max_rows=max_rows, max_len=max_len, device=self.device, dtype=self.dtype)
        return random_runner(config, options, seed=seed, cuda_graphs=graphs)

    def weight_read_ms(self, runner) -> float | None:
        """Time to read every weight once at the peak HBM bandwidth: the bound of a batch-1 decode step."""
        if self.peak is None or self.device.type != "cuda":
            return None
        nbytes = runner.num_params * runner.dtype.itemsize
        return nbytes / (self.peak * 1e9) * 1e3

    # -------------------------------------------------------------- sections
    def environment(self) -> dict:
        torch = self.torch
        env = dict(self.machine, peak_gbps=self.peak, device_type=self.device.type,
                   triton_interpret=os.environ.get("TRITON_INTERPRET", ""))
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            env.update(sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}")
        return env

    def kernels(self) -> dict:
        from types import SimpleNamespace

        import kernel_bench as kb

        torch = self.torch
        rows_list, vocab = ([2, 4], 4096) if self.smoke else ([8, 64, 256], 151936)
        timing = SimpleNamespace(warmup_ms=25, rep_ms=100, repeats=2 if self.smoke else 20)
        out = []
        for kernel in ("confidence", "verify"):
            for dtype_name in ("bf16", "fp32"):
                dtype = getattr(torch, kb.DTYPES[dtype_name])
                for rows in rows_list:
                    inputs = kb.make_inputs(torch, kernel, rows, vocab, dtype, self.device, seed=0)
                    fn = kb.build_fn(torch, kernel, "triton", inputs, self.device)
                    ok = kb.check(torch, kernel, fn(), inputs, self.device)
                    med, lo, hi = kb.time_ms(torch, fn, self.device, timing)
                    nbytes = rows * vocab * dtype.itemsize * (1 if kernel == "confidence" else 2)
                    bound_ms = nbytes / (self.peak * 1e9) * 1e3 if self.peak else None
                    out.append(dict(kernel=kernel, dtype=dtype_name, rows=rows, vocab=vocab, ms=med, ms_p20=lo,
                                    ms_p80=hi, us=med * 1e3, gbps=nbytes / (med * 1e-3) / 1e9, bound_ms=bound_ms,
                                    pct_of_bound=(100 * bound_ms / med) if bound_ms else None, matches_reference=ok))
        for name, part in (("cache_attention", self._attention_kernel), ("router", lambda t: self._router(rows_list, t))):
            try:  # a failing part leaves a row saying so, and the rows measured before it stand
                out += part(timing)
            except Exception as exc:  # noqa: BLE001 -- recorded in the JSON, the suite goes on
                out.append(dict(kernel=name, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()))
        return {"rows": out}

    def _router(self, rows_list, timing) -> list[dict]:
        """The learned router scoring every drafted position of a round (rows x k = 5), beside the
        confidence kernel's figures above: its cost per drafted token (a router of the shipped size, random)."""
        import kernel_bench as kb

        from router_cost import random_router

        torch = self.torch
        router = random_router(self.device)
        out = []
        for rows in rows_list:
            n = rows * 5
            stats = [torch.rand(n, device=self.device) for _ in range(3)] + [-torch.rand(n, device=self.device)]
            med = kb.time_ms(torch, lambda: router.score(*stats), self.device, timing)[0]
            out.append(dict(kernel="router", dtype="fp32", rows=rows, positions=n, hidden=int(router.w1.shape[1]),
                            ms=med, us=med * 1e3, us_per_token=med * 1e3 / n))
        return out

    def _attention_kernel(self, timing) -> list[dict]:
        import kernel_bench as kb

        from cascade.kernels.attention import cache_attention_reference, cache_attention_triton, num_splits

        torch = self.torch
        # the 0.5B draft's heads (14 query, 2 KV, 64 wide) and the 1.5B / 7B's width (128), at two key tiles:
        # the kernel holds a [query heads per KV head, tile, head width] fp32 product, which at 64 x 128
        # may spill registers, so the first GPU run says which tile the launcher should default to
        heads = [("7q1kv64", 7, 1, 64)] if self.smoke else [("14q2kv64", 14, 2, 64), ("12q2kv128", 12, 2, 128)]
        tiles = (16, 64)
        out = []
        for label, H, Hkv, D in heads:
            for B, ctx in ((1, 64), (4, 200)) if self.smoke else ((1, 512), (1, 2048), (8, 2048), (32, 2048)):
                L = ctx + 8
                g = torch.Generator(device=self.device).manual_seed(0)
                kc = torch.randn(B, Hkv, L, D, device=self.device, dtype=self.dtype, generator=g)
                vc = torch.randn(B, Hkv, L, D, device=self.device, dtype=self.dtype, generator=g)
                q = torch.randn(B, 1, H, D, device=self.device, dtype=self.dtype, generator=g)
                rows = torch.arange(B, device=self.device)
                start = torch.full((B,), ctx - 1, device=self.device, dtype=torch.long)
                one = torch.ones(B, device=self.device, dtype=torch.long)
                want = cache_attention_reference(q, kc, vc, rows, start, one).float()
                for block_l in tiles:
                    auto = num_splits(B * Hkv, L, block_l, q.device)
                    for splits in sorted({1, auto, 2 if self.smoke else auto}):  # single pass vs split-K (smoke: 2)
                        fn = lambda: cache_attention_triton(q, kc, vc, rows, start, one, splits=splits,  # noqa: E731
                                                            block_l=block_l)
                        err = (fn().float() - want).abs().max().item()
                        med = kb.time_ms(torch, fn, self.device, timing)[0]
                        nbytes = 2 * B * Hkv * ctx * D * kc.element_size()
                        out.append(dict(kernel="cache_attention", dtype=str(self.dtype).removeprefix("torch."),
                                        heads=label, rows=B, context=ctx, block_l=block_l, splits=splits,
                                        auto_splits=auto, ms=med, us=med * 1e3, gbps=nbytes / (med * 1e-3) / 1e9,
                                        max_abs_err=err,
                                        pct_of_bound=100 * nbytes / (self.peak * 1e9) * 1e3 / med if self.peak else None))
        return out

    def runner_steps(self) -> dict:
        torch = self.torch
        out = []
        contexts = (24, 48) if self.smoke else (512, 2048)
        reps = 2 if self.smoke else 20
        for shape in ("0.5b", "1.5b", "7b"):
            for mode, graphs in (("eager", False), ("graph", self.graphs)):
                r = self.runner(shape, max_rows=8, max_len=max(contexts) + 16, graphs=graphs)
                bound = self.weight_read_ms(r)
                for batch in (1, 8):
                    for ctx in contexts:
                        rows = list(range(batch))
                        _fill(r, rows, ctx)
                        ids = torch.randint(0, 100, (batch,), device=self.device)
                        rows_t = torch.tensor(rows)
                        spans = torch.randint(0, 100, (batch, 6)).tolist()

                        def step():
                            r.decode(rows_t, ids)
                            r.truncate(rows, [ctx] * batch)

                        def verify():
                            r.forward_span(rows, spans)
                            r.truncate(rows, [ctx] * batch)

                        def block():  # the draft's greedy block at k = 5: 4 steps fed their argmax
                            r.decode_loop(rows_t, ids, 4)
                            r.truncate(rows, [ctx] * batch)

                        step_ms, span_ms = self.timed_ms(step, reps), self.timed_ms(verify, reps)
                        loop_ms = self.timed_ms(block, reps)
                        out.append(dict(shape=shape, mode=mode, batch=batch, context=ctx, step_ms=step_ms,
                                        verify6_ms=span_ms, greedy_loop4_ms=loop_ms,
                                        loop_over_4_steps=loop_ms / (4 * step_ms) if step_ms else None,
                                        weight_read_ms=bound,
                                        step_over_bound=step_ms / bound if bound else None,
                                        params=r.num_params, dtype=str(r.dtype).removeprefix("torch.")))
                del r
                self.free()
        return {"rows": out}

    def graph_parity(self) -> dict:
        torch = self.torch
        eager = self.runner("0.5b", max_rows=4, max_len=128, graphs=False, seed=3)
        graph = self.runner("0.5b", max_rows=4, max_len=128, graphs=self.graphs, seed=3)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (17, 40, 9)]
        rows = [0, 1, 3]
        for r in (eager, graph):
            r.forward_span(rows, prompts, num_logits=[0, 0, 0])
        spans = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (6, 2, 5)]  # bucket (4 rows, 8 tokens)
        a, b = eager.forward_span(rows, spans), graph.forward_span(rows, spans)
        d = eager.decode(torch.tensor(rows), torch.tensor([1, 2, 3], device=self.device))
        e = graph.decode(torch.tensor(rows), torch.tensor([1, 2, 3], device=self.device))
        return dict(shape="0.5b", batch=3, bucket=[4, 8], span_lengths=[6, 2, 5],
                    span_max_abs_diff=(a - b).abs().max().item(), span_argmax_agree=float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                    decode_max_abs_diff=(d - e).abs().max().item(), decode_argmax_agree=float((d.argmax(-1) == e.argmax(-1)).float().mean()),
                    logit_scale=a.abs().max().item(), graph_decode=graph.describe()["decode"])

    def _engine(self, draft_shape: str, target_shape: str, max_rows: int, synced: bool):
        from runner_cost import TOKENIZER_VOCAB

        from cascade.config import EngineConfig
        from cascade.engine import Engine

        d = self.runner(draft_shape, max_rows=max_rows, max_len=256, graphs=self.graphs, seed=1)
        t = self.runner(target_shape, max_rows=max_rows, max_len=256, graphs=self.graphs, seed=2)
        vocab = min(d.vocab_size, t.vocab_size, 1000 if self.smoke else TOKENIZER_VOCAB)
        if synced:
            d, t = _Synced(d, self.sync), _Synced(t, self.sync)
        return Engine(d, t, config=EngineConfig(max_rows=max_rows, max_len=256, max_draft_block=8), vocab_size=vocab)

    def engine_rounds(self) -> dict:
        from cascade.config import SamplingParams
        from cascade.policies import parse_policy

        torch = self.torch
        rounds = self.args.rounds or (3 if self.smoke else 20)
        out = []
        pairs = [("0.5b", "1.5b"), ("0.5b", "7b")]
        batches = (1, 4) if self.smoke else (1, 8, 32)
        for draft, target in pairs:
            for synced in (True, False):
                eng = self._engine(draft, target, max(batches), synced)
                for policy in ("speculative", "target-only", "chow(alpha=0.5)"):
                    for batch in batches:
                        eng.stats = type(eng.stats)()
                        g = torch.Generator().manual_seed(batch)
                        for i in range(batch):
                            prompt = torch.randint(0, 100, (64 if not self.smoke else 12,), generator=g).tolist()
                            eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=150, ignore_eos=True),
                                            parse_policy(policy))
                        eng.step()  # the prefill round, not timed
                        base = _stats(eng)
                        fetches0 = eng.stats.host_syncs
                        syncs = 0
                        t0 = time.perf_counter()
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            if not synced and self.device.type == "cuda":
                                torch.cuda.set_sync_debug_mode("warn")
                            try:
                                for _ in range(rounds):
                                    eng.step()
                            finally:
                                if self.device.type == "cuda":
                                    torch.cuda.set_sync_debug_mode("default")
                            self.sync()
                            syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
                        wall = (time.perf_counter() - t0) * 1e3 / rounds
                        delta = {k: (v - base[k]) * 1e3 / rounds for k, v in _stats(eng).items()}
                        emitted = sum(s.num_emitted for s in eng.scheduler.running.values())
                        for i in range(batch):
                            eng.abort(f"r{i}")
                        row = dict(pair=f"{draft}->{target}", policy=policy, batch=batch, rounds=rounds,
                                   vocab=eng.vocab_size, ms_per_round=wall, tokens_emitted=emitted,
                                   engine_reads_per_round=(eng.stats.host_syncs - fetches0) / rounds)
                        if synced:
                            row.update(phase_ms=dict(draft=delta["draft"], target=delta["target"], kernels=delta["kernels"],
                                                     other=wall - delta["draft"] - delta["target"] - delta["kernels"]))
                        else:
                            row.update(host_syncs_per_round=syncs / rounds if self.device.type == "cuda" else None)
                        out.append(row)
                del eng
                self.free()
        return {"rows": out}

    def sampled_request(self) -> dict:
        from cascade.config import SamplingParams
        from cascade.policies import make_policy

        eng = self._engine("0.5b", "1.5b", 4, synced=False)
        params = [SamplingParams(max_tokens=24, temperature=0.7, seed=s, ignore_eos=True) for s in range(3)]
        prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]

        def run(idx):
            outs: dict[str, list[int]] = {}
            for i in idx:
                eng.add_request(f"s{i}", prompts[i], params[i], make_policy("speculative"))
            while eng.has_work():
                for o in eng.step():
                    outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            return outs

        batch, again = run([0, 1, 2]), run([0, 1, 2])
        alone = {**run([0]), **run([1]), **run([2])}
        return dict(finished=all(len(v) == 24 for v in batch.values()), tokens=batch,
                    seeded_equal_run_to_run=batch == again, alone_equals_batch=alone == batch,
                    max_token=max(max(v) for v in batch.values()), vocab=eng.vocab_size)

    SECTIONS = ("environment", "kernels", "runner_steps", "graph_parity", "engine_rounds", "sampled_request")


class _Synced:
    """A runner whose calls wait for the device, so the engine's phase timers measure device time."""

    def __init__(self, runner, sync):
        self._r, self._sync = runner, sync

    def __getattr__(self, name):
        return getattr(self._r, name)

    def forward_span(self, *a, **kw):
        out = self._r.forward_span(*a, **kw)
        self._sync()
        return out

    def decode(self, *a, **kw):
        out = self._r.decode(*a, **kw)
        self._sync()
        return out


def _fill(runner, rows: list[int], context: int) -> None:
    from runner_cost import fill_context

    fill_context(runner, rows, context)


def _stats(eng) -> dict:
    s = eng.stats
    return dict(draft=s.time_draft_s, target=s.time_target_s, kernels=s.time_kernels_s)


def main(argv=None) -> int:
    args = parse_args(argv)
    suite = Suite(args)
    t0 = time.perf_counter()
    for name in args.sections or Suite.SECTIONS:
        if name not in Suite.SECTIONS:
            raise SystemExit(f"--sections: unknown section {name!r} (known: {', '.join(Suite.SECTIONS)})")
        suite.run(name, getattr(suite, name))
    suite.result["total_seconds"] = round(time.perf_counter() - t0, 1)
    suite.save()
    bad = [n for n, s in suite.result["sections"].items() if s["status"] != "ok"]
    print(f"[gpu_suite] wrote {suite.out} in {suite.result['total_seconds']} s; failed sections: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
