"""The draft's greedy block as one runner call (``decode_loop``; one CUDA graph on a GPU): the engine takes
it only where every step is a plain argmax, and then every token, log-prob, confidence figure and
escalation is what the step-by-step path gives."""

from __future__ import annotations

import pytest

from cascade import SamplingParams
from cascade.models.llama import LlamaRunner
from cascade.policies import parse_policy

from test_engine import PROMPTS, make_cascade

POLICIES = ["speculative", "chow(alpha=0.3)", "bild", "token-v3(alpha=0.1, trigger_below=0.5)", "handoff"]


def spy_loop(c):
    """Count the draft's decode_loop calls (the fused path)."""
    calls = []
    real = c.engine.draft.decode_loop

    def loop(*a, **kw):
        calls.append(a[2])
        return real(*a, **kw)

    c.engine.draft.decode_loop = loop
    return calls


def run(c, policy, params, *, fused: bool):
    if not fused:
        c.engine.drafter.greedy_loop_steps = lambda seqs, ks: 0
    try:
        return [(r.token_ids, [s.value for s in r.token_sources], [round(x, 4) for x in r.token_logprobs],
                 [[(t, round(lp, 4)) for t, lp in top] for top in r.top_logprobs], r.stats.escalations,
                 r.stats.target_tokens) for r in c.generate(PROMPTS, params, policy=policy)]
    finally:
        c.engine.drafter.__dict__.pop("greedy_loop_steps", None)


@pytest.mark.parametrize("policy", POLICIES)
def test_fused_greedy_block_equals_the_step_by_step_path(tiny_pair_dirs, policy):
    c = make_cascade(tiny_pair_dirs)
    calls = spy_loop(c)
    params = SamplingParams(max_tokens=24, logprobs=2)
    fused = run(c, policy, params, fused=True)
    assert calls and set(calls) <= set(range(1, 16))  # the fused path ran, k - 1 steps a call
    n = len(calls)
    assert run(c, policy, params, fused=False) == fused
    assert len(calls) == n  # (the step path does not call it)


def test_speculative_through_the_static_loop_equals_target_only(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs)
    draft_dir = tiny_pair_dirs[0]
    c.engine.draft = LlamaRunner.from_pretrained(draft_dir, max_rows=8, max_len=128, device="cpu", dtype="float32",
                                                 cuda_graphs="uncaptured", graph_loops=(4,))
    calls = spy_loop(c)
    want = [r.token_ids for r in c.generate(PROMPTS, SamplingParams(max_tokens=30), policy="target-only")]
    assert [r.token_ids for r in c.generate(PROMPTS, SamplingParams(max_tokens=30), policy="speculative")] == want
    assert 4 in calls


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=0.8, seed=1),  # sampled: a draw per step
    SamplingParams(max_tokens=12, logit_bias=((3, 5.0),)),    # logit processing at every step
], ids=["sampled", "logit_bias"])
def test_steps_that_are_not_a_plain_argmax_keep_the_step_path(tiny_pair_dirs, params):
    c = make_cascade(tiny_pair_dirs)
    calls = spy_loop(c)
    c.generate(PROMPTS[:2], params, policy="speculative")
    assert calls == []


def test_inside_min_tokens_the_step_path_runs_and_after_it_the_loop(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs, eos=(2,))
    seen = []
    real = c.engine.drafter.greedy_loop_steps
    c.engine.drafter.greedy_loop_steps = lambda seqs, ks: seen.append((seqs[0].num_emitted, real(seqs, ks))) or seen[-1][1]
    c.generate(PROMPTS[:1], SamplingParams(max_tokens=40, min_tokens=6), policy="speculative")
    inside = [steps for emitted, steps in seen if emitted + 1 < 6]
    after = [steps for emitted, steps in seen if emitted + 1 >= 6]
    assert inside and all(steps == 0 for steps in inside)  # the EOS mask applies at some step of the block
    assert after and any(steps > 0 for steps in after)


def test_a_mixed_batch_keeps_the_step_path(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs)
    calls = spy_loop(c)
    greedy, sampled = SamplingParams(max_tokens=10), SamplingParams(max_tokens=10, temperature=1.0, seed=3)
    for i, (prompt, p) in enumerate(zip(PROMPTS[:2], (greedy, sampled))):
        c.engine.add_request(f"r{i}", prompt, p, parse_policy("speculative"))
    while c.engine.has_work():
        c.engine.step()
    assert calls == []
