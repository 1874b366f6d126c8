"""Top log-probs per token (``SamplingParams.logprobs``, the server's ``top_logprobs`` / completions
``logprobs``): the most likely tokens of the model that decided each token, from the same filtered
distribution as the chosen token's log-prob. Checked against teacher-forced passes of that model."""

from __future__ import annotations

import math

import pytest
import torch

from cascade import SamplingParams
from cascade.metrics import TokenSource
from cascade.sampling import filter_logits
from test_engine import PROMPTS, make_cascade

POLICIES = ["target-only", "speculative", "chow(alpha=0.3)", "chow-cut(alpha=0.3)", "bild", "draft-only",
            "handoff(trigger_below=0.5, window=8)"]


@pytest.fixture(scope="module")
def cascade(tiny_pair_dirs):
    return make_cascade(tiny_pair_dirs, max_rows=4)


def _teacher_forced(runner, prompt, output, params):
    """[len(output), V] natural log-probs of ``runner``'s filtered distribution at each output position."""
    runner.free([0])
    logits = runner.forward_span([0], [list(prompt) + list(output)], num_logits=[len(output) + 1])[:-1]
    runner.free([0])
    return torch.log_softmax(filter_logits(logits, [params] * len(output), list(range(len(output)))), dim=-1)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_top_logprobs_are_the_deciding_models(cascade, policy, temperature):
    params = SamplingParams(max_tokens=14, temperature=temperature, seed=3, logprobs=4)
    for prompt, r in zip(PROMPTS, cascade.generate(PROMPTS, params, policy=policy)):
        assert len(r.top_logprobs) == len(r.token_ids)
        ref = {m: _teacher_forced(getattr(cascade, m), prompt, r.token_ids, params) for m in ("draft", "target")}
        for j, (tok, src, lp, top) in enumerate(zip(r.token_ids, r.token_sources, r.token_logprobs, r.top_logprobs)):
            model = "draft" if src == TokenSource.DRAFT else "target"
            want_v = torch.topk(ref[model][j], 4).values
            assert torch.allclose(torch.tensor([v for _, v in top]), want_v, atol=1e-4), (policy, j, model)
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            if temperature == 0.0:
                assert top[0][0] == tok and math.isclose(top[0][1], lp, abs_tol=1e-5)  # greedy: the chosen one is first
            elif tok in dict(top):
                assert math.isclose(dict(top)[tok], lp, abs_tol=1e-5)


def test_no_top_logprobs_unless_asked_and_fewer_when_asked_for_fewer(cascade):
    [plain] = cascade.generate([PROMPTS[0]], SamplingParams(max_tokens=6), policy="speculative")
    assert plain.top_logprobs == []
    a, b = cascade.generate(PROMPTS[:2], [SamplingParams(max_tokens=6, logprobs=2), SamplingParams(max_tokens=6, logprobs=7)],
                            policy="speculative")
    assert {len(t) for t in a.top_logprobs} == {2} and {len(t) for t in b.top_logprobs} == {7}
    assert a.token_ids == plain.token_ids  # asking for them changes nothing else


def test_filtered_tokens_get_minus_infinity_and_limits_are_checked(cascade):
    [r] = cascade.generate([PROMPTS[1]], SamplingParams(max_tokens=5, temperature=1.0, top_k=2, seed=1, logprobs=3),
                           policy="target-only")
    assert all(math.isinf(top[2][1]) and top[2][1] < 0 for top in r.top_logprobs)  # outside the top-2
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


@pytest.mark.parametrize("policy", ["speculative", "chow(alpha=0.3)", "target-only"])
def test_each_emitted_token_is_one_record_from_the_engine_to_the_result(cascade, policy):
    """One ``EmittedToken`` per token carries id, source, log-prob and top alternatives together: the
    result's per-field lists are views of the records, and streamed deltas concatenate to the same records."""
    asked = SamplingParams(max_tokens=12, logprobs=3)
    [r] = cascade.generate(PROMPTS[:1], asked, policy=policy)
    assert [t.id for t in r.tokens] == r.token_ids and [t.source for t in r.tokens] == r.token_sources
    assert [t.logprob for t in r.tokens] == r.token_logprobs and all(len(t.top) == 3 for t in r.tokens)
    assert r.top_logprobs == [list(t.top) for t in r.tokens]
    streamed = [t for out in cascade.stream(PROMPTS[0], asked, policy=policy) for t in out.new_tokens]
    assert streamed == r.tokens
    [plain] = cascade.generate(PROMPTS[:1], SamplingParams(max_tokens=12), policy=policy)
    assert plain.token_ids == r.token_ids and all(t.top == () for t in plain.tokens) and plain.top_logprobs == []
