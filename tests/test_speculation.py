"""Dynamic speculation (``cascade.speculation``): the controller picks the block length the measured costs
say is fastest, down to none; the engine applies it to lossless requests only, whose output it does not
change (greedy speculative == target-only at every k it chooses)."""

from __future__ import annotations

import pytest

from cascade import SamplingParams
from cascade.config import EngineConfig
from cascade.speculation import BlockLengthController, _block_tokens

from test_engine import PROMPTS, make_cascade


def feed(ctrl, batch, k_max, *, draft_step, target_fixed, target_per_position, alpha, rounds=80):
    """Run the controller against a synthetic machine; returns the block lengths it chose."""
    chosen = []
    for _ in range(rounds):
        k = ctrl.choose(batch, k_max)
        chosen.append(k)
        positions = batch * (k + 1)
        target = target_fixed + target_per_position * positions
        draft = draft_step * k
        ctrl.observe(batch=batch, k=k, draft_s=draft + 0.5 * (k > 0), decode_s=draft_step * max(0, k - 1),
                     decode_steps=max(0, k - 1), target_s=target, target_positions=positions,
                     total_s=draft + 0.5 * (k > 0) + target + 0.001, accepted=int(alpha * 100 * k), verified=100 * k)
    return chosen


def test_memory_bound_target_and_good_drafts_speculate_fully():
    ctrl = BlockLengthController()
    chosen = feed(ctrl, 1, 5, draft_step=0.002, target_fixed=0.05, target_per_position=0.001, alpha=0.8)
    tail = chosen[20:]
    assert max(set(tail), key=tail.count) == 5
    assert ctrl.expected_rate(1, 5) > 1.5 * ctrl.expected_rate(1, 0)


def test_compute_bound_target_under_load_stops_speculating():
    ctrl = BlockLengthController()
    chosen = feed(ctrl, 16, 5, draft_step=0.02, target_fixed=0.01, target_per_position=0.004, alpha=0.5)
    tail = chosen[20:]
    assert max(set(tail), key=tail.count) == 0
    assert tail.count(5) <= len(tail) // 10 + 1  # only the exploration rounds
    assert ctrl.expected_rate(16, 0) > ctrl.expected_rate(16, 5)


def test_a_middle_length_wins_where_it_should():
    # the rate of k is B * tokens(k) / (k * d + a + b * B * (k + 1)); with these costs k = 2 is the best
    ctrl = BlockLengthController()
    d, a, b, alpha, batch = 0.01, 0.02, 0.004, 0.6, 4
    rate = {k: batch * (1.0 if k == 0 else _block_tokens(alpha, k)) / (k * d + a + b * batch * (k + 1) + 0.001) for k in range(6)}
    best = max(rate, key=rate.get)
    chosen = feed(ctrl, batch, 5, draft_step=d, target_fixed=a, target_per_position=b, alpha=alpha, rounds=120)
    tail = chosen[40:]
    assert max(set(tail), key=tail.count) == best


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="decay"):
        BlockLengthController(decay=1.0)
    with pytest.raises(ValueError, match="explore_every"):
        BlockLengthController(explore_every=1)


def test_engine_keeps_speculative_lossless_while_k_changes(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs)
    want = [r.token_ids for r in c.generate(PROMPTS, SamplingParams(max_tokens=40), policy="target-only")]
    c.engine.config = EngineConfig(max_rows=8, max_len=128, adaptive_k=True)
    from cascade.speculation import BlockLengthController as Ctrl

    c.engine.block_controller = ctrl = Ctrl(explore_every=3)
    seen = []
    real = ctrl.choose
    ctrl.choose = lambda batch, k_max, *rest: seen.append(real(batch, k_max, *rest)) or seen[-1]
    got = [r.token_ids for r in c.generate(PROMPTS, SamplingParams(max_tokens=40), policy="speculative")]
    assert got == want
    assert 0 in seen and 5 in seen  # both arms ran: no speculation, and the policy's full block
    # non-lossless policies keep their own k: chow's blocks are untouched by the controller
    seen.clear()
    c.generate(PROMPTS, SamplingParams(max_tokens=10), policy="chow(alpha=0.3)")
    assert seen == []


def _warm(ctrl, batch, k_max=5, rounds=40):
    """A compute-bound machine under load (k = 0 is best), with the draft's pending pass measured."""
    for _ in range(rounds):
        k = ctrl.choose(batch, k_max)
        positions = batch * (k + 1)
        ctrl.observe(batch=batch, k=k, draft_s=0.02 * k + 0.05 * (k > 0), decode_s=0.02 * max(0, k - 1),
                     decode_steps=max(0, k - 1), target_s=0.01 + 0.004 * positions, target_positions=positions,
                     total_s=0.02 * k + 0.05 * (k > 0) + 0.01 + 0.004 * positions + 0.001, accepted=int(50 * k),
                     verified=100 * k, fed_positions=batch if k > 0 else 0, fed_s=0.003 * batch if k > 0 else 0.0)
    # a long catch-up measured once: 16 requests x 40 missed positions
    ctrl.observe(batch=batch, k=1, draft_s=2.0, decode_s=0.0, decode_steps=0, target_s=0.01 + 0.004 * 2 * batch,
                 target_positions=2 * batch, total_s=2.2, accepted=0, verified=0, fed_positions=batch * 41,
                 fed_s=0.003 * batch * 41)


def test_a_catch_up_makes_speculating_again_dearer_and_stops_explorations():
    ctrl = BlockLengthController(explore_every=4)
    _warm(ctrl, 16)
    assert ctrl.catch_up_s(16, 16 * 40) == pytest.approx(0.003 * 16 * 40, rel=0.05)
    assert ctrl.catch_up_s(16, 0) == 0.0
    cheap, dear = ctrl.expected_rate(16, 2), ctrl.expected_rate(16, 2, catch_up=16 * 40, remaining=20)
    assert dear < cheap
    # with a lag that costs more than a round, an exploration round keeps k = 0
    chosen = [ctrl.choose(16, 5, catch_up=16 * 40, remaining=30) for _ in range(12)]
    assert set(chosen) == {0}
    # without it, explorations leave 0 now and then
    assert any(ctrl.choose(16, 5) > 0 for _ in range(12))


def test_a_new_batch_bucket_starts_from_the_nearest_instead_of_warming_up():
    ctrl = BlockLengthController()
    _warm(ctrl, 16)
    assert ctrl.choose(9, 5) == ctrl.choose(16, 5) == 0  # 9 is in the 16 bucket
    assert ctrl.choose(7, 5) == 0  # bucket 8: no warm-up round at k = 5, the 16 bucket's costs stand in
    assert ctrl.expected_rate(7, 0) is not None
