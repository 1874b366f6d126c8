"""Faults under load, bounded, on 127.0.0.1: two ``cascade target-serve`` replicas (subprocesses on the tiny
target), the cascade server in-process over both (``--target-url`` twice), 16 concurrent streamed greedy
requests of mixed policies through the real ``openai`` client, one replica SIGKILLed mid-load and restarted
(``benchmarks/fault_soak.py``'s driver, which also runs the real pair as a benchmark).

Every request must finish with the text a fault-free run of the same deployment gives; with both replicas
killed and ``on_target_error="draft-only"``, every request finishes on the draft with the fault in its usage;
no request hangs past the timeouts; no cache row stays in use; the restarted replica serves again after
the cool-down."""

from __future__ import annotations

import pytest

from benchmark_scripts import import_benchmark
from cascade import Cascade
from cascade.config import EngineConfig
from cascade.models.llama import LlamaRunner
from cascade.models.scoring import FULL_ROWS
from cascade.models.vllm import RemotePolicy, RemoteVLLM, VLLMRunner
from test_server import start_server
from tiny_tokenizer import CharTokenizer

soak = import_benchmark("fault_soak")
PROMPTS = ["add two numbers", "what is 7 times 8?", "write a haiku", "list three colours"]
MAX_TOKENS = 40
ROWS = 8


@pytest.fixture()
def replicas(tiny_pair_dirs, tmp_path):
    args = ["--target", str(tiny_pair_dirs[1]), "--device", "cpu", "--dtype", "float32", "--max-rows", "16",
            "--max-len", "256", "--max-logprobs", "-1"]
    reps = [soak.Replica(args, log_dir=tmp_path, name=n) for n in ("A", "B")]
    try:
        for r in reps:
            r.start(timeout_s=120)
        yield reps
    finally:
        for r in reps:
            r.stop()


def front_end(dirs, urls, on_target_error: str):
    draft = LlamaRunner.from_pretrained(dirs[0], max_rows=ROWS, max_len=256, dtype="float32")
    backend = RemoteVLLM(urls, policy=RemotePolicy(timeout_s=10, retries=2, backoff_s=0.05, cooldown_s=1.0))
    target = VLLMRunner(backend, vocab_size=draft.vocab_size, num_params=1, max_rows=ROWS, max_len=256,
                        logprobs=FULL_ROWS)
    config = EngineConfig(max_rows=ROWS, max_len=256, on_target_error=on_target_error)
    cascade = Cascade(draft, target, CharTokenizer(), eos_token_ids=[], config=config)
    return start_server(cascade, default_policy="speculative", default_max_tokens=MAX_TOKENS), backend


def test_one_replica_killed_mid_load_loses_nothing(tiny_pair_dirs, replicas):
    server, backend = front_end(tiny_pair_dirs, [r.url for r in replicas], "fail")
    try:
        requests = soak.mixed_requests(PROMPTS, 16)
        clean = soak.run_soak(server.url, requests, MAX_TOKENS, [], restart_after_s=None, second_wave=0)
        assert not any(o.failed for o in clean.outcomes)
        reference = {o.index: o.text for o in clean.outcomes}
        tries_before = backend.failed_tries
        result = soak.run_soak(server.url, requests, MAX_TOKENS, replicas[:1], restart_after_s=0.5,
                               cooldown_s=1.5, request_timeout_s=120)
        s = result.summary(reference)
        assert s["failed"] == 0 and s["degraded"] == 0, [o.error for o in result.outcomes]
        assert s["equal_to_fault_free"] == 16, [(o.policy, o.text, reference[o.index]) for o in result.outcomes
                                                if o.text != reference[o.index]]
        assert all(o.finish_reason == "length" for o in result.outcomes)
        assert s["rows_in_use_after"] == 0 and s["rows_free_after"] == ROWS
        assert backend.failures == 0  # every pass found a live replica
        assert s["restarted_replica_verify_calls_after"] > 0 and s["second_wave_failed"] == 0
        assert result.killed_at_s is not None and replicas[0].starts == 2
        assert backend.failed_tries > tries_before  # the kill struck while passes were going to A
        assert s["max_latency_s"] < 120  # nobody waited out a timeout chain
    finally:
        server.stop()


def test_both_replicas_killed_degrade_to_the_draft(tiny_pair_dirs, replicas):
    server, backend = front_end(tiny_pair_dirs, [r.url for r in replicas], "draft-only")
    try:
        requests = soak.mixed_requests(PROMPTS, 16)
        result = soak.run_soak(server.url, requests, MAX_TOKENS, replicas, restart_after_s=None,
                               request_timeout_s=120)
        s = result.summary()
        assert s["failed"] == 0, [o.error for o in result.outcomes]
        assert all(o.finish_reason == "length" and o.completion_tokens == MAX_TOKENS for o in result.outcomes)
        assert s["degraded"] >= 1 and backend.failures >= 1
        assert s["rows_in_use_after"] == 0 and s["rows_free_after"] == ROWS
    finally:
        server.stop()
