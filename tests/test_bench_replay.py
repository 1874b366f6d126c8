"""Replay against real engine runs on tiny random pairs: where replay says it is exact, the real run must
produce the same tokens and the same draft / target position counts; where it says the output is the
target's, the real run must produce the target-only tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cascade import SamplingParams
from cascade.bench.paths import PathStats, record_path
from cascade.bench.replay import replay_records, simulate, simulate_paths
from cascade.bench.sweeps import GRIDS, grid_policies
from cascade.policies import make_policy

from test_engine import make_cascade

PROMPTS = [[1, 2, 3], [5, 9, 17, 33, 2, 8], [7], [11, 12, 13, 14, 15, 16, 17]]
MAX_TOKENS = 24
POLICIES = [
    ("speculative", {}), ("speculative", {"k": 3}), ("chow", {"alpha": 0.0}), ("chow", {"alpha": 0.3}),
    ("chow", {"alpha": 0.7}), ("chow", {"alpha": 1.0}), ("diff", {"alpha": 0.1}), ("opt", {"alpha": 0.1}),
    ("bild", {"fallback": 0.5, "rollback": 2.0}), ("bild", {"fallback": 0.9, "rollback": 0.5, "k": 4}),
    ("chow-cut", {"alpha": 0.3}), ("chow-cut", {"alpha": 0.05, "k": 3}), ("token-v1", {"alpha": 0.1}), ("token-v2", {"alpha": 0.2}), ("token-v3", {"alpha": 0.3}),
    # (the tiny random pair's max q is ~0.12, 0.05 .. 0.3: these thresholds open some windows, not all)
    ("handoff", {"trigger_below": 0.08, "window": 6.0, "k": 3}), ("handoff", {"trigger_below": 0.07, "window": float("inf")}),
    ("handoff", {"trigger_below": 1.0, "price": 0.75, "window": 0.0}), ("handoff", {"trigger_below": 0.1, "price": 0.7, "window": 8.0}),
    ("handoff-v3", {"alpha": 0.3, "trigger_below": 0.08, "window": 8.0, "k": 4}),
    # (log max q of the tiny pair: about -2.1 .. -3: tau -2.5 hands some answers over, not all)
    ("takeover", {"tau": -2.5, "quantile": 0.25, "after": 4.0}), ("takeover", {"tau": 1.0, "after": 6.0, "until": 6.0, "k": 3}),
    ("takeover-spec", {"tau": -2.5, "quantile": 0.25, "after": 4.0}), ("takeover-spec", {"tau": 1.0, "after": 6.0, "k": 3}),
    ("takeover-spec", {"tau": -2.5, "quantile": 0.5, "after": 8.0, "until": 8.0, "k": 4}),
    ("takeover", {"tau": float("-inf"), "trigger_below": 0.08, "k": 4}),
    ("takeover-spec", {"tau": -2.5, "quantile": 0.25, "after": 8.0, "trigger_below": 0.07, "k": 3}),
]


def _paths(c, prompts):
    params = SamplingParams(max_tokens=MAX_TOKENS)
    draft = c.generate(prompts, params, policy="draft-only")
    target = c.generate(prompts, params, policy="target-only")
    rec = lambda r, m: record_path(c.draft, c.target, r.prompt_token_ids, r.token_ids, ended_on_eos=False,  # noqa: E731
                                   eos_token_ids=(), path_model=m)
    return draft, target, [rec(r, "draft") for r in draft], [rec(r, "target") for r in target]


def _problem(i):
    return SimpleNamespace(dataset="tiny", problem_id=str(i))


@pytest.fixture(scope="module")
def twin(tiny_pair_dirs):
    """A 'pair' whose target is the draft itself: argmax q == argmax p everywhere, so replay never diverges."""
    return make_cascade((tiny_pair_dirs[0], tiny_pair_dirs[0]))


@pytest.fixture(scope="module")
def pair(tiny_pair_dirs):
    return make_cascade(tiny_pair_dirs)


def test_recorded_path_matches_the_run(pair):
    draft, target, dpaths, tpaths = _paths(pair, PROMPTS)
    for r, path in zip(draft, dpaths):
        assert path.tokens == r.token_ids and path.q_argmax == r.token_ids  # greedy: the draft's own argmax
        assert path.emitted == len(r.token_ids) and path.prompt_tokens == len(r.prompt_token_ids)
    for r, path in zip(target, tpaths):
        assert path.p_argmax == r.token_ids
    assert all(0.0 <= t <= 1.0 + 1e-6 for p in dpaths for t in p.tv)


@pytest.mark.parametrize("name,params", POLICIES)
def test_exact_replay_equals_real_run_counts(twin, name, params):
    """Twin pair: replay is exact by construction, so every counter must equal the engine's."""
    draft, target, dpaths, tpaths = _paths(twin, PROMPTS)
    policy = make_policy(name, **params)
    real = twin.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy=policy)
    reps = replay_records(policy, [_problem(i) for i in range(len(PROMPTS))], dpaths, tpaths, [1.0] * 4, [1.0] * 4)
    for i, (r, rep) in enumerate(zip(real, reps)):
        assert rep.mode == "replay-exact"
        assert r.token_ids == draft[i].token_ids
        assert (rep.emitted_tokens, rep.draft_tokens, rep.target_tokens, rep.target_scored_tokens, rep.escalations) == (
            r.stats.emitted_tokens, r.stats.draft_tokens, r.stats.target_tokens, r.stats.target_scored_tokens,
            r.stats.escalations), policy.describe()
        assert rep.target_prefill_tokens == r.stats.target_prefill_tokens
        assert rep.target_stateless_tokens == r.stats.target_stateless_tokens, policy.describe()


def _letters(ids):
    return "".join(chr(65 + int(i) % 26) for i in ids)


@pytest.fixture(scope="module")
def twin_endings(tiny_pair_dirs, twin):
    """Twins whose answers end by EOS / by a stop string mid-answer (a token / text taken from the plain
    answers), next to the plain twin whose answers end by max_tokens."""
    plain = twin.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy="draft-only")
    eos = plain[0].token_ids[8]
    stop = _letters(plain[1].token_ids[6:8])
    dirs = (tiny_pair_dirs[0], tiny_pair_dirs[0])
    return {"max_tokens": (twin, ()), "eos": (make_cascade(dirs, eos=[eos]), ()),
            "stop": (make_cascade(dirs, detokenize=_letters), (stop,))}


@pytest.mark.parametrize("ending", ["eos", "stop"])
@pytest.mark.parametrize("name,params", POLICIES)
def test_exact_replay_equals_real_run_at_eos_and_stop_strings(twin_endings, ending, name, params):
    """Answers that end by EOS or a stop string mid-block: the engine's block ends there, and so does the
    replay's walk; every counter agrees, and the tokens past the end are neither emitted nor counted."""
    c, stop = twin_endings[ending]
    sp = SamplingParams(max_tokens=MAX_TOKENS, stop=stop)
    draft = c.generate(PROMPTS, sp, policy="draft-only")
    assert any(r.finish_reason == "stop" and len(r.token_ids) < MAX_TOKENS for r in draft)
    policy = make_policy(name, **params)
    real = c.generate(PROMPTS, sp, policy=policy)
    paths = [record_path(c.draft, c.target, d.prompt_token_ids, d.token_ids, ended_on_eos=d.finish_reason == "stop"
                         and ending == "eos", eos_token_ids=c.engine.eos_token_ids, path_model="draft") for d in draft]
    reps = replay_records(policy, [_problem(i) for i in range(len(PROMPTS))], paths, [None] * 4, [1.0] * 4, [1.0] * 4)
    for i, (d, r, rep) in enumerate(zip(draft, real, reps)):
        assert rep.mode == "replay-exact" and r.token_ids == d.token_ids and r.finish_reason == d.finish_reason
        assert (rep.emitted_tokens, rep.draft_tokens, rep.target_tokens, rep.target_scored_tokens, rep.escalations) == (
            r.stats.emitted_tokens, r.stats.draft_tokens, r.stats.target_tokens, r.stats.target_scored_tokens,
            r.stats.escalations), (policy.describe(), ending, i)
        assert rep.target_stateless_tokens == r.stats.target_stateless_tokens, (policy.describe(), ending, i)


def test_replay_modes_agree_with_real_runs_on_a_random_pair(pair):
    draft, target, dpaths, tpaths = _paths(pair, PROMPTS)
    seen = {"replay-exact": 0, "replay-target-path": 0, "replay-estimate": 0}
    for name, params in POLICIES:
        policy = make_policy(name, **params)
        real = pair.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy=policy)
        reps = replay_records(policy, [_problem(i) for i in range(len(PROMPTS))], dpaths, tpaths, [0.0] * 4, [1.0] * 4)
        for i, (r, rep) in enumerate(zip(real, reps)):
            seen[rep.mode] += 1
            if rep.mode == "replay-exact":
                assert r.token_ids == draft[i].token_ids
                assert (rep.draft_tokens, rep.target_tokens, rep.target_scored_tokens, rep.escalations) == (
                    r.stats.draft_tokens, r.stats.target_tokens, r.stats.target_scored_tokens, r.stats.escalations)
                assert rep.correct == 0.0
            elif rep.mode == "replay-target-path":
                assert r.token_ids == target[i].token_ids
                assert rep.correct == 1.0
            else:
                assert 0.0 <= rep.correct <= 1.0
                assert r.token_ids != draft[i].token_ids  # it left the draft's answer, as replay said
    assert seen["replay-exact"] > 0 and seen["replay-target-path"] > 0  # both exact kinds were exercised


def _path(q_max, agree, p_max=None):
    """A hand-made path: the draft proposes token 1 everywhere; the target agrees where `agree` is True."""
    n = len(q_max)
    return PathStats(tokens=[1] * n, emitted=n, prompt_tokens=4, q_argmax=[1] * n, q_max=list(q_max),
                     q_margin=list(q_max), q_entropy=[0.1] * n, p_argmax=[1 if a else 2 for a in agree],
                     p_max=list(p_max or [0.9] * n), tv=[0.0 if a else 0.6 for a in agree],
                     logp_x=[-0.1 if a else -3.0 for a in agree])


def test_simulate_counts_catch_up_and_divergence_by_hand():
    # k = 5, 10 tokens; only position 7 is unconfident, and there the target disagrees.
    q = [0.99] * 10
    q[7] = 0.4
    agree = [True] * 10
    agree[7] = False
    w = simulate(make_policy("chow", alpha=0.1, k=5), _path(q, agree))
    # round 1: block 0-4 confident -> kept by the draft alone (4 decode positions after the prompt prefill)
    # round 2: block 5-9 has position 7 -> escalated. It is the last block (it ends the answer), so its last
    #          token is not fed and no bonus position is scored: catch-up 5 + block 4 = 9 target positions,
    #          5 scored (5, 6 accepted with delta = 0; 7 deferred and rejected -> the target's token 2
    #          replaces it: divergence at 7).
    assert w.escalations == 1 and w.target_tokens == 9 and w.diverged_at == 7
    assert w.target_scored_tokens == 5  # the 5 block positions; catch-up is not scored
    assert w.disagreements == 1 and w.resolved_to_target == 1
    # after the replacement, round 3 drafts positions 8-9 (confident): no more target work
    never = simulate(make_policy("chow", alpha=0.7, k=5), _path(q, agree))
    assert never.escalations == 0 and never.target_tokens == 0 and never.diverged_at is None


def _next_dist(runner, seq):
    try:
        return runner.forward_span([0], [seq], num_logits=[1])[0].softmax(-1)
    finally:
        runner.free([0])


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.6])
def test_chow_cut_is_per_position_chow_for_fewer_scored_positions(pair, alpha):
    """chow-cut's greedy output is the notebook's Chow cascade (one token per step: the draft's argmax
    where its max prob >= 1 - alpha, the target's elsewhere), and it scores fewer target positions than
    chow (whose free bonus tokens make its output differ)."""
    params = SamplingParams(max_tokens=MAX_TOKENS)
    chow = pair.generate(PROMPTS, params, policy=make_policy("chow", alpha=alpha))
    cut = pair.generate(PROMPTS, params, policy=make_policy("chow-cut", alpha=alpha))
    for prompt, r in zip(PROMPTS, cut):
        seq = list(prompt)
        for _ in range(MAX_TOKENS):
            q = _next_dist(pair.draft, seq)
            seq.append(int(q.argmax()) if float(q.max()) >= 1 - alpha else int(_next_dist(pair.target, seq).argmax()))
        assert r.token_ids == seq[len(prompt):]
    assert sum(r.stats.target_scored_tokens for r in cut) <= sum(r.stats.target_scored_tokens for r in chow)
    assert sum(r.stats.escalations for r in cut) > 0


def _random_paths(n, seed):
    """Hand-made paths of different lengths: confidences spread over (0, 1), the target disagreeing at
    random, router scores attached (so ``learned`` walks too)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(1, 60, (1,), generator=g))
        q = torch.rand(L, generator=g).pow(0.3)
        agree = (torch.rand(L, generator=g) < q).tolist()
        path = _path(q.tolist(), agree, torch.rand(L, generator=g).tolist())
        if len(out) % 2:  # every other path is the target's answer (the draft's walk may leave it anywhere)
            path.tokens = list(path.p_argmax)
        path.router_score = torch.rand(L, generator=g).tolist()
        out.append(path)
    return out


@pytest.mark.parametrize("family", sorted(GRIDS))
def test_batched_walk_equals_walking_each_path_alone(family):
    """The sweep walks all answers in lockstep; no path may see another's state (lengths, windows, early
    stops and escalations all differ between rows)."""
    paths = _random_paths(24, seed=len(family))
    policies = grid_policies(family)
    escalated = mixed = 0
    for policy in policies[:: max(1, len(policies) // 10)] + policies[-4:]:  # (the last: the most eager)
        together = simulate_paths(policy, paths)
        assert together == [simulate(policy, p) for p in paths], policy.describe()
        escalated += sum(w.escalations + w.target_alone_steps for w in together)  # target passes
        mixed += len({w.diverged_at is None for w in together}) == 2  # some paths left, some kept their answer
    assert escalated > 0 and mixed > 0


# ---------------------------------------------------------------- traced paths, first-token counters

def _traced(c, prompts, policy, sp):
    """Answers of ``policy`` (draft-only / target-only) with the engine's trace of each (``cascade.trace``)."""
    import dataclasses

    from cascade.trace import Trace

    model = {"draft-only": "draft", "target-only": "target"}[policy]
    if model == "target":
        sp = dataclasses.replace(sp, logprobs=20)
    engine = c.engine
    engine.trace = Trace()
    try:
        for i, ids in enumerate(prompts):
            engine.add_request(f"t{i}", ids, sp, make_policy(policy))
            engine.trace.watch(f"t{i}", model)
        tokens, finish = {f"t{i}": [] for i in range(len(prompts))}, {}
        while engine.has_work():
            for o in engine.step():
                tokens[o.request_id] += o.new_token_ids
                if o.finished:
                    finish[o.request_id] = o.finish_reason
        return [(tokens[f"t{i}"], finish[f"t{i}"], engine.trace.pop(f"t{i}")) for i in range(len(prompts))]
    finally:
        engine.trace = None


@pytest.mark.parametrize("ending", ["max_tokens", "eos", "stop"])
def test_a_traced_path_equals_the_teacher_forced_one(tiny_pair_dirs, ending):
    """The answer's own model's statistics kept while decoding + one teacher-forced pass of the other model
    give the path two teacher-forced passes give: same tokens and argmaxes, statistics within fp32 noise."""
    base = make_cascade(tiny_pair_dirs)
    plain = base.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS), policy="draft-only")
    if ending == "eos":
        c, sp = make_cascade(tiny_pair_dirs, eos=[plain[0].token_ids[8]]), SamplingParams(max_tokens=MAX_TOKENS)
    elif ending == "stop":
        c = make_cascade(tiny_pair_dirs, detokenize=_letters)
        sp = SamplingParams(max_tokens=MAX_TOKENS, stop=(_letters(plain[1].token_ids[6:8]),))
    else:
        c, sp = base, SamplingParams(max_tokens=MAX_TOKENS)
    compared = 0
    for policy, model in (("draft-only", "draft"), ("target-only", "target")):
        for prompt, (ids, finish, trace) in zip(PROMPTS, _traced(c, PROMPTS, policy, sp)):
            kwargs = dict(ended_on_eos=finish == "stop" and ending == "eos", eos_token_ids=c.engine.eos_token_ids,
                          path_model=model)
            forced = record_path(c.draft, c.target, prompt, ids, **kwargs)
            traced = record_path(c.draft, c.target, prompt, ids, trace=trace, **kwargs)
            assert traced.tokens == forced.tokens and traced.emitted == forced.emitted
            assert traced.q_argmax == forced.q_argmax and traced.p_argmax == forced.p_argmax and traced.tv == forced.tv
            for name in ("q_max", "q_margin", "q_entropy", "p_max", "logp_x"):
                assert getattr(traced, name) == pytest.approx(getattr(forced, name), rel=1e-4, abs=1e-5), (model, name)
            compared += 1
    assert compared == 2 * len(PROMPTS)


def test_a_trace_that_does_not_fit_falls_back_to_two_passes(pair):
    [(ids, finish, trace)] = _traced(pair, PROMPTS[:1], "draft-only", SamplingParams(max_tokens=MAX_TOKENS))
    forced = record_path(pair.draft, pair.target, PROMPTS[0], ids, ended_on_eos=False, eos_token_ids=(), path_model="draft")
    wrong = {**trace, "tokens": [t + 1 for t in trace["tokens"]]}  # another answer's trace
    assert record_path(pair.draft, pair.target, PROMPTS[0], ids, ended_on_eos=False, eos_token_ids=(),
                       path_model="draft", trace=wrong).q_max == forced.q_max  # recomputed, not read off the trace
    [(tids, _, ttrace)] = _traced(pair, PROMPTS[:1], "target-only", SamplingParams(max_tokens=MAX_TOKENS))
    blind = {**ttrace, "top_ids": [[t] for t in ttrace["tokens"]], "top_logprobs": [[lp] for lp in ttrace["logprob"]]}
    tforced = record_path(pair.draft, pair.target, PROMPTS[0], tids, ended_on_eos=False, eos_token_ids=(), path_model="target")
    assert tforced.q_argmax != tforced.p_argmax  # somewhere the draft's token is not the target's ...
    again = record_path(pair.draft, pair.target, PROMPTS[0], tids, ended_on_eos=False, eos_token_ids=(),
                        path_model="target", trace=blind)  # ... and the blinded top list misses it: the target reads it
    assert again.logp_x == pytest.approx(tforced.logp_x, rel=1e-5, abs=1e-6) and again.q_argmax == tforced.q_argmax


def test_first_token_counters_of_real_runs_equal_replays_where_exact(tiny_pair_dirs, tmp_path, monkeypatch):
    """The modelled time to first token prices the counters at the first reported token: a real run's (kept
    by the harness) and an exact replay's must be the same counters."""
    from cascade.bench import runs, scoring
    from cascade.bench.datasets import Problem

    twin = make_cascade((tiny_pair_dirs[0], tiny_pair_dirs[0]))
    draft = _paths(twin, PROMPTS)[2]
    problems = [Problem("tiny", str(i), (("user", ",".join(map(str, ids))),), "code-execution", (("task_id", str(i)),),
                        (), MAX_TOKENS, completion=True) for i, ids in enumerate(PROMPTS)]
    twin.encode = lambda text: [int(t) for t in str(text).split(",")]  # the problems' text is their token ids
    monkeypatch.setattr(scoring, "score", lambda problem, text: scoring.Score(True, "not scored"))
    runner = runs.PolicyRunner(twin, runs.RunCache(tmp_path), "twin")
    for name, params in POLICIES:
        policy = make_policy(name, **params)
        real, _ = runner.run(policy, problems, progress=False)
        reps = replay_records(policy, [_problem(i) for i in range(len(PROMPTS))], draft, [None] * 4, [1.0] * 4, [1.0] * 4)
        for r, rep in zip(real, reps):
            assert rep.mode == "replay-exact" and r.first_token == rep.first_token, policy.describe()
            assert 0 < r.ttft_s <= r.latency_s


def test_placed_alphas_fill_the_cost_gap_the_fixed_ones_leave():
    """Draft confidences clustered in (0.2, 0.3): every fixed alpha escalates almost no block (alpha >= 0.8) or
    almost every one (alpha <= 0.7); alphas placed at the dev split's block-confidence quantiles escalate the
    shares in between, and the grid is the same whatever paths are walked (placed on the dev paths only)."""
    from cascade.bench.sweeps import ALPHAS, placed_alphas

    g = torch.Generator().manual_seed(3)
    paths = [_path((0.2 + 0.1 * torch.rand(40, generator=g)).tolist(), [True] * 40) for _ in range(30)]

    def escalated_share(policies):
        blocks = sum(-(-len(p) // 5) for p in paths)
        return sorted(sum(w.escalations for w in simulate_paths(pol, paths)) / blocks for pol in policies)

    def widest_gap(shares):
        return max(b - a for a, b in zip(shares, shares[1:]))

    fixed = escalated_share(grid_policies("chow"))
    placed = escalated_share(grid_policies("chow", placed_on=paths))
    assert widest_gap(fixed) > 0.8 and widest_gap(placed) < 0.2
    alphas = placed_alphas(paths)
    assert alphas and not set(alphas) & set(ALPHAS) and all(0.7 < a < 0.8 for a in alphas)
    assert [p.describe() for p in grid_policies("chow", placed_on=paths)][: len(ALPHAS)] == \
        [p.describe() for p in grid_policies("chow")]


def test_the_replay_runs_on_one_thread_and_restores_the_callers_count():
    from cascade.bench.replay import one_intra_op_thread

    before = torch.get_num_threads()
    with one_intra_op_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), one_intra_op_thread():
        raise RuntimeError("an error inside still restores it")
    assert torch.get_num_threads() == before
