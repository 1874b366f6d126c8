"""The learned deferral router and the ``learned`` policy: AUC by hand, training that must beat max-prob on
data built so that max-prob cannot rank it, the file round trip and its errors, the policy's decisions on
hand-made scores, the engine's refusal without a router, and replay == real with a router on a tiny
random pair."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cascade import SamplingParams
from cascade.bench.paths import path_features, path_labels, record_path, score_paths
from cascade.bench.replay import replay_record
from cascade.policies import BlockConfidence, make_policy
from cascade.router import DeferralRouter, load_router, roc_auc, router_features, train_router

from test_engine import make_cascade


def test_auc_by_hand_with_ties():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie counts half
    assert roc_auc([1.0, 2.0, 3.0], [1, 1, 0]) == pytest.approx(0.0)
    assert math.isnan(roc_auc([1.0, 2.0], [1, 1]))


def _synthetic(n, seed):
    """Positions whose max prob says nothing about disagreement (it is drawn independently of the label)
    while the entropy does: the router must learn the entropy, max-prob ranks at chance."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.2).long()
    max_prob = 0.3 + 0.7 * torch.rand(n, generator=g)
    entropy = torch.where(y.bool(), 1.5 + 0.5 * torch.rand(n, generator=g), 0.2 + 0.8 * torch.rand(n, generator=g))
    margin = max_prob * 0.5
    return router_features(max_prob, margin, entropy, max_prob.log()), y, max_prob


def test_the_router_learns_what_max_prob_cannot_rank():
    x, y, _ = _synthetic(3000, 0)
    router = train_router(x, y, steps=300)
    tx, ty, tmax = _synthetic(2000, 1)
    auc_router = roc_auc(torch.sigmoid(router.logits(tx)), ty)
    auc_max = roc_auc(1.0 - tmax, ty)
    assert auc_max < 0.6 and auc_router > 0.95


def test_training_is_deterministic_and_checks_its_input():
    x, y, _ = _synthetic(500, 0)
    a, b = train_router(x, y, steps=50, seed=3), train_router(x, y, steps=50, seed=3)
    assert torch.equal(a.w1, b.w1) and torch.equal(a.b2, b.b2)
    with pytest.raises(ValueError, match="labels"):
        train_router(x, torch.zeros_like(y))
    with pytest.raises(ValueError, match="features"):
        train_router(x[:, :3], y)


def test_save_load_round_trip_and_a_bad_file_names_itself(tmp_path):
    x, y, _ = _synthetic(500, 0)
    router = train_router(x, y, steps=30)
    path = router.save(tmp_path / "router.json")
    back = load_router(tmp_path)
    assert back is not None and back.info["fingerprint"] == router.info["fingerprint"]
    assert torch.allclose(back.logits(x), router.logits(x))
    assert load_router(tmp_path / "nowhere") is None
    path.write_text('{"format": 99}')
    with pytest.raises(ValueError, match="router.json"):
        DeferralRouter.load(path)


def _conf(router_scores, max_prob=None, catch_up=None):
    r = torch.tensor(router_scores, dtype=torch.float32)
    m = torch.full_like(r, 0.9) if max_prob is None else torch.tensor(max_prob)
    B, K = r.shape
    return BlockConfidence(max_prob=m, margin=m, entropy=torch.zeros(B, K), token_logprob=m.log(),
                           valid=torch.ones(B, K, dtype=torch.bool), drafted=torch.full((B,), K),
                           catch_up=None if catch_up is None else torch.tensor(catch_up), router=r)


def test_learned_opens_a_window_where_the_router_expects_disagreement():
    p = make_policy("learned", threshold=0.3)
    _, esc = p.trigger(_conf([[0.1, 0.35], [0.1, 0.2]]))
    assert esc.tolist() == [True, False]  # max q is 0.9 everywhere: only the router's scores differ
    # cost-aware: expected disagreements 0.45 against price x (catch-up + 2 + 1)
    _, esc = make_policy("learned", threshold=0.0, price=0.1).trigger(_conf([[0.1, 0.35]] * 2, catch_up=[1, 2]))
    assert esc.tolist() == [True, False]
    with pytest.raises(ValueError, match="router"):
        p.trigger(BlockConfidence(*(getattr(_conf([[0.5]]), f) for f in ("max_prob", "margin", "entropy",
                                                                          "token_logprob", "valid", "drafted"))))


@pytest.fixture(scope="module")
def tiny_router(tiny_pair_dirs):
    """A router trained on the tiny random pair's own draft answers (labels: target disagrees)."""
    c = make_cascade(tiny_pair_dirs)
    prompts = [[1, 2, 3], [5, 9, 17, 33, 2, 8], [7], [11, 12, 13, 14, 15, 16, 17], [4, 4], [30, 31, 32]]
    answers = c.generate(prompts, SamplingParams(max_tokens=24), policy="draft-only")
    paths = [record_path(c.draft, c.target, r.prompt_token_ids, r.token_ids, ended_on_eos=False, eos_token_ids=(),
                         path_model="draft") for r in answers]
    x, y = torch.cat([path_features(p) for p in paths]), torch.cat([path_labels(p) for p in paths])
    return train_router(x, y, steps=100)


def test_the_engine_refuses_learned_without_a_router(tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs)
    with pytest.raises(ValueError, match="router"):
        c.generate([[1, 2, 3]], SamplingParams(max_tokens=4), policy="learned")


@pytest.mark.parametrize("params", [{"threshold": 0.9, "window": 4.0}, {"threshold": 0.0, "price": 0.78, "window": 0.0},
                                    {"threshold": 0.92, "window": math.inf, "k": 3}])
def test_learned_replay_equals_the_real_run_on_a_twin_pair(tiny_pair_dirs, tiny_router, params):
    """A twin pair (target = draft) never diverges, so every counter of the replay must equal the engine's,
    with the router's scores read from the recorded path in the replay and computed live in the engine."""
    c = make_cascade((tiny_pair_dirs[0], tiny_pair_dirs[0]))
    c.engine.router = tiny_router
    prompts = [[1, 2, 3], [5, 9, 17, 33, 2, 8], [7]]
    sp = SamplingParams(max_tokens=24)
    draft = c.generate(prompts, sp, policy="draft-only")
    policy = make_policy("learned", **params)
    real = c.generate(prompts, sp, policy=policy)
    escalations = []
    for i, (d, r) in enumerate(zip(draft, real)):
        path = record_path(c.draft, c.target, d.prompt_token_ids, d.token_ids, ended_on_eos=False, eos_token_ids=(),
                           path_model="draft")
        score_paths(tiny_router, [path])
        rep = replay_record(policy, SimpleNamespace(dataset="tiny", problem_id=str(i)), path, None, 1.0, 1.0)
        assert rep.mode == "replay-exact" and r.token_ids == d.token_ids
        assert (rep.draft_tokens, rep.target_tokens, rep.target_scored_tokens, rep.escalations) == (
            r.stats.draft_tokens, r.stats.target_tokens, r.stats.target_scored_tokens, r.stats.escalations), params
        escalations.append(r.stats.escalations)
    assert any(escalations), "the thresholds should open some windows on this pair"


def test_router_cost_benchmark_smoke_writes_its_figures(tmp_path):
    """``benchmarks/router_cost.py --smoke`` runs from the checkout and writes one row per batch size, with
    every figure it reports (the measured cost itself is printed and saved, never asserted)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    stem = tmp_path / "router_cost"
    proc = subprocess.run([sys.executable, "benchmarks/router_cost.py", "--smoke", "--batches", "1,4", "--reps", "2",
                           "--context", "16", "--out", str(stem)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 4] and [r["positions"] for r in rows] == [5, 20]
    for r in rows:
        assert r["router_us"] > 0 and r["confidence_ms"] > 0 and r["draft_step_ms"] > 0
        # a ratio of two measured times: reported, not bounded (on a loaded machine it can exceed 1)
        assert r["router_share_of_draft_side"] > 0
    assert stem.with_suffix(".csv").read_text().splitlines()[0].startswith("machine,device,dtype,batch")
