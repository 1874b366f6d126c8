"""Dynamic speculation (``cascade.speculation``): the controller picks the block length the measured costs
say is fastest, down to none; the engine applies it to lossless requests only, whose output it does not
change (greedy speculative == target-only at every k it chooses)."""

from __future__ import annotations

import pytest
import torch

from cascade import SamplingParams
from cascade.config import EngineConfig
from cascade.policies import parse_policy
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
        draft = draft_step * k  # in steady state the pending pass (one position a row) costs a step too
        ctrl.observe(batch=batch, k=k, draft_s=draft, decode_s=draft_step * max(0, k - 1),
                     decode_steps=max(0, k - 1), target_s=target, target_positions=positions,
                     total_s=draft + target + 0.001, accepted=int(alpha * 100 * k), verified=100 * k,
                     fed_positions=batch if k > 0 else 0, fed_s=draft_step if k > 0 else 0.0)
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
    counted = c.engine.stats.block_length_rounds  # the engine's record of the choices (benchmarks read it)
    assert counted == {k: seen.count(k) for k in set(seen)}
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


def test_a_seeded_bucket_chooses_from_its_costs_at_once():
    # compute-bound under load: the first round already decodes on the target alone (no warm-up at k = 5)
    ctrl = BlockLengthController()
    ctrl.seed(16, draft_step_s=0.02, target_points=[(16, 0.01 + 0.004 * 16), (96, 0.01 + 0.004 * 96)],
              draft_pass_points=[(16, 0.05), (128, 0.4)])
    assert ctrl.choose(16, 5) == 0
    # memory-bound at batch 1: the first round drafts the full block
    ctrl.seed(1, draft_step_s=0.002, target_points=[(1, 0.051), (6, 0.056)], draft_pass_points=[(1, 0.002), (8, 0.004)])
    assert ctrl.choose(1, 5) == 5
    assert ctrl.catch_up_s(16, 16 * 7) == pytest.approx(0.35, rel=1e-6)  # (0.4 - 0.05) for 7 more positions a row
    # the seeded figures fade as rounds are observed: a target that turns out cheap flips the choice (the
    # exploration rounds, one in 32, measure the other widths)
    for _ in range(160):
        k = ctrl.choose(16, 5)
        ctrl.observe(batch=16, k=k, draft_s=0.002 * k, decode_s=0.002 * max(0, k - 1), decode_steps=max(0, k - 1),
                     target_s=0.05 + 0.00001 * 16 * (k + 1), target_positions=16 * (k + 1),
                     total_s=0.002 * k + 0.05 + 0.00001 * 16 * (k + 1), accepted=90 * k, verified=100 * k)
    assert ctrl.choose(16, 5) > 0


class CostedRunner:
    """A runner whose passes advance a fake clock by a cost model (seconds = fixed + per_position * positions)."""

    def __init__(self, runner, clock, fixed, per_position):
        self.runner, self.clock, self.fixed, self.per_position = runner, clock, fixed, per_position

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def forward_span(self, rows, spans, num_logits=None):
        self.clock[0] += self.fixed + self.per_position * sum(len(s) for s in spans)
        return self.runner.forward_span(rows, spans, num_logits)

    def decode(self, rows, ids):
        self.clock[0] += self.fixed + self.per_position * len(rows)
        return self.runner.decode(rows, ids)


def test_profile_pair_seeds_every_bucket_with_the_measured_costs_and_frees_the_rows(tiny_pair_dirs):
    from cascade.models.cuda_graphs import buckets_for  # the batch sizes the engine profiles
    from cascade.speculation import profile_pair

    assert buckets_for(1) == [1] and buckets_for(8) == [1, 2, 4, 8] and buckets_for(12) == [1, 2, 4, 8, 12]
    c = make_cascade(tiny_pair_dirs)
    now = [0.0]
    draft = CostedRunner(c.engine.draft, now, 0.001, 0.0001)
    target = CostedRunner(c.engine.target, now, 0.02, 0.002)
    ctrl = BlockLengthController()
    figures = profile_pair(ctrl, draft, target, batches=[1, 2, 4, 8], k=5, vocab_size=c.engine.vocab_size,
                           clock=lambda: now[0])
    assert sorted(figures) == [1, 2, 4, 8]
    for batch, fig in figures.items():
        assert fig["draft_step_s"] == pytest.approx(0.001 + 0.0001 * batch)
        assert fig["target_pass"] == [(batch, pytest.approx(0.02 + 0.002 * batch)),
                                      (6 * batch, pytest.approx(0.02 + 0.012 * batch))]
        assert fig["draft_pass"][1] == (8 * batch, pytest.approx(0.001 + 0.0008 * batch))
        # the fit reproduces the cost model at other widths, and no warm-up round is asked for
        b = ctrl._bucket(batch)
        assert b.target.predict(3 * batch) == pytest.approx(0.02 + 0.006 * batch)
        assert ctrl.choose(batch, 5) in range(6) and b.profiled
    assert c.engine.draft.lengths(range(8)) == [0] * 8 and c.engine.target.lengths(range(8)) == [0] * 8


def test_engine_profile_then_speculative_stays_lossless_and_errors_are_named(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs)
    want = [r.token_ids for r in c.generate(PROMPTS, SamplingParams(max_tokens=30), policy="target-only")]
    with pytest.raises(ValueError, match="adaptive_k"):
        c.engine.profile_speculation()
    c.engine.config = EngineConfig(max_rows=8, max_len=128, adaptive_k=True)
    c.engine.block_controller = BlockLengthController()
    figures = c.engine.profile_speculation(k=5)
    assert sorted(figures) == [1, 2, 4, 8]
    assert all(c.engine.block_controller._bucket(b).profiled for b in figures)
    got = [r.token_ids for r in c.generate(PROMPTS, SamplingParams(max_tokens=30), policy="speculative")]
    assert got == want  # the profile's synthetic rows left nothing behind in either cache
    c.engine.add_request("queued", [1, 2, 3], SamplingParams(max_tokens=4), parse_policy("speculative"))
    with pytest.raises(RuntimeError, match="before the first request"):
        c.engine.profile_speculation()


def test_measured_round_times_overrule_the_parts_model():
    # the parts (draft step, target fit, overhead of k = 0 rounds) say k = 1 wins at batch 16, but rounds at
    # k = 1 carry a cost the parts miss (here 0.3 s of per-position work outside both passes): once measured,
    # k = 0 is chosen, and it stays so through later explorations
    ctrl = BlockLengthController(explore_every=4)
    ctrl.seed(16, draft_step_s=0.05, target_points=[(16, 0.30), (32, 0.35), (96, 0.6)],
              draft_pass_points=[(16, 0.05), (128, 0.2)])
    for _ in range(3):
        ctrl.observe(batch=16, k=0, draft_s=0.0, decode_s=0.0, decode_steps=0, target_s=0.30, target_positions=16,
                     total_s=0.305, accepted=0, verified=0)
    assert ctrl.expected_rate(16, 1) > ctrl.expected_rate(16, 0)
    ctrl.observe(batch=16, k=1, draft_s=0.05, decode_s=0.0, decode_steps=0, target_s=0.35, target_positions=32,
                 total_s=0.05 + 0.35 + 0.3, accepted=14, verified=16, fed_positions=16, fed_s=0.05)
    assert ctrl.expected_rate(16, 1) < ctrl.expected_rate(16, 0)
    assert ctrl.choose(16, 5) == 0
    # a round that caught up (a long pending pass) or prefilled is not a steady sample of its k
    before = ctrl._bucket(16).round_s[1]
    ctrl.observe(batch=16, k=1, draft_s=2.0, decode_s=0.0, decode_steps=0, target_s=0.35, target_positions=32,
                 total_s=2.7, accepted=14, verified=16, fed_positions=16 * 40, fed_s=2.0)
    assert ctrl._bucket(16).round_s[1] == before


def test_round_clock_waits_for_the_end_event_before_reading_cuda_times(monkeypatch):
    """On CUDA the commit enqueues work after the round's last device read, so the "end" event may not be
    complete when the controller reads the round's times; elapsed_time then raises "device not ready"."""
    from cascade.speculation import RoundClock

    class PendingEvent:  # a CUDA event whose work is still queued until someone waits for it
        made = []

        def __init__(self, enable_timing=False):
            assert enable_timing
            self.done, self.t = False, float(len(PendingEvent.made))
            PendingEvent.made.append(self)

        def record(self):
            pass

        def synchronize(self):
            self.done = True

        def elapsed_time(self, other):
            if not other.done:
                raise RuntimeError("CUDA error: device not ready")
            return (other.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", PendingEvent)
    clock = RoundClock(torch.device("cuda"))
    for name in ("start", "drafted", "end"):
        clock.mark(name)
    assert clock.seconds("start", "end") == pytest.approx(2.0)
    assert clock.seconds("start", "drafted") == pytest.approx(1.0)
