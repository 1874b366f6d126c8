"""A round reads the device at most three times, at any batch size (issue: a GPU round must not be
host-bound). The runners' logits are marked as device tensors (``host_reads.DeviceTensor``): every read
of anything computed from them is counted, except inside ``cascade.host.fetch``, the engine's one read
point, whose calls are the round's syncs. Sampled and greedy requests, every trigger family, batches of
1 / 4 / 8, and stop strings (which need the text, so may cost the third read)."""

from __future__ import annotations

import pytest
import torch
from host_reads import CountingRunner, DeviceTensor, counted_fetch, reset

import cascade.engine as engine_module
from cascade.config import EngineConfig, SamplingParams
from cascade.engine import Engine
from cascade.models.llama import LlamaRunner
from cascade.policies import parse_policy
from cascade.router import FEATURES, train_router

REAL_FETCH = engine_module.fetch
POLICIES = ["speculative", "chow(alpha=0.3)", "chow-cut(alpha=0.3)", "bild", "token-v3(alpha=0.2)", "opt(alpha=0.2)",
            "handoff(trigger_below=0.5, window=8)", "learned(threshold=0.5)", "target-only", "draft-only"]


def counting_engine(dirs, detokenize=None):
    d, t = (CountingRunner(LlamaRunner.from_pretrained(p, max_rows=8, max_len=160, device="cpu", dtype="float32")) for p in dirs)
    g = torch.Generator().manual_seed(0)
    router = train_router(torch.rand(64, len(FEATURES), generator=g), (torch.rand(64, generator=g) > 0.5).long(), steps=5)
    return Engine(d, t, config=EngineConfig(max_rows=8, max_len=160), detokenize=detokenize, router=router)


def reads_per_round(eng, monkeypatch, batch, policy, stop=(), logprobs=0):
    calls: list[int] = []
    monkeypatch.setattr(engine_module, "fetch", counted_fetch(REAL_FETCH, calls))
    for i in range(batch):
        eng.add_request(f"r{i}", [1 + i, 2, 3, 4, 5], SamplingParams(max_tokens=40, temperature=0.0 if i % 2 == 0 else 1.0,
                                                               seed=i, ignore_eos=True, stop=list(stop),
                                                               logprobs=logprobs if i % 3 == 0 else 0), parse_policy(policy))
    eng.step()  # admission + prefill round
    per_round = []
    while eng.has_work():
        reset()
        calls.clear()
        eng.step()
        per_round.append((len(calls), DeviceTensor.reads, list(DeviceTensor.where)))
    return per_round


@pytest.mark.parametrize("policy", POLICIES)
def test_a_round_reads_the_device_at_most_three_times_at_any_batch(tiny_pair_dirs, monkeypatch, policy):
    counts = {}
    for batch in (1, 4, 8):
        rounds = reads_per_round(counting_engine(tiny_pair_dirs), monkeypatch, batch, policy)
        assert rounds
        for syncs, strays, where in rounds:
            assert strays == 0, f"{policy} batch {batch}: host reads outside fetch: {where}"
            assert syncs <= 3, f"{policy} batch {batch}: {syncs} syncs in a round"
        counts[batch] = max(syncs for syncs, _, _ in rounds)
    assert counts[1] == counts[4] == counts[8], counts  # independent of the batch size


def test_stop_strings_cost_at_most_the_third_read(tiny_pair_dirs, monkeypatch):
    eng = counting_engine(tiny_pair_dirs, detokenize=lambda ids: "".join(chr(65 + t % 26) for t in ids))
    rounds = reads_per_round(eng, monkeypatch, 8, "speculative", stop=("A", "QQ"))
    assert all(strays == 0 and syncs <= 3 for syncs, strays, _ in rounds), rounds
    assert eng.stats.host_syncs >= len(rounds)


@pytest.mark.parametrize("policy", ["speculative", "chow(alpha=0.3)", "bild", "target-only", "draft-only"])
def test_top_logprobs_ride_on_the_same_reads(tiny_pair_dirs, monkeypatch, policy):
    """Requests asking for top log-probs (every third one here) add no read: the top-k travels with the rest."""
    plain = max(n for n, _, _ in reads_per_round(counting_engine(tiny_pair_dirs), monkeypatch, 4, policy))
    for syncs, strays, where in reads_per_round(counting_engine(tiny_pair_dirs), monkeypatch, 4, policy, logprobs=5):
        assert strays == 0, f"{policy}: host reads outside fetch: {where}"
        assert syncs <= plain, f"{policy}: {syncs} syncs with top log-probs, {plain} without"
