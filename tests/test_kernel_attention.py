"""The cache attention kernel (``cascade.kernels.attention``) against its torch reference, through the
Triton interpreter, for every dtype and shape branch (GQA group 1 / a power of two / a padded odd group,
head dims 64 and 128 and a padded 48, one query slot and several, padding slots, rows longer than one key
tile); the split-K launch (key ranges per row combined by a second kernel) likewise, with ranges past a
row's keys; and the reference against plain masked SDPA over each row's live keys."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cascade.kernels.attention import cache_attention_reference, cache_attention_triton, num_splits

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def case(B, n, H, Hkv, D, L=150, R=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n, H, D, generator=g).to(dtype)
    k = torch.randn(R, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(R, Hkv, L, D, generator=g).to(dtype)
    rows = torch.randperm(R, generator=g)[:B].long()
    start = torch.randint(0, L - n, (B,), generator=g).long()
    start[0] = L - n  # one row up to the cache's end (several key tiles)
    n_valid = torch.randint(0, n + 1, (B,), generator=g).long()
    n_valid[0] = n
    return q, k, v, rows, start, n_valid


SHAPES = [  # (B, n, H, Hkv, D)
    (3, 1, 4, 4, 64),    # no GQA, decode
    (4, 1, 14, 2, 64),   # Qwen2.5 0.5B heads: a group of 7, padded to 8
    (2, 5, 12, 2, 128),  # Qwen2.5 1.5B heads, a verify block of 5
    (3, 4, 8, 2, 48),    # a head dim padded to 64
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}n{}H{}kv{}D{}".format(*s))
def test_kernel_equals_reference(shape, dtype):
    args = case(*shape, dtype=dtype)
    want = cache_attention_reference(*args).float()
    got = cache_attention_triton(*args).float()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    n_valid = args[5]
    for b in range(shape[0]):  # padding slots are zeros
        assert torch.count_nonzero(got[b, n_valid[b]:]) == 0


@pytest.mark.parametrize("block_l", [16, 64, 256])
def test_kernel_is_exact_at_tile_edges(block_l):
    args = case(2, 3, 4, 2, 64, L=block_l * 2 + 1)
    torch.testing.assert_close(cache_attention_triton(*args, block_l=block_l), cache_attention_reference(*args),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}n{}H{}kv{}D{}".format(*s))
def test_split_kernel_equals_reference(shape, splits):
    # L = 150 with 16-position tiles: 2 splits are ranges of 80 + 70 keys, 3 of 64 + 64 + 22, 7 of 32 (the last
    # 22); rows start anywhere, so many ranges lie past a row's keys and padding slots meet every split
    args = case(*shape)
    want = cache_attention_reference(*args)
    got = cache_attention_triton(*args, block_l=16, splits=splits)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for b in range(shape[0]):
        assert torch.count_nonzero(got[b, args[5][b]:]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_split_kernel_in_half_precision(dtype):
    args = case(4, 1, 14, 2, 64, L=300, dtype=dtype)
    torch.testing.assert_close(cache_attention_triton(*args, splits=4).float(),
                               cache_attention_reference(*args).float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_split_count_is_static_and_bounded():
    assert num_splits(2, 2048, 64, torch.device("cpu")) == 1  # off CUDA the single-pass kernel runs
    args = case(2, 1, 4, 2, 64, L=100)
    # more splits than key tiles: capped at one range per tile, same result
    torch.testing.assert_close(cache_attention_triton(*args, block_l=64, splits=50), cache_attention_reference(*args),
                               atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="splits"):
        cache_attention_triton(*args, splits=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}n{}H{}kv{}D{}".format(*s))
def test_reference_equals_masked_sdpa(shape):
    q, k, v, rows, start, n_valid = case(*shape)
    out = cache_attention_reference(q, k, v, rows, start, n_valid)
    B, n, H, D = q.shape
    G = H // k.shape[1]
    for b in range(B):
        nv, s0 = int(n_valid[b]), int(start[b])
        if nv == 0:
            continue
        K = k[rows[b], :, : s0 + nv].repeat_interleave(G, dim=0)  # [H, Lk, D]
        V = v[rows[b], :, : s0 + nv].repeat_interleave(G, dim=0)
        mask = torch.arange(s0 + nv).view(1, -1) <= torch.arange(s0, s0 + nv).view(-1, 1)  # [nv, Lk]
        want = F.scaled_dot_product_attention(q[b, :nv].transpose(0, 1), K, V, attn_mask=mask)  # [H, nv, D]
        torch.testing.assert_close(out[b, :nv], want.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_named():
    q, k, v, rows, start, n_valid = case(2, 1, 4, 2, 64)
    with pytest.raises(ValueError, match="rows must be"):
        cache_attention_reference(q, k, v, rows[:1], start, n_valid)
    with pytest.raises(ValueError, match="does not fit the cache"):
        cache_attention_triton(q[..., :32], k, v, rows, start, n_valid)
    assert math.isfinite(float(cache_attention_reference(q, k, v, rows, start, n_valid).sum()))
