"""Engine.step_isolating: an exception inside one request's round fails that request only; the others are
restored to their state before the round (tokens, cache lengths, stats, RNG) and go on unchanged."""

from __future__ import annotations

import pytest

from cascade import SamplingParams
from cascade.policies import make_policy
from cascade.policies.base import _REGISTRY, register
from cascade.policies.speculative_cascades import Chow
from test_engine import PROMPTS, make_cascade


class _ExplodesLater(Chow):
    """Raises in its trigger from the third round on, so the failure hits a request that already emitted."""

    calls = 0

    def trigger(self, conf):
        type(self).calls += 1
        if type(self).calls >= 3:
            raise RuntimeError("boom")
        return super().trigger(conf)


@pytest.fixture
def explodes():
    register("test-explodes-later")(_ExplodesLater)
    _ExplodesLater.calls = 0
    yield make_policy("test-explodes-later", alpha=0.3)
    _REGISTRY.pop("test-explodes-later", None)


def test_a_failing_request_does_not_change_the_others(tiny_pair_dirs, explodes):
    engine_side = make_cascade(tiny_pair_dirs, max_rows=4)
    alone = make_cascade(tiny_pair_dirs, max_rows=4)
    jobs = {
        "sampled": (PROMPTS[0], SamplingParams(max_tokens=24, temperature=1.0, seed=3), make_policy("chow", alpha=0.3)),
        "greedy": (PROMPTS[1], SamplingParams(max_tokens=20), make_policy("speculative", k=4)),
        "bild": (PROMPTS[3], SamplingParams(max_tokens=18), make_policy("bild")),
        "bad": (PROMPTS[2], SamplingParams(max_tokens=30), explodes),
    }
    engine = engine_side.engine
    for rid, (prompt, params, policy) in jobs.items():
        engine.add_request(rid, prompt, params, policy)
    tokens = {rid: [] for rid in jobs}
    finals, errors = {}, {}
    while engine.has_work():
        outputs, failed = engine.step_isolating()
        errors.update(failed)
        for out in outputs:
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                finals[out.request_id] = out
    assert set(errors) == {"bad"} and "boom" in str(errors["bad"])
    assert finals["bad"].finish_reason == "error"
    assert engine.scheduler.num_free_rows == 4 and not engine.scheduler.running
    for rid in ("sampled", "greedy", "bild"):
        prompt, params, policy = jobs[rid]
        [ref] = alone.generate([prompt], params, policy=policy)
        assert tokens[rid] == ref.token_ids, rid
        assert finals[rid].stats.draft_tokens == ref.stats.draft_tokens
        assert finals[rid].stats.target_tokens == ref.stats.target_tokens


def test_step_isolating_is_step_when_nothing_fails(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs, max_rows=4)
    ref = make_cascade(tiny_pair_dirs, max_rows=4)
    params = SamplingParams(max_tokens=16, temperature=0.7, seed=11)
    for i, p in enumerate(PROMPTS):
        c.engine.add_request(f"r{i}", p, params, make_policy("chow", alpha=0.2))
    got = {f"r{i}": [] for i in range(len(PROMPTS))}
    while c.engine.has_work():
        outputs, failed = c.engine.step_isolating()
        assert not failed
        for out in outputs:
            got[out.request_id] += out.new_token_ids
    expected = ref.generate(PROMPTS, params, policy="chow(alpha=0.2)")
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == [r.token_ids for r in expected]


def test_a_restored_round_restores_the_policy_too(tiny_pair_dirs):
    """``_degrade_to_draft`` switches a target-only request to draft-only; a round that fails after it must
    give the request its own policy back with everything else (before: the snapshot kept no policy)."""
    from cascade.scheduler import SequenceSnapshot

    c = make_cascade(tiny_pair_dirs, max_rows=2)
    c.engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=8), make_policy("target-only"))
    c.engine.scheduler.admit()
    [s] = c.engine.scheduler.running.values()
    snap = SequenceSnapshot.of(s)
    c.engine._degrade_to_draft([], {}, [s])
    assert s.policy.name == "draft-only"
    snap.restore(s, c.draft, c.target)
    assert s.policy.name == "target-only" and s.policy_state == s.policy.init_state()
    # and a real run afterwards is the plain target-only answer
    [want] = make_cascade(tiny_pair_dirs, max_rows=1).generate([PROMPTS[0]], SamplingParams(max_tokens=8), policy="target-only")
    while c.engine.has_work():
        c.engine.step()
    assert s.output_ids == want.token_ids


def test_restore_gives_back_lists_the_round_appended_to(tiny_pair_dirs):
    from cascade.scheduler import SequenceSnapshot

    c = make_cascade(tiny_pair_dirs, max_rows=2)
    c.engine.add_request("r", PROMPTS[1], SamplingParams(max_tokens=8), make_policy("speculative"))
    c.engine.scheduler.admit()
    [s] = c.engine.scheduler.running.values()
    snap = SequenceSnapshot.of(s)
    s.escalation_lengths.append(3)
    s.text += "xyz"
    snap.restore(s, c.draft, c.target)
    assert s.escalation_lengths == [] and s.text == ""
