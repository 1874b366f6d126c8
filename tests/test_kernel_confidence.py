"""Confidence kernel: Triton (through the interpreter, TRITON_INTERPRET=1 from conftest) vs the torch
reference, the reference vs an independent float64 computation, and the dispatch in cascade.confidence.

The interpreter runs every program in numpy, so tests use wide tiles (block_v) and few large cases."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from cascade.confidence import ConfidenceStats, confidence_stats, inverse_temperature, resolve_backend
from cascade.kernels import confidence as K
from cascade.kernels.splits import DEFAULT_NUM_SMS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOAT_FIELDS = ("max_prob", "margin", "entropy", "logsumexp", "token_logprob")
TEMPS = [1.0, 0.0, 0.7, 1.5, -1.0, 0.3, 2.0]  # 0 and -1: greedy rows, treated as T = 1


def make_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[rows, vocab] logits with varied shapes: peaky and flat rows, rows with -inf (top-k / top-p
    removed tokens), a row whose maximum is tied, and a row with a single finite entry."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([6.0, 1.0, 0.3, 3.0, 10.0])[torch.arange(rows) % 5][:, None]
    x = torch.randn(rows, vocab, generator=g) * scale
    for r in range(rows):
        kind = r % 4
        if kind == 1 and vocab > 2:  # top-k / top-p style masking, keeps the row's max
            drop = torch.rand(vocab, generator=g) < 0.4
            drop[x[r].argmax()] = False
            x[r, drop] = float("-inf")
        elif kind == 2 and vocab > 3:  # tied maximum at two positions
            i, j = vocab // 3, vocab - 2
            x[r, i] = x[r, j] = x[r].max() + 1.0
        elif kind == 3 and r % 8 == 3:  # a single finite token (top-k = 1)
            keep = int(torch.randint(vocab, (1,), generator=g))
            x[r] = float("-inf")
            x[r, keep] = 2.5
    return x.to(dtype)


def make_temps(rows: int) -> torch.Tensor:
    return torch.tensor([TEMPS[r % len(TEMPS)] for r in range(rows)], dtype=torch.float32)


def make_tokens(logits: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """[R] int64: mostly a finite-logit token; every 5th row an arbitrary one (possibly -inf)."""
    g = torch.Generator().manual_seed(seed)
    R, V = logits.shape
    tokens = torch.randint(V, (R,), generator=g)
    finite = torch.isfinite(logits.float())
    for r in range(R):
        if r % 5 != 4:
            idx = finite[r].nonzero()[:, 0]
            tokens[r] = idx[torch.randint(len(idx), (1,), generator=g)]
    return tokens


def naive_confidence(logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor | None) -> dict:
    """Independent float64 computation with torch.softmax / log_softmax / topk / numpy argmax."""
    t = temperature.double()
    t = torch.where(t > 0, t, torch.ones_like(t))
    z = logits.double() / t[:, None]
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    top = p.topk(min(2, p.shape[1]), dim=-1).values
    second = top[:, 1] if p.shape[1] > 1 else torch.zeros_like(top[:, 0])
    return {
        "argmax": torch.from_numpy(np.argmax(logits.float().numpy(), axis=1)).to(torch.int64),
        "max_prob": top[:, 0],
        "margin": top[:, 0] - second,
        "entropy": -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1),
        "logsumexp": torch.logsumexp(z, dim=-1),
        "token_logprob": (logp.gather(1, tokens[:, None])[:, 0] if tokens is not None
                          else torch.zeros(len(logits), dtype=torch.float64)),
    }


def assert_stats_close(got: dict, want: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert torch.equal(got["argmax"].cpu(), want["argmax"].cpu()), "argmax differs"
    for name in FLOAT_FIELDS:
        g = got[name].cpu()
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), want[name].cpu().double(), rtol=rtol, atol=atol, msg=name)


# ----------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 2), (8, 1000), (9, 1001), (2, 151936)])
def test_reference_matches_naive(dtype, rows, vocab):
    logits = make_logits(rows, vocab, dtype)
    temps, tokens = make_temps(rows), make_tokens(logits)
    got = K.confidence_reference(logits, inverse_temperature(temps, rows, "cpu"), tokens)
    # vs float64 on the same (already rounded) logits: only fp32 rounding of the reference remains
    assert_stats_close(got, naive_confidence(logits, temps, tokens), rtol=2e-5, atol=2e-6)


def test_reference_edge_cases():
    logits = torch.tensor([[0.0, 3.0, 3.0, -1.0],  # tied max: first index, margin 0
                           [float("-inf"), 5.0, float("-inf"), float("-inf")],  # one finite token
                           [1.0, 1.0, 1.0, 1.0]])  # uniform
    got = K.confidence_reference(logits, torch.ones(3), torch.tensor([1, 0, 3]))
    assert got["argmax"].tolist() == [1, 1, 0]
    assert got["margin"][0] == 0.0
    assert got["max_prob"][1] == 1.0 and got["margin"][1] == 1.0 and got["entropy"][1] == 0.0
    assert got["token_logprob"][1] == float("-inf")
    torch.testing.assert_close(got["entropy"][2], torch.tensor(float(np.log(4.0))))
    torch.testing.assert_close(got["max_prob"][2], torch.tensor(0.25))


# ----------------------------------------------------------------------------------------- kernel
# (rows, vocab, num_splits, block_v): num_splits 1 = one program per row, > 1 = split + combine, None = auto
KERNEL_CASES = [
    (1, 1000, 1, 1024),
    (1, 1000, 3, 256),
    (7, 1001, 1, 1024),
    (7, 1001, 4, 256),
    (7, 151936, 1, 32768),
    (7, 151936, 5, 16384),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab,num_splits,block_v", KERNEL_CASES)
def test_kernel_matches_reference(dtype, rows, vocab, num_splits, block_v):
    logits = make_logits(rows, vocab, dtype, seed=rows + vocab)
    temps, tokens = make_temps(rows), make_tokens(logits)
    inv_t = inverse_temperature(temps, rows, "cpu")
    got = K.confidence_triton(logits, inv_t, tokens, block_v=block_v, num_splits=num_splits)
    assert_stats_close(got, K.confidence_reference(logits, inv_t, tokens))


@pytest.mark.parametrize("dtype,num_splits,block_v", [
    (torch.float32, 1, 1024),  # the large-R branch
    (torch.bfloat16, 2, 512),  # split
    (torch.float16, None, 1024),  # auto
])
def test_kernel_many_rows(dtype, num_splits, block_v):
    rows, vocab = 300, 1000
    logits = make_logits(rows, vocab, dtype, seed=3)
    temps, tokens = make_temps(rows), make_tokens(logits)
    inv_t = inverse_temperature(temps, rows, "cpu")
    got = K.confidence_triton(logits, inv_t, tokens, block_v=block_v, num_splits=num_splits)
    assert_stats_close(got, K.confidence_reference(logits, inv_t, tokens))


def test_kernel_auto_split_real_vocab():
    logits = make_logits(1, 151936, torch.bfloat16, seed=4)
    inv_t = torch.tensor([1.0 / 0.7])
    tokens = make_tokens(logits)
    assert K.choose_num_splits(1, 151936, 8192, DEFAULT_NUM_SMS) > 1
    got = K.confidence_triton(logits, inv_t, tokens, block_v=8192)
    assert_stats_close(got, K.confidence_reference(logits, inv_t, tokens))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_without_tokens_and_strided_rows(num_splits):
    wide = torch.randn(5, 1500) * 4
    logits = wide[:, 100:1100]  # row stride 1500 != V, unit column stride: read in place
    inv_t = inverse_temperature(make_temps(5), 5, "cpu")
    got = K.confidence_triton(logits, inv_t, None, block_v=256, num_splits=num_splits)
    assert torch.equal(got["token_logprob"], torch.zeros(5))
    assert_stats_close(got, K.confidence_reference(logits.contiguous(), inv_t, None))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_kernel_edge_rows(num_splits):
    logits = torch.full((3, 300), float("-inf"))
    logits[0, 7] = 1.0  # single finite token
    logits[1, 10] = logits[1, 290] = 4.0  # tied max in different splits
    logits[1, 11] = 3.0
    logits[2] = torch.linspace(-3, 3, 300)
    tokens = torch.tensor([7, 290, 0])
    got = K.confidence_triton(logits, torch.ones(3), tokens, block_v=128, num_splits=num_splits)
    assert got["argmax"].tolist() == [7, 10, 299]
    assert got["max_prob"][0] == 1.0 and got["entropy"][0] == 0.0 and got["token_logprob"][0] == 0.0
    assert got["margin"][1] == 0.0
    assert_stats_close(got, K.confidence_reference(logits, torch.ones(3), tokens))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees log(0) of the bad row
@pytest.mark.parametrize("num_splits", [1, 2])
def test_all_masked_row_gives_valid_argmax(num_splits):
    # invalid input (no finite logit): the stats are undefined, but the argmax stays a valid token id
    logits = torch.full((2, 300), float("-inf"))
    logits[1, 5] = 0.0
    got = K.confidence_triton(logits, torch.ones(2), None, block_v=128, num_splits=num_splits)
    assert got["argmax"].tolist() == [0, 5]
    assert K.confidence_reference(logits, torch.ones(2), None)["argmax"].tolist() == [0, 5]


def test_kernel_zero_rows():
    got = K.confidence_triton(torch.empty(0, 1000, dtype=torch.bfloat16), torch.empty(0), torch.empty(0, dtype=torch.int64))
    assert all(v.shape == (0,) for v in got.values())


def test_choose_num_splits():
    # small batch: split until ~4 programs per SM or one tile per split; large batch: one program per row
    assert K.choose_num_splits(8, 151936, 4096, 132) == 38
    assert K.choose_num_splits(256, 151936, 4096, 132) == 3
    assert K.choose_num_splits(4096, 151936, 4096, 132) == 1
    assert K.choose_num_splits(1, 1000, 1024, 132) == 1
    chunk, splits = K.split_layout(151936, 4096, 66)
    assert chunk % 4096 == 0 and (splits - 1) * chunk < 151936 <= splits * chunk


# ----------------------------------------------------------------------------------------- dispatch
def test_auto_picks_torch_on_cpu(monkeypatch):
    assert resolve_backend("auto", torch.zeros(1)) == "torch"

    def boom(*args, **kwargs):
        raise AssertionError("the kernel must not run for CPU tensors under backend='auto'")

    monkeypatch.setattr(K, "confidence_triton", boom)
    logits = make_logits(4, 100, torch.bfloat16)
    tokens = make_tokens(logits)
    stats = confidence_stats(logits, make_temps(4), tokens)
    assert isinstance(stats, ConfidenceStats)
    want = K.confidence_reference(logits, inverse_temperature(make_temps(4), 4, "cpu"), tokens)
    for name, value in want.items():
        assert torch.equal(getattr(stats, name), value), name


def test_triton_backend_forces_kernel(monkeypatch):
    calls = []
    real = K.confidence_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "confidence_triton", spy)
    logits = make_logits(3, 500, torch.float32)
    stats = confidence_stats(logits, 0.8, backend="triton")
    assert calls == [1]
    assert stats.argmax.dtype == torch.int64 and stats.max_prob.dtype == torch.float32
    want = K.confidence_reference(logits, torch.full((3,), 1 / 0.8), None)
    assert_stats_close({n: getattr(stats, n) for n in K.FIELDS}, want)


def test_scalar_and_greedy_temperature():
    logits = make_logits(4, 64, torch.float32)
    a = confidence_stats(logits, 0.0)  # greedy: stats of T = 1
    b = confidence_stats(logits, torch.ones(4))
    assert torch.equal(a.entropy, b.entropy) and torch.equal(a.logsumexp, b.logsumexp)
    c = confidence_stats(logits, 2.0)
    assert (c.entropy >= b.entropy - 1e-6).all()  # a higher temperature flattens the distribution


def test_zero_rows_dispatch():
    stats = confidence_stats(torch.empty(0, 1000), torch.empty(0), torch.empty(0, dtype=torch.int64))
    assert stats.argmax.shape == (0,) and stats.entropy.shape == (0,)


def test_dispatch_validation(monkeypatch):
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError):
        confidence_stats(logits, backend="cuda")
    with pytest.raises(ValueError):
        confidence_stats(torch.zeros(10))
    with pytest.raises(ValueError):
        confidence_stats(logits.double())
    with pytest.raises(ValueError):
        confidence_stats(logits, torch.ones(3))
    with pytest.raises(ValueError):
        confidence_stats(logits, tokens=torch.zeros(3, dtype=torch.int64))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError):
        confidence_stats(logits, backend="triton")


def test_import_has_no_triton_side_effect():
    """Importing the package and the dispatch modules must not import triton; with triton missing the
    torch path still works."""
    code = (
        "import sys\n"
        "import cascade, cascade.confidence, cascade.verification\n"
        "assert 'triton' not in sys.modules, 'triton imported at import time'\n"
        "assert 'cascade.kernels.confidence' not in sys.modules\n"
        "sys.modules['triton'] = None  # make `import triton` fail from here on\n"
        "import torch\n"
        "from cascade.confidence import confidence_stats\n"
        "from cascade.verification import verify_stats\n"
        "s = confidence_stats(torch.randn(2, 50), 1.0)\n"
        "v = verify_stats(torch.randn(2, 50), torch.randn(2, 50), torch.tensor([1, 2]), torch.tensor([0.0, 1.0]),\n"
        "                 torch.tensor([3, 4]))\n"
        "assert s.argmax.shape == (2,) and v.target_token.shape == (2,)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
