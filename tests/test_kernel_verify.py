"""Verify kernel: Triton (through the interpreter) vs the torch reference (tokens exactly equal), the
reference vs an independent float64 computation, the sampled tokens' distributions (many seeds, tiny
vocabulary, chi-square), greedy-row semantics, and the dispatch in cascade.verification."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade.confidence import inverse_temperature
from cascade.kernels import verify as K
from cascade.verification import VerifyStats, verify_stats

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOAT_FIELDS = ("q_token", "p_token", "max_q", "max_p", "tv", "logp_token")
TOKEN_FIELDS = ("residual_token", "target_token")
TEMPS = [1.0, 0.0, 0.7, 1.5, 0.0, 0.3, 2.0]  # 0: greedy rows


def make_case(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """(draft_logits, target_logits, draft_tokens, temperature, noise_seed): the target is a perturbed
    draft (as for a real pair), some rows carry -inf (top-k / top-p), draft tokens are drawn from the
    draft's sampling distribution (its argmax on greedy rows) with a few forced argmax / -inf cases."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([4.0, 1.0, 0.3, 2.0, 8.0])[torch.arange(rows) % 5][:, None]
    q = torch.randn(rows, vocab, generator=g) * scale
    p = q + torch.randn(rows, vocab, generator=g) * scale * 0.5
    for r in range(rows):
        if r % 3 == 1 and vocab > 4:
            drop = torch.rand(vocab, generator=g) < 0.3
            drop[q[r].argmax()] = False
            q[r, drop] = float("-inf")
            drop2 = torch.rand(vocab, generator=g) < 0.3
            drop2[p[r].argmax()] = False
            p[r, drop2] = float("-inf")
    q, p = q.to(dtype), p.to(dtype)
    temp = torch.tensor([TEMPS[r % len(TEMPS)] for r in range(rows)], dtype=torch.float32)
    t = torch.where(temp > 0, temp, torch.ones_like(temp))
    probs = torch.softmax(q.double() / t[:, None], dim=-1)
    tokens = torch.multinomial(probs, 1, generator=g)[:, 0]
    tokens = torch.where(temp > 0, tokens, q.float().argmax(-1))
    if rows > 4:
        tokens[4] = p[4].float().argmax()  # greedy row whose draft token is the target's argmax
    seeds = torch.randint(0, 2**62, (rows,), generator=g)
    return q, p, tokens, temp, seeds


def run_reference(q, p, x, temp, seeds):
    return K.verify_reference(q, p, x, temp, inverse_temperature(temp, len(temp), "cpu"), seeds)


def dispatched(want, temp):
    """What ``verify_stats`` returns for kernel outputs ``want``: TV between the sampling distributions,
    i.e. 1 - p(x) on greedy rows (one-hots at x = argmax q and at argmax p)."""
    return {**want, "tv": torch.where(temp > 0, want["tv"], 1.0 - want["p_token"])}


def naive_verify(q, p, x, temp):
    """Independent float64 computation of the deterministic stats (torch.softmax, argmax, L1)."""
    greedy = temp <= 0
    t = torch.where(greedy, torch.ones_like(temp), temp).double()[:, None]
    q1 = torch.softmax(q.double() / t, dim=-1)
    p1 = torch.softmax(p.double() / t, dim=-1)
    iq, ip = q.float().argmax(-1), p.float().argmax(-1)
    return {
        "q_token": torch.where(greedy, (x == iq).double(), q1.gather(1, x[:, None])[:, 0]),
        "p_token": torch.where(greedy, (x == ip).double(), p1.gather(1, x[:, None])[:, 0]),
        "max_q": q1.max(-1).values,
        "max_p": p1.max(-1).values,
        "tv": 0.5 * (p1 - q1).abs().sum(-1),
        "logp_token": torch.log_softmax(p.double() / t, dim=-1).gather(1, x[:, None])[:, 0],
    }


def assert_floats_close(got, want, rtol=1e-5, atol=1e-6):
    for name in FLOAT_FIELDS:
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=rtol, atol=atol, msg=name)


def assert_same(got, want):
    assert_floats_close(got, want)
    for name in TOKEN_FIELDS:
        assert got[name].dtype == torch.int64, name
        assert torch.equal(got[name], want[name]), name


# ----------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1, 2), (7, 1000), (9, 1001), (2, 151936)])
def test_reference_matches_naive(dtype, rows, vocab):
    q, p, x, temp, seeds = make_case(rows, vocab, dtype)
    got = run_reference(q, p, x, temp, seeds)
    assert_floats_close(got, naive_verify(q, p, x, temp), rtol=2e-5, atol=2e-6)
    for name in TOKEN_FIELDS:
        tok = got[name]
        assert ((tok >= 0) & (tok < vocab)).all()
        assert torch.isfinite(p.float().gather(1, tok[:, None])).all(), f"{name} picked a masked token"


def test_logp_token_is_target_log_softmax_at_x():
    """logp_token = log_softmax(target / T_rule)[x] (T_rule = 1 on greedy rows), -inf at a -inf logit."""
    q, p, x, temp, seeds = make_case(14, 500, torch.float32, seed=4)
    got = run_reference(q, p, x, temp, seeds)["logp_token"]
    t = torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
    want = torch.log_softmax(p / t, dim=-1).gather(1, x[:, None])[:, 0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    masked = torch.isinf(p.gather(1, x[:, None])[:, 0])
    assert masked.any() and (got[masked] == float("-inf")).all()
    assert torch.isfinite(got[~masked]).all()


def test_tv_is_half_l1():
    q, p, x, temp, seeds = make_case(6, 300, torch.float32, seed=2)
    got = run_reference(q, p, x, temp, seeds)
    t = torch.where(temp > 0, temp, torch.ones_like(temp))[:, None]
    l1 = (torch.softmax(p / t, -1) - torch.softmax(q / t, -1)).abs().sum(-1)
    torch.testing.assert_close(got["tv"], 0.5 * l1, rtol=1e-5, atol=1e-6)
    same = run_reference(q, q, x, temp, seeds)
    assert (same["tv"] == 0).all()


def test_noise_is_exponential_and_precise():
    seeds = torch.randint(0, 2**62, (400,))
    e0 = K.exp_noise_reference(seeds, K.RESIDUAL_STREAM, 256).double()
    e1 = K.exp_noise_reference(seeds, K.TARGET_STREAM, 256).double()
    for e in (e0, e1):  # Exp(1): mean 1, median ln 2, P(E < 0.01) = 1 - e^-0.01
        assert abs(e.mean().item() - 1.0) < 0.01
        assert abs((e < 0.6931471805599453).double().mean().item() - 0.5) < 0.005
        assert abs((e < 0.01).double().mean().item() - 0.00995) < 0.001
    assert (e0 != e1).double().mean() > 0.999  # the two streams are different noise
    # the small-noise end (the race winners) matches -log1p(-u) in float64 from the same hash bits
    key = K.row_keys_reference(seeds, K.RESIDUAL_STREAM)[:, None]
    idx = torch.arange(256)[None, :]
    h = K.hash32_reference((K.hash32_reference(idx ^ key) + key) & K._M32)
    u = ((h.double() + 0.5) / 2**32).clamp_max(K._W_MAX)
    exact = -torch.log1p(-u)
    small = exact < 0.05
    assert small.sum() > 100
    torch.testing.assert_close(e0[small], exact[small], rtol=1e-6, atol=0.0)


def test_hash_matches_uint32_arithmetic():
    x = torch.randint(0, 2**32, (1000,), dtype=torch.int64)

    def hash_py(v):
        m = 0xFFFFFFFF
        v ^= v >> 16
        v = (v * 0x7FEB352D) & m
        v ^= v >> 15
        v = (v * 0x846CA68B) & m
        return v ^ (v >> 16)

    want = [hash_py(v) for v in x.tolist()]
    assert K.hash32_reference(x).tolist() == want
    assert K.hash32_numpy(x.numpy().astype(np.uint32)).tolist() == want


def test_sparse_race_matches_dense():
    """Rows with few live tokens take the sparse path of the reference race: same winners as dense."""
    g = torch.Generator().manual_seed(9)
    w = torch.rand(6, 5000, generator=g)
    w[w < 0.9] = 0.0  # 10% live: sparse path
    keys = K.row_keys_reference(torch.randint(0, 2**62, (6,), generator=g), K.TARGET_STREAM)
    best, score = K._race(w, keys)
    dense = w / K.exp_noise_at(keys[:, None], torch.arange(5000)[None, :])
    assert torch.equal(best, dense.argmax(-1))
    assert torch.equal(score, dense.max(-1).values)


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness-of-fit p-value of token counts [V] against probs [V]; 0 when a token of
    probability 0 was drawn."""
    if counts[probs == 0].sum() > 0:
        return 0.0
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2.0))


def _residual(p1: torch.Tensor, q1: torch.Tensor) -> torch.Tensor:
    r = (p1 - q1).clamp_min(0)
    return r / r.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_tokens_follow_their_distributions(temperature):
    """Many seeds on a tiny vocabulary: target_token ~ p and residual_token ~ norm(max(0, p - q)), both
    at the sampling temperature. Negative controls (a nearby wrong temperature) show the test can fail."""
    n, vocab = 40000, 6
    q_row = torch.tensor([1.5, 0.2, -0.5, 1.0, float("-inf"), 0.3])
    p_row = torch.tensor([0.3, 1.2, -0.5, 1.4, 0.5, float("-inf")])
    q, p = q_row.expand(n, vocab).contiguous(), p_row.expand(n, vocab).contiguous()
    temp = torch.full((n,), temperature)
    x = torch.zeros(n, dtype=torch.int64)
    seeds = torch.randint(0, 2**62, (n,))
    got = run_reference(q, p, x, temp, seeds)
    target_counts = torch.bincount(got["target_token"], minlength=vocab).double()
    residual_counts = torch.bincount(got["residual_token"], minlength=vocab).double()

    def dists(t):
        p1 = torch.softmax(p_row.double() / t, -1)
        return p1, _residual(p1, torch.softmax(q_row.double() / t, -1))

    p1, res = dists(temperature)
    assert _chi2_pvalue(target_counts, p1) > 1e-4
    assert _chi2_pvalue(residual_counts, res) > 1e-4
    wrong_p1, wrong_res = dists(temperature * 1.25)
    assert _chi2_pvalue(target_counts, wrong_p1) < 1e-6
    assert _chi2_pvalue(residual_counts, wrong_res) < 1e-6
    assert _chi2_pvalue(residual_counts, p1) < 1e-6


def test_zero_residual_mass_samples_from_p():
    q, _, x, _, seeds = make_case(20, 50, torch.float32, seed=3)
    temp = torch.full((20,), 0.9)
    got = run_reference(q, q, x, temp, seeds)
    assert torch.equal(got["residual_token"], got["target_token"])
    kernel = K.verify_triton(q, q, x, temp, inverse_temperature(temp, 20, "cpu"), seeds, block_v=64, num_splits=1)
    assert torch.equal(kernel["residual_token"], got["residual_token"])


def test_seeds_determine_the_tokens():
    rows, vocab = 64, 1000
    q = torch.zeros(rows, vocab)  # flat: every token equally likely
    p = torch.zeros(rows, vocab)
    p[:, :500] = 1.0
    x = torch.zeros(rows, dtype=torch.int64)
    temp = torch.ones(rows)
    seeds = torch.randint(0, 2**62, (rows,))
    a = run_reference(q, p, x, temp, seeds)
    b = run_reference(q, p, x, temp, seeds.clone())
    assert torch.equal(a["target_token"], b["target_token"]) and torch.equal(a["residual_token"], b["residual_token"])
    assert a["target_token"].unique().numel() > 50  # different seeds, different draws
    assert (a["residual_token"] < 500).all()  # the residual lives where p > q
    high = run_reference(q, p, x, temp, seeds ^ (1 << 40))  # the seed's high word matters too
    assert (high["target_token"] != a["target_token"]).sum() > 50


# ----------------------------------------------------------------------------------------- kernel
# (rows, vocab, num_splits, block_v): 1 = one program per row (one launch), > 1 = split (three launches)
KERNEL_CASES = [
    (1, 1000, 1, 1024),
    (7, 1001, 1, 1024),
    (7, 1001, 3, 256),
    (7, 151936, 1, 32768),
    (7, 151936, 4, 16384),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab,num_splits,block_v", KERNEL_CASES)
def test_kernel_matches_reference(dtype, rows, vocab, num_splits, block_v):
    q, p, x, temp, seeds = make_case(rows, vocab, dtype, seed=rows + vocab)
    inv_t = inverse_temperature(temp, rows, "cpu")
    got = K.verify_triton(q, p, x, temp, inv_t, seeds, block_v=block_v, num_splits=num_splits)
    assert_same(got, K.verify_reference(q, p, x, temp, inv_t, seeds))


def test_kernel_many_rows():
    rows, vocab = 300, 1000
    q, p, x, temp, seeds = make_case(rows, vocab, torch.bfloat16, seed=11)
    inv_t = inverse_temperature(temp, rows, "cpu")
    got = K.verify_triton(q, p, x, temp, inv_t, seeds, block_v=1024, num_splits=1)
    assert_same(got, K.verify_reference(q, p, x, temp, inv_t, seeds))


def test_kernel_mixed_dtypes_and_strided_rows():
    q, p, x, temp, seeds = make_case(5, 700, torch.float32, seed=12)
    wide = torch.full((5, 900), 7.0, dtype=torch.float16)
    wide[:, 100:800] = p.half()
    p_view = wide[:, 100:800]  # row stride 900, fp16 target beside an fp32 draft
    inv_t = inverse_temperature(temp, 5, "cpu")
    for splits in (1, 2):
        got = K.verify_triton(q, p_view, x, temp, inv_t, seeds, block_v=256, num_splits=splits)
        assert_same(got, K.verify_reference(q, p_view.contiguous(), x, temp, inv_t, seeds))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_rows(backend):
    vocab = 200
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, vocab, generator=g) * 3
    p = torch.randn(4, vocab, generator=g) * 3
    p[2] = q[2]  # same argmax
    p[3, q[3].argmax()] = p[3].max() + 1.0  # same argmax, different distributions
    iq, ip = q.argmax(-1), p.argmax(-1)
    x = iq.clone()
    x[1] = (iq[1] + 1) % vocab  # a draft token that is not the draft's argmax
    temp = torch.zeros(4)
    v = verify_stats(q, p, x, temp, torch.arange(4), backend=backend)
    assert v.q_token.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert v.p_token.tolist() == (x == ip).float().tolist()
    assert torch.equal(v.target_token, ip) and torch.equal(v.residual_token, ip)
    # rule statistics still use the T = 1 distributions; TV is between the sampling (one-hot) distributions
    torch.testing.assert_close(v.max_q, torch.softmax(q, -1).max(-1).values)
    torch.testing.assert_close(v.max_p, torch.softmax(p, -1).max(-1).values)
    one_hot = lambda i: torch.nn.functional.one_hot(i, vocab).float()  # noqa: E731
    torch.testing.assert_close(v.tv, 0.5 * (one_hot(ip) - one_hot(x)).abs().sum(-1))
    # logp_token is the natural T = 1 log-prob, not log of the one-hot p_token (0 / -inf)
    logp = torch.log_softmax(p, -1).gather(1, x[:, None])[:, 0]
    torch.testing.assert_close(v.logp_token, logp)
    assert torch.isfinite(v.logp_token).all() and (v.logp_token < 0).all()
    assert (v.logp_token != torch.log(v.p_token)).all()


@pytest.mark.parametrize("num_splits", [1, 2])
def test_kernel_zero_rows_and_masked_rows(num_splits):
    empty = K.verify_triton(torch.empty(0, 100), torch.empty(0, 100), torch.empty(0, dtype=torch.int64),
                            torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.int64))
    assert all(v.shape == (0,) for v in empty.values())
    # a single finite target token: both draws must be it, p(x) is exact
    q = torch.randn(2, 300)
    p = torch.full((2, 300), float("-inf"))
    p[:, 123] = 0.0
    x = torch.tensor([123, 5])
    temp = torch.tensor([0.8, 1.0])
    got = K.verify_triton(q, p, x, temp, inverse_temperature(temp, 2, "cpu"), torch.tensor([1, 2]),
                          block_v=128, num_splits=num_splits)
    assert got["target_token"].tolist() == [123, 123] and got["residual_token"].tolist() == [123, 123]
    assert got["p_token"].tolist() == [1.0, 0.0] and got["max_p"].tolist() == [1.0, 1.0]
    assert got["logp_token"].tolist() == [0.0, float("-inf")]  # log p(x) exact; -inf logit at x: -inf


# ----------------------------------------------------------------------------------------- dispatch
def test_auto_picks_torch_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the kernel must not run for CPU tensors under backend='auto'")

    monkeypatch.setattr(K, "verify_triton", boom)
    q, p, x, temp, seeds = make_case(5, 100, torch.bfloat16)
    v = verify_stats(q, p, x, temp, seeds)
    assert isinstance(v, VerifyStats)
    want = dispatched(run_reference(q, p, x, temp, seeds), temp)
    for name in K.FIELDS:
        assert torch.equal(getattr(v, name), want[name]), name


def test_triton_backend_forces_kernel(monkeypatch):
    calls = []
    real = K.verify_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "verify_triton", spy)
    q, p, x, temp, seeds = make_case(3, 400, torch.float32, seed=7)
    v = verify_stats(q, p, x, temp, seeds, backend="triton")
    assert calls == [1]
    assert_same({n: getattr(v, n) for n in K.FIELDS}, dispatched(run_reference(q, p, x, temp, seeds), temp))


def test_dispatch_validation():
    q = torch.zeros(2, 10)
    x = torch.zeros(2, dtype=torch.int64)
    t = torch.ones(2)
    with pytest.raises(ValueError):
        verify_stats(q, torch.zeros(2, 11), x, t, x)
    with pytest.raises(ValueError):
        verify_stats(q, q, torch.zeros(3, dtype=torch.int64), t, x)
    with pytest.raises(ValueError):
        verify_stats(q, q, x, t, x, backend="bogus")
    with pytest.raises(ValueError):
        verify_stats(q.double(), q, x, t, x)
    v = verify_stats(q, q, x, 0.5, x)  # one float temperature for all rows
    assert v.tv.shape == (2,)
