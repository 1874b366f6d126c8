"""The policy zoo in the engine on the tiny random pair: every policy greedy and sampled (seeded
determinism, batch invariance, rows freed), the token-specific rules' output distribution, BiLD against a
direct implementation of the paper's loop, the request-level quantile cascade (extremes, routing, held-back
streaming), the benchmark-only oracle, and per-token log-probs against an independent log-softmax."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import PROMPTS, _chi_square_p_value, ids, make_cascade

from cascade import SamplingParams, TokenSource
from cascade.policies import make_policy, parse_policy, verify_distributions
from cascade.policies.routing import linear_quantile

NEW_POLICIES = ["diff(alpha=0.3)", "opt(alpha=0.3)", "token-v1(alpha=0.05)", "token-v2(alpha=0.05)",
                "token-v3(alpha=0.3)", "quantile(tau=-2.3)", "bild(k=3, fallback=0.12, rollback=3.5)"]


@pytest.fixture(scope="module")
def cascade(tiny_pair_dirs):
    return make_cascade(tiny_pair_dirs)


@pytest.fixture(scope="module")
def hf_pair(tiny_pair_dirs):
    from transformers import AutoModelForCausalLM

    return tuple(AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float64).eval() for d in tiny_pair_dirs)


def _accounting(r) -> None:
    s = r.stats
    counts = {src: r.token_sources.count(src) for src in TokenSource}
    assert s.emitted_tokens == len(r.token_ids) == len(r.token_sources) == len(r.token_logprobs)
    # every target-sampled token is emitted, except possibly the last one (cut by max_tokens or EOS)
    assert counts[TokenSource.BONUS] <= s.bonus_tokens and counts[TokenSource.TARGET] <= s.replaced_tokens + s.target_only_steps
    decided = s.bonus_tokens + s.replaced_tokens + s.target_only_steps
    assert decided - (counts[TokenSource.BONUS] + counts[TokenSource.TARGET]) in (0, 1)


@pytest.mark.parametrize("policy", NEW_POLICIES)
def test_new_policies_greedy_batched_equals_alone(cascade, policy):
    params = SamplingParams(max_tokens=16)
    batched = cascade.generate(PROMPTS, params, policy=policy)
    alone = [cascade.generate([p], params, policy=policy)[0] for p in PROMPTS]
    assert ids(batched) == ids(alone)
    assert [r.token_sources for r in batched] == [r.token_sources for r in alone]
    for r in batched:
        assert len(r.token_ids) == 16
        _accounting(r)
    assert cascade.engine.scheduler.num_free_rows == cascade.engine.max_rows and not cascade.engine.has_work()


@pytest.mark.parametrize("policy", NEW_POLICIES)
def test_new_policies_sampled_seeded_and_batch_invariant(cascade, policy):
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=100 + i) for i in range(len(PROMPTS))]
    a = cascade.generate(PROMPTS, params, policy=policy)
    b = cascade.generate(PROMPTS, params, policy=policy)
    alone = [cascade.generate([p], [sp], policy=policy)[0] for p, sp in zip(PROMPTS, params)]
    assert ids(a) == ids(b) == ids(alone)
    assert [r.token_logprobs for r in a] == [r.token_logprobs for r in b]
    for r in a:
        _accounting(r)
    other = [SamplingParams(max_tokens=12, temperature=1.0, seed=999 + i) for i in range(len(PROMPTS))]
    assert ids(cascade.generate(PROMPTS, other, policy=policy)) != ids(a)
    assert cascade.engine.scheduler.num_free_rows == cascade.engine.max_rows and not cascade.engine.has_work()


def test_mixed_policies_in_one_batch(cascade):
    """Sequences with different policies (delta path, distribution path, BiLD, request-level, target-only)
    share rounds and each gets what it gets alone."""
    policies = ["token-v2(alpha=0.05)", "chow(alpha=0.3)", "bild(k=3, fallback=0.12, rollback=3.5)",
                "quantile(tau=-2.3)", "target-only", "diff(alpha=0.3)"]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7)
    prompt = PROMPTS[1]
    alone = [cascade.generate([prompt], params, policy=p)[0].token_ids for p in policies]
    engine = cascade.engine
    for i, p in enumerate(policies):
        engine.add_request(f"mix-{i}", prompt, params, parse_policy(p))
    got: dict[str, list[int]] = {f"mix-{i}": [] for i in range(len(policies))}
    while engine.has_work():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert [got[f"mix-{i}"] for i in range(len(policies))] == alone


# ---------------------------------------------------------------------------------------- token rules
def _first_step(hf_pair, prompt):
    with torch.no_grad():
        q = torch.softmax(hf_pair[0](torch.tensor([prompt])).logits[0, -1], -1)
        p = torch.softmax(hf_pair[1](torch.tensor([prompt])).logits[0, -1], -1)
    return q, p


@pytest.mark.parametrize("policy", ["token-v1(alpha=0.05, k=1)", "token-v2(alpha=0.03, k=1)", "token-v3(alpha=0.5, k=1)"])
def test_token_rule_engine_samples_pi(tiny_pair_dirs, hf_pair, policy):
    """At T = 1 the first emitted token is distributed as the rule's pi (the trigger fires: max q < 1 -
    alpha); the same test rejects p and q."""
    pol = parse_policy(policy)
    prompt = [3, 1, 4, 1, 5]
    q, p = _first_step(hf_pair, prompt)
    assert q.max() < 1 - pol.alpha
    d = verify_distributions(q.log()[None], p.log()[None], torch.tensor([0]), torch.ones(1))
    a = pol.accepted(d.q_rule, d.p_rule)[0]
    # no token within 1e-3 of the rule's boundary, so float differences cannot change A
    bound = {"token-v1": (q, p.max() - pol.alpha), "token-v2": (p, p.max() - pol.alpha),
             "token-v3": (p, (1 - pol.alpha) * p.max())}[pol.name]
    assert (bound[0] - bound[1]).abs().min() > 1e-3 and 0 < int(a.sum()) < len(a)
    pi = pol.target_distribution(d, None)[0][0]
    c = make_cascade(tiny_pair_dirs, max_rows=64, max_len=16)
    n = 3000
    rs = c.generate([prompt] * n, [SamplingParams(max_tokens=1, temperature=1.0, seed=s) for s in range(n)], policy=pol)
    counts = torch.bincount(torch.tensor([r.token_ids[0] for r in rs]), minlength=len(q)).double()
    assert _chi_square_p_value(counts, pi) > 1e-3
    assert _chi_square_p_value(counts, p) < 1e-6 and _chi_square_p_value(counts, q) < 1e-6


# ---------------------------------------------------------------------------------------- BiLD
def bild_reference(hf_pair, prompt, max_tokens, fallback, rollback, k):
    """BiLD's greedy loop written directly from the authors' ``T5BiLDModel``: the draft runs until its max
    prob falls below ``fallback`` or it has made ``k`` tokens (num_small_iters); then the target scores
    every draft token since its last run and rolls back at the first with -log p(x) > rollback whose
    replacement argmax p differs from it (we keep checking past a skipped one: the documented
    departure), or else adds its own argmax token. Returns the tokens and the number of rollbacks."""
    hd, ht = hf_pair
    out: list[int] = []
    since: list[int] = []
    rollbacks = 0
    with torch.no_grad():
        while len(out) < max_tokens:
            q = torch.softmax(hd(torch.tensor([prompt + out])).logits[0, -1], -1)
            if q.max() >= fallback:
                out.append(int(q.argmax()))
                since.append(len(out) - 1)
                if len(since) < k:
                    continue
            lp = torch.log_softmax(ht(torch.tensor([prompt + out])).logits[0], -1)
            n0 = len(prompt)
            for i in since:
                replacement = int(lp[n0 + i - 1].argmax())
                if -lp[n0 + i - 1, out[i]] > rollback and replacement != out[i]:
                    out = out[:i] + [replacement]
                    rollbacks += 1
                    break
            else:
                out.append(int(lp[-1].argmax()))
            since = []
    return out[:max_tokens], rollbacks


def test_bild_greedy_matches_the_authors_loop(cascade, hf_pair):
    total_rollbacks = 0
    for fallback, rollback, k in ((0.12, 3.5, 3), (0.1, 3.0, 2), (0.15, 4.0, 4), (0.0, 2.0, 5)):
        policy = make_policy("bild", fallback=fallback, rollback=rollback, k=k)
        rs = cascade.generate(PROMPTS, SamplingParams(max_tokens=24), policy=policy)
        for prompt, r in zip(PROMPTS, rs):
            ref, rollbacks = bild_reference(hf_pair, prompt, 24, fallback, rollback, k)
            assert r.token_ids == ref, (fallback, rollback, k, prompt)
            assert r.stats.rejected_tokens == rollbacks
            total_rollbacks += rollbacks
            _accounting(r)
            assert r.token_sources.count(TokenSource.VERIFIED) == r.stats.accepted_tokens
    assert total_rollbacks > 0  # the rollback was exercised


def test_bild_stream_never_retracts_reported_tokens(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs, detokenize=lambda t: "".join(chr(65 + i % 26) for i in t))
    policy = "bild(k=2, fallback=0.1, rollback=3.0)"
    [full] = c.generate([PROMPTS[1]], SamplingParams(max_tokens=24), policy=policy)
    streamed, texts = [], []
    for out in c.stream(PROMPTS[1], SamplingParams(max_tokens=24), policy=policy):
        streamed += out.new_token_ids
        texts.append(out.text)
        assert out.text == "".join(chr(65 + i % 26) for i in streamed)  # text covers what was reported
    assert streamed == full.token_ids and texts[-1] == full.text


# ---------------------------------------------------------------------------------------- quantile
def test_quantile_extremes(cascade):
    params = SamplingParams(max_tokens=14)
    draft = cascade.generate(PROMPTS, params, policy="draft-only")
    target = cascade.generate(PROMPTS, params, policy="target-only")
    never = cascade.generate(PROMPTS, params, policy="quantile(tau=-inf)")
    assert ids(never) == ids(draft)
    for r, d in zip(never, draft):
        assert r.stats.routed_to_target == 0 and set(r.token_sources) == {TokenSource.DRAFT}
        assert r.stats.target_tokens == r.stats.target_prefill_tokens == 0
        assert r.stats.draft_tokens == d.stats.draft_tokens and r.token_logprobs == d.token_logprobs
    always = cascade.generate(PROMPTS, params, policy="quantile(tau=inf)")
    assert ids(always) == ids(target)
    for r, d, t in zip(always, draft, target):
        s = r.stats
        assert s.routed_to_target == 1 and set(r.token_sources) == {TokenSource.TARGET}
        assert s.emitted_tokens == len(r.token_ids) == 14 and r.token_logprobs == t.token_logprobs
        # both phases are paid for: the discarded draft answer and the target's answer
        assert s.draft_tokens == d.stats.draft_tokens > 0 and s.draft_prefill_tokens == d.stats.draft_prefill_tokens
        assert s.target_tokens == t.stats.target_tokens and s.target_prefill_tokens == t.stats.target_prefill_tokens
        assert s.target_only_steps == t.stats.target_only_steps == 14
        assert s.relative_cost(10, 100) > t.stats.relative_cost(10, 100)
    assert cascade.engine.scheduler.num_free_rows == cascade.engine.max_rows


def test_quantile_routes_on_the_draft_answers_score(cascade):
    params = SamplingParams(max_tokens=14)
    draft = cascade.generate(PROMPTS, params, policy="draft-only")
    target = cascade.generate(PROMPTS, params, policy="target-only")
    scores = [linear_quantile(d.token_logprobs, 0.25) for d in draft]
    tau = sorted(scores)[len(scores) // 2]  # about half of the requests go to the target
    rs = cascade.generate(PROMPTS, params, policy=make_policy("quantile", tau=tau, quantile=0.25))
    routed = [sc < tau for sc in scores]
    assert 0 < sum(routed) < len(routed)
    for r, d, t, go in zip(rs, draft, target, routed):
        assert r.stats.routed_to_target == int(go)
        assert r.token_ids == (t.token_ids if go else d.token_ids)


def test_quantile_holds_output_back_until_decided(tiny_pair_dirs):
    detok = lambda t: "".join(chr(65 + i % 26) for i in t)
    c = make_cascade(tiny_pair_dirs, detokenize=detok)
    params = SamplingParams(max_tokens=14)
    [draft] = c.generate([PROMPTS[0]], params, policy="draft-only")
    [target] = c.generate([PROMPTS[0]], params, policy="target-only")
    outs = list(c.stream(PROMPTS[0], params, policy="quantile(tau=-inf, k=3)"))
    assert len(outs) > 1 and all(o.new_token_ids == [] and o.text == "" for o in outs[:-1])
    assert outs[-1].new_token_ids == draft.token_ids and outs[-1].text == draft.text and outs[-1].finished
    # escalated: nothing of the draft's answer is ever reported; the target's tokens stream as decoded
    outs = list(c.stream(PROMPTS[0], params, policy="quantile(tau=inf, k=3)"))
    assert [t for o in outs for t in o.new_token_ids] == target.token_ids and outs[-1].text == target.text
    first = next(i for i, o in enumerate(outs) if o.new_token_ids)
    assert all(len(o.new_token_ids) == 1 for o in outs[first:])
    assert c.engine.scheduler.num_free_rows == c.engine.max_rows


def test_quantile_with_stop_and_eos(tiny_pair_dirs):
    """The draft phase ends on EOS too; an escalated request's target answer has its own stop."""
    base = make_cascade(tiny_pair_dirs)
    [free] = base.generate([PROMPTS[1]], SamplingParams(max_tokens=20), policy="draft-only")
    eos_tok = free.token_ids[4]
    c = make_cascade(tiny_pair_dirs, eos=[eos_tok])
    [kept] = c.generate([PROMPTS[1]], SamplingParams(max_tokens=20), policy="quantile(tau=-inf)")
    assert kept.token_ids == free.token_ids[:free.token_ids.index(eos_tok)] and kept.finish_reason == "stop"
    [t] = c.generate([PROMPTS[1]], SamplingParams(max_tokens=20), policy="target-only")
    [routed] = c.generate([PROMPTS[1]], SamplingParams(max_tokens=20), policy="quantile(tau=inf)")
    assert routed.token_ids == t.token_ids and routed.finish_reason == t.finish_reason
    assert routed.stats.routed_to_target == 1


# ---------------------------------------------------------------------------------------- oracle
def test_oracle_is_benchmark_only(cascade):
    pol = parse_policy("oracle")
    assert type(pol).benchmark_only and parse_policy(pol.describe()) == pol
    with pytest.raises(ValueError, match="policy: oracle is benchmark-only"):
        cascade.generate([PROMPTS[0]], SamplingParams(max_tokens=4), policy="oracle")
    assert cascade.engine.scheduler.num_free_rows == cascade.engine.max_rows and not cascade.engine.has_work()


# ---------------------------------------------------------------------------------------- log-probs
def _teacher_forced_logprobs(model, prompt, out):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + out])).logits[0].double(), -1)
    n0 = len(prompt)
    return [float(lp[n0 + i - 1, t]) for i, t in enumerate(out)]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("policy", ["draft-only", "target-only", "speculative", "chow(alpha=0.85)",
                                    "token-v2(alpha=0.05)", "bild(k=3, fallback=0.12, rollback=3.5)", "quantile(tau=-2.3)"])
def test_token_logprobs_match_an_independent_log_softmax(cascade, hf_pair, policy, temperature):
    """Each emitted token's log-prob is the natural log-softmax of the deciding model's logits there:
    the draft's for DRAFT tokens, the target's for every other source."""
    params = [SamplingParams(max_tokens=12, temperature=temperature, seed=5 + i) for i in range(len(PROMPTS))]
    for prompt, r in zip(PROMPTS, cascade.generate(PROMPTS, params, policy=policy)):
        assert len(r.token_logprobs) == len(r.token_ids) == r.stats.emitted_tokens
        lq = _teacher_forced_logprobs(hf_pair[0], prompt, r.token_ids)
        lp = _teacher_forced_logprobs(hf_pair[1], prompt, r.token_ids)
        expected = [a if src == TokenSource.DRAFT else b for a, b, src in zip(lq, lp, r.token_sources)]
        assert r.token_logprobs == pytest.approx(expected, abs=1e-4)
        assert all(math.isfinite(x) and x <= 0 for x in r.token_logprobs)
    if policy in ("draft-only", "target-only"):
        assert {TokenSource.DRAFT if policy == "draft-only" else TokenSource.TARGET} == set(r.token_sources)


def test_bild_fallback_stops_drafting_at_the_low_confidence_token(cascade):
    """fallback = 1: every draft token is below it, so each round drafts one token, drops it and lets the
    target decide: target-only output, and no draft work past that one token per round."""
    params = SamplingParams(max_tokens=12)
    target = cascade.generate(PROMPTS, params, policy="target-only")
    rs = cascade.generate(PROMPTS, params, policy="bild(k=16, fallback=1.0, rollback=3.0)")
    assert ids(rs) == ids(target)
    for r in rs:
        assert set(r.token_sources) == {TokenSource.BONUS}
        # per round: the pending one or two fed tokens, then one sampled proposal and no decode step
        assert r.stats.draft_tokens <= 2 * r.stats.emitted_tokens and r.stats.escalations == 12


@pytest.mark.parametrize("policy", ["quantile(tau=inf, k=2)", "bild(k=2, fallback=0.1, rollback=3.0)", "token-v2(alpha=0.05)"])
def test_abort_with_held_back_output_frees_rows(tiny_pair_dirs, policy):
    c = make_cascade(tiny_pair_dirs, max_rows=2)
    stream = c.stream(PROMPTS[1], SamplingParams(max_tokens=40), policy=policy)
    for _ in range(3):
        next(stream)
    assert c.engine.scheduler.num_free_rows == 1
    stream.close()
    assert c.engine.scheduler.num_free_rows == 2 and not c.engine.has_work()
    [r] = c.generate([PROMPTS[1]], SamplingParams(max_tokens=6), policy=policy)  # the rows are usable again
    assert len(r.token_ids) == 6
