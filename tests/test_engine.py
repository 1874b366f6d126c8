"""Engine invariants on a tiny random pair: lossless greedy, batch invariance, seeded determinism,
the sampling distribution of speculative decoding, stop conditions, row bookkeeping and bad input."""

from __future__ import annotations


import pytest
import torch

from cascade import Cascade, SamplingParams, TokenSource
from cascade.config import EngineConfig
from cascade.models.llama import LlamaRunner
from cascade.policies import make_policy

PROMPTS = [[1, 2, 3], [5, 9, 17, 33, 2, 8, 40, 41, 42], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]]


def make_cascade(dirs, *, max_rows=8, max_len=128, eos=(), detokenize=None, max_draft_block=16) -> Cascade:
    draft_dir, target_dir = dirs
    draft = LlamaRunner.from_pretrained(draft_dir, max_rows=max_rows, max_len=max_len, device="cpu", dtype="float32")
    target = LlamaRunner.from_pretrained(target_dir, max_rows=max_rows, max_len=max_len, device="cpu", dtype="float32")
    c = Cascade(draft, target, None, eos_token_ids=list(eos),
                config=EngineConfig(max_rows=max_rows, max_len=max_len, max_draft_block=max_draft_block))
    if detokenize is not None:
        c.engine.detokenize = detokenize
    return c


@pytest.fixture(scope="module")
def cascade(tiny_pair_dirs):
    return make_cascade(tiny_pair_dirs)


def ids(results):
    return [r.token_ids for r in results]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_target_only(cascade, k):
    params = SamplingParams(max_tokens=20)
    target = ids(cascade.generate(PROMPTS, params, policy="target-only"))
    spec = cascade.generate(PROMPTS, params, policy=make_policy("speculative", k=k))
    assert ids(spec) == target
    assert all(len(t) == 20 for t in target)
    # every block was verified, so every token was decided by the target
    assert all(all(r.target_decided) for r in spec)
    assert sum(r.stats.escalations for r in spec) > 0


def test_target_only_matches_plain_greedy_decoding(cascade, tiny_pair_dirs):
    """The engine's target-only path equals an independent greedy loop over transformers' model."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_pair_dirs[1]), dtype=torch.float32).eval()
    [r] = cascade.generate([PROMPTS[1]], SamplingParams(max_tokens=12), policy="target-only")
    seq = list(PROMPTS[1])
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert r.token_ids == seq[len(PROMPTS[1]):]


def test_draft_only_never_runs_the_target(cascade):
    [r] = cascade.generate([PROMPTS[0]], SamplingParams(max_tokens=15), policy="draft-only")
    assert r.stats.target_tokens == 0 and r.stats.target_prefill_tokens == 0 and r.stats.escalations == 0
    assert set(r.token_sources) == {TokenSource.DRAFT}
    assert len(r.token_ids) == 15


@pytest.mark.parametrize("policy", ["speculative", "chow(alpha=0.3)", "bild(fallback=0.6,rollback=2.0)", "draft-only", "target-only"])
def test_batched_equals_alone_greedy(cascade, policy):
    params = SamplingParams(max_tokens=16)
    batched = ids(cascade.generate(PROMPTS, params, policy=policy))
    alone = [cascade.generate([p], params, policy=policy)[0].token_ids for p in PROMPTS]
    assert batched == alone


def test_chow_extremes(cascade):
    params = SamplingParams(max_tokens=16)
    never = cascade.generate(PROMPTS, params, policy="chow(alpha=1.0)")
    assert ids(never) == ids(cascade.generate(PROMPTS, params, policy="draft-only"))
    assert sum(r.stats.target_tokens for r in never) == 0
    # alpha = 0: delta = 1 wherever the draft is not certain, i.e. everywhere -> lossless
    always = cascade.generate(PROMPTS, params, policy="chow(alpha=0.0)")
    assert ids(always) == ids(cascade.generate(PROMPTS, params, policy="target-only"))


def test_chow_escalates_fewer_tokens_as_alpha_grows(cascade):
    params = SamplingParams(max_tokens=24)
    fractions = []
    for alpha in (0.0, 0.5, 0.8, 1.0):
        rs = cascade.generate(PROMPTS, params, policy=f"chow(alpha={alpha})")
        fractions.append(sum(r.stats.target_tokens for r in rs) / sum(r.stats.emitted_tokens for r in rs))
    assert fractions == sorted(fractions, reverse=True)
    assert fractions[0] > 0.5 and fractions[-1] == 0.0


def test_bild_without_fallback_hands_over_every_k_tokens(cascade):
    params = SamplingParams(max_tokens=15)
    # k longer than the answer: the hand-over never comes, and without a fallback that is the draft alone
    assert ids(cascade.generate(PROMPTS, params, policy="bild(fallback=0.0, k=16)")) == ids(
        cascade.generate(PROMPTS, params, policy="draft-only"))
    # k = 4: the target checks every 4 draft tokens and adds one (15 tokens: 3 blocks of 4 + 1 bonus)
    for r in cascade.generate(PROMPTS, params, policy="bild(fallback=0.0, rollback=inf, k=4)"):
        assert r.stats.escalations == 3 and r.stats.bonus_tokens == 3
        assert r.token_sources[:5] == [TokenSource.VERIFIED] * 4 + [TokenSource.BONUS]


def test_bild_escalates_at_low_confidence(cascade):
    rs = []
    for fallback in (0.3, 0.5, 0.7, 0.99):
        rs += cascade.generate(PROMPTS, SamplingParams(max_tokens=24), policy=f"bild(fallback={fallback},rollback=1.0)")
    assert sum(r.stats.escalations for r in rs) > 0
    # some escalated blocks kept draft tokens, so the rollback test ran on them
    assert sum(r.stats.accepted_tokens + r.stats.rejected_tokens for r in rs) > 0
    for r in rs:
        s = r.stats
        counts = {src: r.token_sources.count(src) for src in TokenSource}
        assert counts[TokenSource.VERIFIED] == s.accepted_tokens  # BiLD verifies every kept position (delta = 1)
        assert counts[TokenSource.TARGET] == s.replaced_tokens
        assert counts[TokenSource.BONUS] == s.bonus_tokens


def test_stats_account_for_every_token(cascade):
    for policy in ("speculative", "chow(alpha=0.4)", "target-only", "draft-only"):
        for r in cascade.generate(PROMPTS, SamplingParams(max_tokens=17), policy=policy):
            s = r.stats
            counts = {src: r.token_sources.count(src) for src in TokenSource}
            assert s.emitted_tokens == len(r.token_ids) == 17
            assert counts[TokenSource.BONUS] == s.bonus_tokens
            assert counts[TokenSource.TARGET] == s.replaced_tokens + s.target_only_steps
            assert s.prompt_tokens == len(r.prompt_token_ids)
            if policy == "target-only":
                assert s.target_tokens + s.target_prefill_tokens == s.prompt_tokens + s.emitted_tokens - 1
                assert abs(s.relative_cost(10, 100) - 1.0) < 0.1


def test_seeded_sampling_is_deterministic_and_batch_invariant(cascade):
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=100 + i) for i in range(len(PROMPTS))]
    for policy in ("speculative", "chow(alpha=0.3)", "target-only"):
        a = ids(cascade.generate(PROMPTS, params, policy=policy))
        b = ids(cascade.generate(PROMPTS, params, policy=policy))
        alone = [cascade.generate([p], [sp], policy=policy)[0].token_ids for p, sp in zip(PROMPTS, params)]
        assert a == b == alone
    # a different seed gives a different sample somewhere
    other = [SamplingParams(max_tokens=12, temperature=1.0, seed=999 + i) for i in range(len(PROMPTS))]
    assert ids(cascade.generate(PROMPTS, other, policy="speculative")) != ids(cascade.generate(PROMPTS, params, policy="speculative"))


def test_top_k_one_is_greedy(cascade):
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=1, seed=3)
    assert ids(cascade.generate(PROMPTS, params, policy="speculative")) == ids(
        cascade.generate(PROMPTS, SamplingParams(max_tokens=10), policy="target-only"))


def _target_joint(target_dir, prompt, temperature=1.0):
    """Exact target distribution of the first two sampled tokens: [V, V] (p(t1) * p(t2 | t1))."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float64).eval()
    with torch.no_grad():
        p1 = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
        V = p1.numel()
        batch = torch.tensor([prompt + [t] for t in range(V)])
        p2 = torch.softmax(hf(batch).logits[:, -1].double() / temperature, -1)
    return p1[:, None] * p2


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit, pooling cells with small expected counts."""
    from scipy.stats import chi2

    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


def _sample_pairs(c: Cascade, prompt, policy, n, temperature=1.0):
    params = [SamplingParams(max_tokens=2, temperature=temperature, seed=s) for s in range(n)]
    rs = c.generate([prompt] * n, params, policy=policy)
    V = c.target.vocab_size
    counts = torch.zeros(V * V, dtype=torch.float64)
    for r in rs:
        counts[r.token_ids[0] * V + r.token_ids[1]] += 1
    return counts


def test_speculative_sampling_reproduces_target_distribution(tiny_pair_dirs):
    """Lossless in distribution: speculative at T=1 draws the first two tokens from exactly the target's
    joint distribution. The same test rejects the draft's own samples, so it can fail."""
    c = make_cascade(tiny_pair_dirs, max_rows=64, max_len=32)
    prompt = [3, 1, 4, 1, 5]
    joint = _target_joint(tiny_pair_dirs[1], prompt).flatten()
    n = 4000
    spec = _sample_pairs(c, prompt, make_policy("speculative", k=2), n)
    assert _chi_square_p_value(spec, joint) > 1e-3
    wrong = _sample_pairs(c, prompt, "draft-only", n)
    assert _chi_square_p_value(wrong, joint) < 1e-6


def test_eos_and_stop_strings(tiny_pair_dirs):
    base = make_cascade(tiny_pair_dirs)
    [free] = base.generate([PROMPTS[1]], SamplingParams(max_tokens=20), policy="target-only")
    eos_tok = free.token_ids[5]
    first = free.token_ids.index(eos_tok)
    c = make_cascade(tiny_pair_dirs, eos=[eos_tok], detokenize=lambda t: "".join(chr(65 + i % 26) for i in t))
    for policy in ("target-only", "speculative"):
        [r] = c.generate([PROMPTS[1]], SamplingParams(max_tokens=20), policy=policy)
        assert r.token_ids == free.token_ids[:first] and r.finish_reason == "stop"
        assert r.text == "".join(chr(65 + i % 26) for i in r.token_ids)  # text covers the tokens of the last round
        [r] = c.generate([PROMPTS[1]], SamplingParams(max_tokens=20, ignore_eos=True), policy=policy)
        assert r.token_ids == free.token_ids and r.finish_reason == "length"
    # stop string: the text of tokens 2..3 of the free-running output
    text = "".join(chr(65 + i % 26) for i in free.token_ids)
    stop = text[2:4]
    [r] = c.generate([PROMPTS[1]], SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True), policy="speculative")
    assert r.finish_reason == "stop" and r.text == text[: text.find(stop)] and stop not in r.text


def test_rows_are_freed_and_reused(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs, max_rows=2)
    rs = c.generate(PROMPTS * 3, SamplingParams(max_tokens=6), policy="chow(alpha=0.2)")  # 12 requests, 2 rows
    assert len(rs) == 12 and all(len(r.token_ids) == 6 for r in rs)
    assert c.engine.scheduler.num_free_rows == 2 and not c.engine.has_work()
    assert ids(rs[:4]) == ids(rs[4:8]) == ids(rs[8:])


def test_abort_frees_rows(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs, max_rows=2)
    stream = c.stream(PROMPTS[1], SamplingParams(max_tokens=50), policy="speculative")
    next(stream)
    assert c.engine.scheduler.num_free_rows == 1
    stream.close()  # the caller walks away: the request is aborted and its row freed
    assert c.engine.scheduler.num_free_rows == 2 and not c.engine.has_work()


def test_long_generation_hits_the_cache_bound(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs, max_len=24)
    [r] = c.generate([PROMPTS[3]], SamplingParams(max_tokens=100), policy="speculative")
    assert r.finish_reason == "length" and len(PROMPTS[3]) + len(r.token_ids) <= 24


@pytest.mark.parametrize("bad, field", [
    (lambda c: c.generate([[]], SamplingParams(), policy="speculative"), "prompt"),
    (lambda c: c.generate([list(range(1, 60)) * 3], SamplingParams(), policy="speculative"), "prompt"),
    (lambda c: c.generate([[1, 2]], SamplingParams(), policy="no-such-policy"), "policy"),
    (lambda c: c.generate([[1, 2]], SamplingParams(), policy="chow(alpha=1.5)"), "alpha"),
    (lambda c: c.generate([[1, 2]], SamplingParams(), policy="chow(beta=0.5)"), "beta"),
    (lambda c: c.generate([[1, 2]], SamplingParams(max_tokens=0)), "max_tokens"),
    (lambda c: c.generate([[1, 2]], SamplingParams(temperature=-1.0)), "temperature"),
    (lambda c: c.generate([[1, 2]], SamplingParams(top_p=0.0)), "top_p"),
    (lambda c: c.generate([[1, 2]], SamplingParams(), policy="speculative(k=0)"), "k"),
    (lambda c: c.generate([[1, 2]], SamplingParams(), policy="speculative(k=40)"), "k"),
    (lambda c: c.generate([[1, 999]], SamplingParams()), "prompt"),
    (lambda c: c.generate("hello", SamplingParams()), "prompt"),
])
def test_bad_arguments_name_the_field(cascade, bad, field):
    with pytest.raises(ValueError, match=field):
        bad(cascade)
    assert cascade.engine.scheduler.num_free_rows == cascade.engine.max_rows


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_verify_makes_speculative_token_exact_in_any_dtype(tiny_pair_dirs, dtype):
    """exact_verify feeds the target the way target-only decoding does (the prompt alone, then a token
    per call), so greedy speculative equals target-only token for token at batch 1, bf16 included, and
    the position counters stay those of the one-pass verification."""
    def build(exact):
        d, t = (LlamaRunner.from_pretrained(p, max_rows=4, max_len=128, device="cpu", dtype=dtype) for p in tiny_pair_dirs)
        return Cascade(d, t, None, config=EngineConfig(max_rows=4, max_len=128, exact_verify=exact))

    exact, plain = build(True), build(False)
    params = SamplingParams(max_tokens=20)
    for prompt in PROMPTS:
        target = exact.generate([prompt], params, policy="target-only")[0].token_ids
        assert target == plain.generate([prompt], params, policy="target-only")[0].token_ids
        for k in (1, 3, 5):
            r = exact.generate([prompt], params, policy=make_policy("speculative", k=k))[0]
            assert r.token_ids == target, (prompt, k)
            p = plain.generate([prompt], params, policy=make_policy("speculative", k=k))[0]
            assert (r.stats.target_tokens, r.stats.target_scored_tokens) == (p.stats.target_tokens, p.stats.target_scored_tokens) \
                or r.token_ids != p.token_ids
    assert exact.engine.scheduler.num_free_rows == 4


class _RowCountSensitive:
    """A target whose logits for a row depend on how many rows share the call, as GEMM blocking makes them
    do on real hardware (here exaggerated so that argmaxes move): the seam that lets the batch-invariance
    test fail when rows are mixed into one call."""

    def __init__(self, runner):
        self._runner = runner
        self._bias = torch.randn(runner.vocab_size, generator=torch.Generator().manual_seed(0)) * 4.0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def forward_span(self, rows, spans, num_logits=None):
        logits = self._runner.forward_span(rows, spans, num_logits=num_logits)
        return logits + (len(rows) - 1) * self._bias.to(logits.dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("row_count_sensitive", [False, True])
def test_exact_verify_is_batch_invariant(tiny_pair_dirs, dtype, row_count_sensitive):
    """With exact_verify every target call is a batch-1 target-only call, so greedy speculative on a batch
    of prompts (each with its own acceptance pattern, escalating at different rounds) equals target-only on
    each prompt alone, and target-only in this mode equals it too, even for a target whose per-row results
    depend on the other rows of a call."""
    d, t = (LlamaRunner.from_pretrained(p, max_rows=4, max_len=128, device="cpu", dtype=dtype) for p in tiny_pair_dirs)
    if row_count_sensitive:
        t = _RowCountSensitive(t)
    c = Cascade(d, t, None, config=EngineConfig(max_rows=4, max_len=128, exact_verify=True))
    params = SamplingParams(max_tokens=20)
    alone = [c.generate([prompt], params, policy="target-only")[0].token_ids for prompt in PROMPTS]
    assert [r.token_ids for r in c.generate(PROMPTS, params, policy="target-only")] == alone
    for k in (2, 5):
        together = c.generate(PROMPTS, params, policy=make_policy("speculative", k=k))
        assert [r.token_ids for r in together] == alone, k
        assert sum(r.stats.escalations for r in together) > len(PROMPTS)
    assert c.engine.scheduler.num_free_rows == 4
