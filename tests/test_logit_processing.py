"""The sampling fields beyond temperature / top-p / top-k: ``logit_bias``, ``min_p``, ``min_tokens``,
``stop_token_ids`` (``cascade.sampling.filter_logits``, ``cascade.config.SamplingParams``). Each is checked
against a torch reference, by forced argmax, and through the engine: lossless ``speculative`` stays equal to
``target-only`` under every field, and sampled output stays inside the processed distribution's support."""

from __future__ import annotations

import math

import pytest
import torch

from cascade import SamplingParams
from cascade.sampling import filter_logits

from test_engine import PROMPTS, make_cascade

POLICIES = ["target-only", "speculative", "chow(alpha=0.3)", "chow-cut(alpha=0.3)", "bild", "draft-only"]


# ---------------------------------------------------------------------- filter_logits against references
def test_logit_bias_is_added_before_everything_and_applies_to_greedy_rows():
    logits = torch.randn(3, 64)
    params = [SamplingParams(logit_bias={5: 2.5, 9: -100}), SamplingParams(), SamplingParams(temperature=0.7, logit_bias={1: 1.0})]
    out = filter_logits(logits, params)
    want = logits.clone()
    want[0, 5] += 2.5
    want[0, 9] -= 100
    want[2, 1] += 1.0
    assert torch.allclose(out, want)


def test_min_tokens_masks_the_end_ids_until_enough_tokens_are_out():
    logits = torch.randn(4, 64)
    p = SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=(7,))
    out = filter_logits(logits, [p] * 4, emitted=[0, 2, 3, 9], end_ids=[1])
    for row in (0, 1):
        assert math.isinf(out[row, 1]) and math.isinf(out[row, 7])
        assert torch.isfinite(out[row]).sum() == 62
    assert torch.equal(out[2:], logits[2:])
    # ignore_eos: the EOS does not end the request, so it is not masked; the request's stop ids are
    out = filter_logits(logits[:1], [SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=(7,), ignore_eos=True)],
                        emitted=[0], end_ids=[1])
    assert torch.isfinite(out[0, 1]) and math.isinf(out[0, 7])
    # without positions no row is inside its min_tokens
    assert torch.equal(filter_logits(logits[:1], [p], end_ids=[1]), logits[:1])


@pytest.mark.parametrize("temperature, min_p", [(1.0, 0.1), (0.5, 0.3), (1.7, 0.05), (1.0, 1.0)])
def test_min_p_keeps_the_tokens_at_least_min_p_times_the_top_one(temperature, min_p):
    logits = torch.randn(6, 64) * 3
    out = filter_logits(logits, [SamplingParams(temperature=temperature, min_p=min_p)] * 6)
    probs = torch.softmax(logits / temperature, dim=-1)
    keep = probs >= min_p * probs.max(dim=-1, keepdim=True).values * (1 - 1e-6)
    assert torch.equal(torch.isfinite(out), keep)
    assert torch.equal(out[keep], logits[keep])  # kept entries unchanged (temperature is the consumer's)


def test_min_p_composes_with_top_k_after_temperature():
    logits = torch.randn(1, 64) * 2
    out = filter_logits(logits, [SamplingParams(temperature=0.8, top_k=10, min_p=0.2)])
    probs = torch.softmax(logits / 0.8, dim=-1)[0]
    top = set(torch.topk(probs, 10).indices.tolist())
    floor = {i for i in range(64) if probs[i] >= 0.2 * probs.max()}
    assert set(torch.isfinite(out[0]).nonzero().squeeze(1).tolist()) == top & floor


@pytest.mark.parametrize("kwargs, field", [
    ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"),
    ({"logit_bias": {3: 101}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"), ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"logit_bias": {3: float("nan")}}, "logit_bias"),
    ({"min_tokens": 200}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
    ({"stop_token_ids": (-2,)}, "stop_token_ids"), ({"stop_token_ids": ("x",)}, "stop_token_ids"),
])
def test_bad_values_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(max_tokens=100, **kwargs)


def test_token_ids_outside_the_vocabulary_are_refused_by_the_engine(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs, max_rows=2)
    for params, field in ((SamplingParams(logit_bias={64: 1.0}), "logit_bias"), (SamplingParams(stop_token_ids=(99,)), "stop_token_ids")):
        with pytest.raises(ValueError, match=field):
            c.generate([PROMPTS[0]], params, policy="speculative")


# ---------------------------------------------------------------------- through the engine
@pytest.fixture(scope="module")
def cascade(tiny_pair_dirs):
    return make_cascade(tiny_pair_dirs, max_rows=4)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_large_bias_forces_the_token_under_every_policy(cascade, policy):
    out = cascade.generate(PROMPTS, SamplingParams(max_tokens=12, logit_bias={11: 100.0}), policy=policy)
    assert all(r.token_ids == [11] * 12 for r in out)


@pytest.mark.parametrize("policy", ["speculative", "chow(alpha=0.3)", "bild"])
def test_forced_by_bias_under_sampling_too(cascade, policy):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3, logit_bias={11: 100.0})
    assert all(r.token_ids == [11] * 10 for r in cascade.generate(PROMPTS, params, policy=policy))


def test_greedy_speculative_equals_target_only_under_bias_and_min_p(cascade):
    params = SamplingParams(max_tokens=20, logit_bias={5: 3.0, 9: -5.0, 40: 2.0}, min_p=0.5)
    target = [r.token_ids for r in cascade.generate(PROMPTS, params, policy="target-only")]
    for k in (1, 4):
        spec = cascade.generate(PROMPTS, params, policy=f"speculative(k={k})")
        assert [r.token_ids for r in spec] == target
    plain = [r.token_ids for r in cascade.generate(PROMPTS, SamplingParams(max_tokens=20), policy="target-only")]
    assert plain != target  # the bias changed the answer, so the equality above is not vacuous


def test_stop_token_ids_end_the_answer_without_emitting_the_token(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs, max_rows=4)
    plain = c.generate(PROMPTS, SamplingParams(max_tokens=20), policy="target-only")
    stop_id = plain[0].token_ids[5]
    params = SamplingParams(max_tokens=20, stop_token_ids=(stop_id,))
    for policy in ("target-only", "speculative", "chow(alpha=0.3)"):
        out = c.generate(PROMPTS, params, policy=policy)
        for p, r in zip(plain, out):
            cut = p.token_ids.index(stop_id) if stop_id in p.token_ids else len(p.token_ids)
            assert r.token_ids == p.token_ids[:cut], policy
            assert r.finish_reason == ("stop" if cut < 20 else "length")


def test_min_tokens_holds_back_the_eos_and_stays_lossless(tiny_pair_dirs):
    plain = make_cascade(tiny_pair_dirs, max_rows=4).generate(PROMPTS, SamplingParams(max_tokens=20), policy="target-only")
    toks = plain[0].token_ids
    first = next(i for i in range(1, 8) if toks[i] not in toks[:i])  # a token the answer first meets at `first`
    eos = toks[first]
    c = make_cascade(tiny_pair_dirs, max_rows=4, eos=(eos,))
    short = c.generate([PROMPTS[0]], SamplingParams(max_tokens=20), policy="target-only")[0]
    assert len(short.token_ids) == first and short.finish_reason == "stop"
    params = SamplingParams(max_tokens=20, min_tokens=8)
    target = c.generate(PROMPTS, params, policy="target-only")
    for r in target:
        assert len(r.token_ids) >= 8 and eos not in r.token_ids[:8]
    for policy in ("speculative", "speculative(k=3)"):
        assert [r.token_ids for r in c.generate(PROMPTS, params, policy=policy)] == [r.token_ids for r in target]
    # ignore_eos with min_tokens: the EOS is emitted freely after min_tokens and does not end the answer
    out = c.generate([PROMPTS[0]], SamplingParams(max_tokens=20, min_tokens=8, ignore_eos=True), policy="speculative")[0]
    assert len(out.token_ids) == 20


def _support_ok(runner, prompt, output, params, eos_ids=()) -> bool:
    """Every emitted token is inside the processed distribution of ``runner`` at its position."""
    runner.free([0])
    logits = runner.forward_span([0], [list(prompt) + list(output)], num_logits=[len(output) + 1])[:-1]
    runner.free([0])
    filtered = filter_logits(logits, [params] * len(output), list(range(len(output))), eos_ids)
    return all(math.isfinite(filtered[i, t]) for i, t in enumerate(output))


@pytest.mark.parametrize("policy, model", [("speculative", "target"), ("target-only", "target"), ("draft-only", "draft")])
def test_sampled_tokens_stay_inside_the_min_p_support(cascade, policy, model):
    params = SamplingParams(max_tokens=16, temperature=1.0, min_p=0.35, seed=11)
    out = cascade.generate(PROMPTS, params, policy=policy)
    runner = getattr(cascade, model)
    assert all(_support_ok(runner, p, r.token_ids, params) for p, r in zip(PROMPTS, out))
    wide = SamplingParams(max_tokens=16, temperature=1.0, seed=11)
    outside = sum(not _support_ok(runner, p, r.token_ids, params)
                  for p, r in zip(PROMPTS, cascade.generate(PROMPTS, wide, policy=policy)))
    assert outside > 0  # without min_p the same draws leave the support: the check can fail


def test_seeded_sampling_with_the_new_fields_is_reproducible(cascade):
    params = SamplingParams(max_tokens=16, temperature=0.9, min_p=0.1, logit_bias={3: 1.5}, seed=5)
    a = [r.token_ids for r in cascade.generate(PROMPTS, params, policy="speculative")]
    b = [r.token_ids for r in cascade.generate(PROMPTS, params, policy="speculative")]
    assert a == b
