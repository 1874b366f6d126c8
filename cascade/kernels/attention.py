"""Cache attention kernel: queries of a few new positions per row attend over that row's KV cache in place.

Terms: the runner's cache of one layer is ``k_cache, v_cache: [R, Hkv, L, D]`` (``R`` rows, ``Hkv`` KV heads,
``L = max_len`` positions, head dim ``D``). A batch of ``B`` rows, each with ``n`` query slots: slot ``t``
of batch entry ``b`` is the token at position ``start[b] + t`` of cache row ``rows[b]``, whose K / V the
caller has already written. It attends causally over positions ``0 .. start[b] + t`` of that row. Slots
``t >= n_valid[b]`` are padding (a graph's static shape): their output is zeros. GQA: the ``g = H / Hkv``
query heads that share a KV head are one program, so each K / V tile is read once for all of them.

Why a kernel: a CUDA graph needs static shapes, and gathering each row's K / V up to ``max_len`` before
SDPA (what the captured decode step did) costs ``B * max_len`` reads and writes per layer whatever the
context. Here the loop over key tiles stops at the row's own length, read from device memory, so a
captured step's attention costs what the live context costs, and no K / V is copied.

One program per (batch entry, query slot, KV head); it walks the key tiles of ``BLOCK_L`` positions with
an online softmax (running max ``m``, running sum ``s``, running output ``acc`` per query head), fp32 math,
K / V read in the cache's dtype. Where that gives too few programs to fill a GPU (batch 1, a long
context), the keys are split into ranges, one program each, and a second kernel combines the partial
softmaxes (split-K, ``num_splits``); both kernels share one online-softmax body (``_attend``). ``cache_attention_reference`` is the torch implementation of the same
semantics (the CPU path, and what the tests compare the kernel with under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math

import torch

try:  # the torch reference below must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on triton-less installs
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _attend(q, k_ptr, v_ptr, base, lo, hi, d_idx, d_ok,
                G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_L: tl.constexpr):
        """Online softmax of ``q [G_PAD, D_PAD]`` (pre-scaled, fp32) over keys ``lo .. hi - 1`` of one cache row
        and KV head (``base``: its offset). Returns the running max ``m [G_PAD]``, sum ``s [G_PAD]`` and
        unnormalised output ``acc [G_PAD, D_PAD]``; an empty range gives m = -inf, s = 0, acc = 0."""
        m = tl.full((G_PAD,), float("-inf"), tl.float32)
        s = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), tl.float32)
        for l0 in range(lo, hi, BLOCK_L):
            l_idx = l0 + tl.arange(0, BLOCK_L)
            l_ok = l_idx < hi
            kv_off = base + l_idx[:, None] * D + d_idx[None, :]
            kv_mask = l_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_L, D_PAD]
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G_PAD, BLOCK_L]
            scores = tl.where(l_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        return m, s, acc

    @triton.jit
    def _slot(n, H, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
        """This program's query slot and KV head: (batch entry b, slot t, query heads ``head [G_PAD]`` as flat
        (b * n + t) * H + h indices, their mask, ``d_idx [D_PAD]`` and its mask)."""
        bt = tl.program_id(0)  # b * n + t
        kvh = tl.program_id(1)
        g_idx = tl.arange(0, G_PAD)
        d_idx = tl.arange(0, D_PAD)
        return bt // n, bt % n, bt * H + kvh * G + g_idx, g_idx < G, d_idx, d_idx < D, kvh

    @triton.jit
    def _cache_attention_kernel(
        q_ptr,  # [B, n, H, D] contiguous, any float dtype
        k_ptr, v_ptr,  # [R, Hkv, L, D] contiguous, the cache's dtype
        rows_ptr, start_ptr, nvalid_ptr,  # [B] int64
        out_ptr,  # [B, n, H, D] contiguous, q's dtype
        n, H, Hkv, L, scale,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        b, t, head, g_ok, d_idx, d_ok, kvh = _slot(n, H, G, G_PAD, D, D_PAD)
        q_off = head[:, None] * D + d_idx[None, :]
        out_mask = g_ok[:, None] & d_ok[None, :]
        valid = t < tl.load(nvalid_ptr + b)
        if valid:
            row = tl.load(rows_ptr + b)
            end = tl.load(start_ptr + b) + t + 1  # keys 0 .. end - 1
            q = tl.load(q_ptr + q_off, mask=out_mask, other=0.0).to(tl.float32) * scale  # [G_PAD, D_PAD]
            m, s, acc = _attend(q, k_ptr, v_ptr, (row * Hkv + kvh) * L * D, 0, end, d_idx, d_ok,
                                G_PAD=G_PAD, D=D, D_PAD=D_PAD, BLOCK_L=BLOCK_L)
            out = acc / s[:, None]
        else:
            out = tl.zeros((G_PAD, D_PAD), tl.float32)
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _cache_attention_split_kernel(
        q_ptr, k_ptr, v_ptr, rows_ptr, start_ptr, nvalid_ptr,  # as _cache_attention_kernel
        m_ptr, s_ptr,  # [B * n * H, S] fp32: each split's running max and sum
        acc_ptr,  # [B * n * H, S, D] fp32: each split's unnormalised output
        n, H, Hkv, L, scale, S, CHUNK,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        b, t, head, g_ok, d_idx, d_ok, kvh = _slot(n, H, G, G_PAD, D, D_PAD)
        sp = tl.program_id(2)  # this program's split: keys sp * CHUNK .. (sp + 1) * CHUNK - 1
        q_off = head[:, None] * D + d_idx[None, :]
        q_mask = g_ok[:, None] & d_ok[None, :]
        end = tl.load(start_ptr + b) + t + 1
        lo = sp * CHUNK
        hi = tl.minimum(lo + CHUNK, end)
        if (t < tl.load(nvalid_ptr + b)) & (lo < end):
            row = tl.load(rows_ptr + b)
            q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32) * scale
            m, s, acc = _attend(q, k_ptr, v_ptr, (row * Hkv + kvh) * L * D, lo, hi, d_idx, d_ok,
                                G_PAD=G_PAD, D=D, D_PAD=D_PAD, BLOCK_L=BLOCK_L)
        else:  # a padding slot, or a split past the row's keys: contributes nothing
            m = tl.full((G_PAD,), float("-inf"), tl.float32)
            s = tl.zeros((G_PAD,), tl.float32)
            acc = tl.zeros((G_PAD, D_PAD), tl.float32)
        tl.store(m_ptr + head * S + sp, m, mask=g_ok)
        tl.store(s_ptr + head * S + sp, s, mask=g_ok)
        tl.store(acc_ptr + (head[:, None] * S + sp) * D + d_idx[None, :], acc, mask=q_mask)

    @triton.jit
    def _combine_splits_kernel(
        m_ptr, s_ptr, acc_ptr,  # the split kernel's partials
        out_ptr,  # [B, n, H, D] contiguous, q's dtype
        S, D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
    ):
        head = tl.program_id(0)  # (b * n + t) * H + h
        sp = tl.arange(0, S_PAD)
        s_ok = sp < S
        d_idx = tl.arange(0, D_PAD)
        d_ok = d_idx < D
        m = tl.load(m_ptr + head * S + sp, mask=s_ok, other=float("-inf"))
        s = tl.load(s_ptr + head * S + sp, mask=s_ok, other=0.0)
        acc = tl.load(acc_ptr + (head * S + sp[:, None]) * D + d_idx[None, :], mask=s_ok[:, None] & d_ok[None, :],
                      other=0.0)  # [S_PAD, D_PAD]
        m_all = tl.max(m, axis=0)
        m_all = tl.where(m_all > float("-inf"), m_all, 0.0)  # a padding slot has no keys at all: no inf - inf
        w = tl.exp(m - m_all)  # each split's weight; exp(-inf) = 0 for empty ones
        total = tl.sum(w * s, axis=0)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)  # a padding slot: zeros
        tl.store(out_ptr + head * D + d_idx, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _check(q, k_cache, v_cache, rows, start, n_valid):
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [B, n, H, D] and the caches [R, Hkv, L, D], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, _, H, D = q.shape
    if k_cache.shape[3] != D or H % k_cache.shape[1] != 0:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)} (head dim, GQA groups)")
    for name, x in (("rows", rows), ("start", start), ("n_valid", n_valid)):
        if tuple(x.shape) != (B,):
            raise ValueError(f"{name} must be [{B}], got {tuple(x.shape)}")


def num_splits(programs: int, L: int, block_l: int, device: torch.device) -> int:
    """How many key ranges a row is split into (flash-decoding): enough programs to fill the device (twice
    its streaming multiprocessors) when the batch alone does not, at most one per key tile; 1 off CUDA.
    Depends on static shapes only, so a captured graph keeps its split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(math.ceil(L / block_l), math.ceil(2 * sms / max(1, programs))))


def cache_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                           start: torch.Tensor, n_valid: torch.Tensor, *, block_l: int = 64,
                           splits: int | None = None) -> torch.Tensor:
    """The kernel's launcher (no host sync: every size it reads from the batch lives on the device).
    q: [B, n, H, D]; caches: [R, Hkv, L, D]; rows, start, n_valid: [B] int64 -> [B, n, H, D] in q's dtype.

    ``splits``: key ranges per row (None: ``num_splits``). With more than one, each (slot, KV head, range)
    is a program writing a partial softmax, and a second kernel combines them (split-K, as flash-decoding
    does): at batch 1 a decode step has only ``Hkv`` programs otherwise, which leaves most of a GPU idle
    on a long context. Each range is ``CHUNK`` positions, a multiple of ``block_l``; ranges past a row's
    length cost a store."""
    _check(q, k_cache, v_cache, rows, start, n_valid)
    B, n, H, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    q = q.contiguous()
    out = torch.empty_like(q)
    consts = dict(G=G, G_PAD=max(triton.next_power_of_2(G), 1), D=D, D_PAD=triton.next_power_of_2(D), BLOCK_L=block_l)
    splits = num_splits(B * n * Hkv, L, block_l, q.device) if splits is None else splits
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    chunk = math.ceil(math.ceil(L / splits) / block_l) * block_l
    splits = math.ceil(L / chunk)  # no empty trailing range
    if splits == 1:
        _cache_attention_kernel[(B * n, Hkv)](q, k_cache, v_cache, rows, start, n_valid, out, n, H, Hkv, L,
                                              1.0 / math.sqrt(D), **consts)
        return out
    m = torch.empty(B * n * H, splits, device=q.device, dtype=torch.float32)
    s = torch.empty_like(m)
    acc = torch.empty(B * n * H, splits, D, device=q.device, dtype=torch.float32)
    _cache_attention_split_kernel[(B * n, Hkv, splits)](q, k_cache, v_cache, rows, start, n_valid, m, s, acc, n, H,
                                                        Hkv, L, 1.0 / math.sqrt(D), splits, chunk, **consts)
    _combine_splits_kernel[(B * n * H,)](m, s, acc, out, splits, D=D, D_PAD=consts["D_PAD"],
                                         S_PAD=triton.next_power_of_2(splits))
    return out


def cache_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                              start: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """Torch implementation of the kernel's semantics (fp32 math). Same arguments and result."""
    _check(q, k_cache, v_cache, rows, start, n_valid)
    B, n, H, D = q.shape
    Hkv = k_cache.shape[1]
    G = H // Hkv
    out = torch.zeros_like(q)
    for b, (r, s0, nv) in enumerate(zip(rows.tolist(), start.tolist(), n_valid.tolist())):
        if nv <= 0:
            continue
        end = s0 + nv
        k = k_cache[r, :, :end].float()  # [Hkv, end, D]
        v = v_cache[r, :, :end].float()
        qb = q[b, :nv].float().view(nv, Hkv, G, D).permute(1, 2, 0, 3)  # [Hkv, G, nv, D]
        scores = torch.einsum("hgtd,hld->hgtl", qb, k) / math.sqrt(D)
        pos = torch.arange(s0, end, device=q.device).view(1, 1, nv, 1)
        scores = scores.masked_fill(torch.arange(end, device=q.device).view(1, 1, 1, end) > pos, float("-inf"))
        o = torch.einsum("hgtl,hld->hgtd", torch.softmax(scores, dim=-1), v)  # [Hkv, G, nv, D]
        out[b, :nv] = o.permute(2, 0, 1, 3).reshape(nv, H, D).to(q.dtype)
    return out


def cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                    start: torch.Tensor, n_valid: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """The one dispatch point: the Triton kernel on CUDA tensors (or with ``backend="triton"`` under
    ``TRITON_INTERPRET=1``), the torch reference otherwise. Arguments as ``cache_attention_triton``."""
    from cascade.confidence import resolve_backend

    if resolve_backend(backend, q) == "triton":
        return cache_attention_triton(q, k_cache, v_cache, rows, start, n_valid)
    return cache_attention_reference(q, k_cache, v_cache, rows, start, n_valid)
