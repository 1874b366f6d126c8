"""target-only and speculative greedy tok/s at batch 1 on the real pair, with the cascade on PYTHONPATH."""
import sys, time
sys.path.insert(0, "/work/main/benchmarks")
from prompts import PROMPTS
from cascade import Cascade, SamplingParams
c = Cascade.from_pretrained(max_rows=1, max_len=1024, dtype="float32")
ids = [c.encode([{"role": "user", "content": p}]) for p in PROMPTS[:3]]
sp = SamplingParams(max_tokens=48)
c.generate(ids[0], SamplingParams(max_tokens=4), policy="target-only")  # warm-up
out = {}
for policy in ("target-only", "speculative", "target-only", "speculative"):
    t0, n = time.perf_counter(), 0
    for i in ids:
        n += len(c.generate(i, sp, policy=policy)[0].token_ids)
    out.setdefault(policy, []).append(n / (time.perf_counter() - t0))
print(sys.argv[1], {k: [round(v, 3) for v in vs] for k, vs in out.items()}, flush=True)
