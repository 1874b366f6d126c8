"""Verify kernel: the fused statistics of escalated positions, from the draft's and the target's logits.

Terms (one row ``r`` = one verified position; ``V`` = vocabulary size):

- ``q`` / ``p``: the draft / target distributions over the vocabulary at that position, from logits
  ``[R, V]`` that may hold ``-inf`` (tokens removed by top-k / top-p); ``x = draft_tokens[r]`` is the token
  the draft sampled there; ``T = temperature[r]`` (0 = a greedy row).
- rule statistics (what deferral rules read): ``max_q``, ``max_p`` and the total variation
  ``tv = sum_v max(0, p(v) - q(v)) = 0.5 * ||p - q||_1``, all of ``softmax(logits / T)`` with ``T = 1`` for
  greedy rows; ``logp_token = log p(x)``, the log-softmax of the target logits at ``x`` at that same rule
  temperature (on greedy rows the natural ``T = 1`` log-prob, not ``log`` of the one-hot ``p_token``;
  ``-inf`` where the target's logit at ``x`` is ``-inf``).
- sampling distributions: ``softmax(logits / T)`` for ``T > 0``; for a greedy row the one-hot at the argmax
  (first index of the max logit). ``q_token = q(x)``, ``p_token = p(x)``, ``target_token`` is a draw from
  ``p`` and ``residual_token`` a draw from ``norm(max(0, p - q))`` (a draw from ``p`` where that mass is 0,
  i.e. ``p == q``). Greedy rows: ``q_token = 1[x == argmax q]``, ``p_token = 1[x == argmax p]``,
  ``residual_token = target_token = argmax p``.

Why the residual does not depend on the deferral rule ``delta``: the acceptance distribution is
``pi = (1 - delta) q + delta p``, so ``pi - q = delta (p - q)`` and ``norm(max(0, pi - q)) =
norm(max(0, p - q))`` for every ``delta > 0``. The rule ``delta`` and the acceptance probability
``min(1, pi(x) / q(x))`` are cheap ``[R]`` vector ops the policy does outside the kernel from these stats.

Sampling is an exponential race (the Gumbel-max trick in ratio form): with ``E_v ~ Exp(1)`` i.i.d.,
``argmax_v w(v) / E_v`` is ``v`` with probability ``w(v) / sum w`` (ties: first index). The noise is
counter-based and deterministic: ``E_v = -log1p(-u)``, ``u = (hash(noise_seed[r], v, stream) + 0.5) / 2^32``
from a 32-bit integer hash (lowbias32 twice, keyed per row and stream; stream 0: residual, 1: target).
Small ``E`` (the race winners) keep full relative precision: ``u`` has 32 random bits and ``log1p`` is
evaluated accurately (in the kernel as Goldberg's ``log(1 - u) * u / ((1 - u) - 1)``). The kernel (uint32
arithmetic) and the reference (numpy uint32 on CPU, overflow-free int64 torch elsewhere) compute the same
hash, so both give the same tokens for the same seeds (up to genuine float near-ties).

Kernel branches (chosen by ``choose_num_splits`` from R and V, overridable with ``num_splits``):

- one program per row, one launch: pass 1 over the vocabulary for both rows (online max / sum-exp /
  argmax), pass 2 for ``tv``, the two Gumbel-argmaxes, then ``q(x)``, ``p(x)``;
- split (flash-decoding style), three launches over a ``[R, num_splits]`` grid: pass-1 partials to a
  workspace; pass 2 per chunk (each program first merges the row's pass-1 partials, a few scalars) writing
  partial ``tv`` and per-chunk race winners; a one-program-per-row combine that finalises.

Both branches finalise a row the same way: ``p(x)`` and ``log p(x) = (z_x - M_p) / T - log S_p`` from the
target's merged max / sum-exp and its logit at ``x`` (one extra load per row).

Inputs are read in their own dtype (fp32 / bf16 / fp16), math is fp32. ``verify_reference`` is the torch
implementation of these semantics (the CPU path of ``cascade.verification``).
"""

from __future__ import annotations


import numpy as np
import torch

from cascade.kernels.splits import choose_num_splits, num_sms, split_layout

try:  # the torch reference below must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on triton-less installs
    triton = None
    tl = None

FIELDS = ("q_token", "p_token", "max_q", "max_p", "tv", "logp_token", "residual_token", "target_token")
_FLOAT_FIELDS = FIELDS[:6]  # packed as rows of one [6, R] fp32 output
_INT_FIELDS = FIELDS[6:]  # packed as rows of one [2, R] int64 output
RESIDUAL_STREAM, TARGET_STREAM = 0, 1
_SALTS = (0x9E3779B9, 0x85EBCA6B)  # per-stream salt of the row key
_ROW_CHUNK_ELEMS = 1 << 21  # torch reference: rows per chunk * V stays below this (bounds temporaries)
_W_MAX = 1.0 - 2.0**-24  # largest fp32 below 1


# ----------------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _hash32(x):
        """lowbias32 integer hash (C. Wellons); x: uint32 (any shape) -> uint32."""
        x ^= x >> 16
        x *= 0x7FEB352D
        x ^= x >> 15
        x *= 0x846CA68B
        x ^= x >> 16
        return x

    @triton.jit
    def _row_key(seed, SALT: tl.constexpr):
        """seed: int64 scalar >= 0 -> uint32 scalar key of one noise stream."""
        lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        hi = (seed >> 32).to(tl.uint32)
        return _hash32(lo ^ _hash32(hi ^ SALT))

    @triton.jit
    def _exp_noise(key, idx):
        """key: uint32 scalar, idx: [BLOCK] int32 -> [BLOCK] fp32 Exp(1) noise, -log(1 - u)."""
        h = _hash32(_hash32(idx.to(tl.uint32) ^ key) + key)
        w = tl.minimum((h.to(tl.float32) + 0.5) * 2.3283064365386963e-10, 0.99999994)
        u = 1.0 - w  # -log1p(-w) = log(u) * w / (u - 1), exact to a few ulps (Goldberg); u == 1: w
        d = u - 1.0
        return tl.where(d == 0.0, w, tl.log(u) * w / tl.where(d == 0.0, -1.0, d))

    @triton.jit
    def _lse_update(x, idx, m, s, i1, inv_t):
        """Online max / sum-exp / argmax per lane. x: [BLOCK] fp32 (-inf = absent), idx: [BLOCK] int32;
        m, s: [BLOCK] fp32, i1: [BLOCK] int32 lane state; s = sum exp((x - m) * inv_t)."""
        valid = x > float("-inf")
        up = x > m
        xs = tl.where(valid, x, 0.0)
        ms = tl.where(m > float("-inf"), m, xs)
        e = tl.where(valid, tl.exp(tl.where(up, ms - xs, xs - ms) * inv_t), 0.0)
        s = tl.where(up, s * e + 1.0, s + e)
        i1 = tl.where(up, idx, i1)
        m = tl.where(up, x, m)
        return m, s, i1

    @triton.jit
    def _lse_merge(m, s, i1, inv_t):
        """[N] partial (m, s, argmax) -> scalars (M, S, I), S relative to M."""
        M = tl.max(m, axis=0)
        live = m > float("-inf")
        a = tl.where(live, tl.exp((m - tl.where(M > float("-inf"), M, 0.0)) * inv_t), 0.0)
        S = tl.sum(s * a, axis=0)
        I = tl.min(tl.where(live & (m == M), i1, 2147483647), axis=0)
        return M, S, I

    @triton.jit
    def _best_merge(b, bi):
        """[N] race partials (score, index) -> the best score and its first index."""
        B = tl.max(b, axis=0)
        return B, tl.min(tl.where(b == B, bi, 2147483647), axis=0)

    @triton.jit
    def _pass1(q_row, p_row, start, end, inv_t, BLOCK_V: tl.constexpr):
        """Scan [start, end) of both rows -> (Mq, Sq, Iq, Mp, Sp, Ip)."""
        offs = tl.arange(0, BLOCK_V)
        mq = tl.full([BLOCK_V], float("-inf"), tl.float32)
        mp = tl.full([BLOCK_V], float("-inf"), tl.float32)
        sq = tl.zeros([BLOCK_V], tl.float32)
        sp = tl.zeros([BLOCK_V], tl.float32)
        iq = tl.full([BLOCK_V], 2147483647, tl.int32)
        ip = tl.full([BLOCK_V], 2147483647, tl.int32)
        for off in range(start, end, BLOCK_V):
            idx = off + offs
            mask = idx < end
            xq = tl.load(q_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
            xp = tl.load(p_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
            mq, sq, iq = _lse_update(xq, idx, mq, sq, iq, inv_t)
            mp, sp, ip = _lse_update(xp, idx, mp, sp, ip, inv_t)
        Mq, Sq, Iq = _lse_merge(mq, sq, iq, inv_t)
        Mp, Sp, Ip = _lse_merge(mp, sp, ip, inv_t)
        return Mq, Sq, Iq, Mp, Sp, Ip

    @triton.jit
    def _pass2(q_row, p_row, start, end, inv_t, greedy, Mq, log_sq, Iq, Mp, log_sp, Ip, key_res, key_tgt,
               BLOCK_V: tl.constexpr):
        """Scan [start, end) of both rows with the normalisers known -> (tv, residual race best score,
        its index, target race best score, its index)."""
        offs = tl.arange(0, BLOCK_V)
        tv = tl.zeros([BLOCK_V], tl.float32)
        br = tl.full([BLOCK_V], -1.0, tl.float32)
        bt = tl.full([BLOCK_V], -1.0, tl.float32)
        bri = tl.full([BLOCK_V], 2147483647, tl.int32)
        bti = tl.full([BLOCK_V], 2147483647, tl.int32)
        for off in range(start, end, BLOCK_V):
            idx = off + offs
            mask = idx < end
            xq = tl.load(q_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
            xp = tl.load(p_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
            q1 = tl.exp((xq - Mq) * inv_t - log_sq)  # rule distribution (T = 1 on greedy rows)
            p1 = tl.exp((xp - Mp) * inv_t - log_sp)
            tv += tl.maximum(p1 - q1, 0.0)
            qs = tl.where(greedy, (idx == Iq).to(tl.float32), q1)  # sampling distribution
            ps = tl.where(greedy, (idx == Ip).to(tl.float32), p1)
            sr = tl.where(mask, tl.maximum(ps - qs, 0.0) / _exp_noise(key_res, idx), -1.0)
            st = tl.where(mask, ps / _exp_noise(key_tgt, idx), -1.0)
            ur = sr > br
            br = tl.where(ur, sr, br)
            bri = tl.where(ur, idx, bri)
            ut = st > bt
            bt = tl.where(ut, st, bt)
            bti = tl.where(ut, idx, bti)
        BR, BRI = _best_merge(br, bri)
        BT, BTI = _best_merge(bt, bti)
        return tl.sum(tv, axis=0), BR, BRI, BT, BTI

    @triton.jit
    def _finalize(row, R, q_row, p_row, tokens_ptr, out_ptr, tok_out_ptr, inv_t, greedy,
                  Mq, Sq, Iq, Mp, Sp, Ip, TV, BR, BRI, BT, BTI):
        """Write one row. out_ptr: [6, R] fp32 (q_token, p_token, max_q, max_p, tv, logp_token);
        tok_out_ptr: [2, R] int64 (residual_token, target_token)."""
        x = tl.load(tokens_ptr + row)
        xq = tl.load(q_row + x).to(tl.float32)
        xp = tl.load(p_row + x).to(tl.float32)
        q_x = tl.exp((xq - Mq) * inv_t - tl.log(Sq))
        logp_x = (xp - Mp) * inv_t - tl.log(Sp)  # rule temperature (T = 1 on greedy rows); -inf at a -inf logit
        p_x = tl.exp(logp_x)
        tl.store(out_ptr + row, tl.where(greedy, (x == Iq).to(tl.float32), q_x))
        tl.store(out_ptr + R + row, tl.where(greedy, (x == Ip).to(tl.float32), p_x))
        tl.store(out_ptr + 2 * R + row, 1.0 / Sq)
        tl.store(out_ptr + 3 * R + row, 1.0 / Sp)
        tl.store(out_ptr + 4 * R + row, TV)
        tl.store(out_ptr + 5 * R + row, logp_x)
        Ip = tl.where(Ip == 2147483647, 0, Ip)  # an all -inf row (invalid input) still yields a valid id
        BTI = tl.where(BTI == 2147483647, 0, BTI)
        target = tl.where(greedy, Ip, BTI)
        residual = tl.where(greedy, Ip, tl.where(BR > 0.0, BRI, target))  # zero residual mass: from p
        tl.store(tok_out_ptr + row, residual.to(tl.int64))
        tl.store(tok_out_ptr + R + row, target.to(tl.int64))

    @triton.jit
    def _verify_kernel(
        q_ptr,  # [R, V] draft logits fp32 | bf16 | fp16, unit column stride, row stride stride_q
        p_ptr,  # [R, V] target logits fp32 | bf16 | fp16, unit column stride, row stride stride_p
        tokens_ptr,  # [R] int64 draft tokens x
        temp_ptr,  # [R] fp32 temperature (<= 0: greedy row)
        inv_t_ptr,  # [R] fp32 1 / temperature (1 on greedy rows)
        seed_ptr,  # [R] int64 noise seeds >= 0
        out_ptr,  # [6, R] fp32 out
        tok_out_ptr,  # [2, R] int64 out
        R, V, stride_q, stride_p,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row, both passes."""
        row = tl.program_id(0).to(tl.int64)
        q_row = q_ptr + row * stride_q
        p_row = p_ptr + row * stride_p
        inv_t = tl.load(inv_t_ptr + row)
        greedy = tl.load(temp_ptr + row) <= 0.0
        seed = tl.load(seed_ptr + row)
        Mq, Sq, Iq, Mp, Sp, Ip = _pass1(q_row, p_row, 0, V, inv_t, BLOCK_V)
        TV, BR, BRI, BT, BTI = _pass2(q_row, p_row, 0, V, inv_t, greedy, Mq, tl.log(Sq), Iq, Mp, tl.log(Sp), Ip,
                                      _row_key(seed, 0x9E3779B9), _row_key(seed, 0x85EBCA6B), BLOCK_V)
        _finalize(row, R, q_row, p_row, tokens_ptr, out_ptr, tok_out_ptr, inv_t, greedy,
                  Mq, Sq, Iq, Mp, Sp, Ip, TV, BR, BRI, BT, BTI)

    @triton.jit
    def _load_pass1(ws1_ptr, ws1i_ptr, row, R, num_splits, inv_t, BLOCK_S: tl.constexpr):
        """Merge a row's pass-1 partials. ws1_ptr: [4, R, S] fp32 (Mq, Sq, Mp, Sp), ws1i_ptr: [2, R, S]
        int32 (Iq, Ip) -> (Mq, Sq, Iq, Mp, Sp, Ip)."""
        j = tl.arange(0, BLOCK_S)
        mask = j < num_splits
        k = row * num_splits + j
        plane = R * num_splits
        mq = tl.load(ws1_ptr + k, mask=mask, other=float("-inf"))
        sq = tl.load(ws1_ptr + plane + k, mask=mask, other=0.0)
        mp = tl.load(ws1_ptr + 2 * plane + k, mask=mask, other=float("-inf"))
        sp = tl.load(ws1_ptr + 3 * plane + k, mask=mask, other=0.0)
        iq = tl.load(ws1i_ptr + k, mask=mask, other=2147483647)
        ip = tl.load(ws1i_ptr + plane + k, mask=mask, other=2147483647)
        Mq, Sq, Iq = _lse_merge(mq, sq, iq, inv_t)
        Mp, Sp, Ip = _lse_merge(mp, sp, ip, inv_t)
        return Mq, Sq, Iq, Mp, Sp, Ip

    @triton.jit
    def _verify_pass1_kernel(
        q_ptr,  # [R, V] draft logits
        p_ptr,  # [R, V] target logits
        inv_t_ptr,  # [R] fp32
        ws1_ptr,  # [4, R, S] fp32 out: Mq, Sq, Mp, Sp per chunk
        ws1i_ptr,  # [2, R, S] int32 out: Iq, Ip per chunk
        R, V, stride_q, stride_p, chunk, num_splits,
        BLOCK_V: tl.constexpr,
    ):
        """Split branch, launch 1 of 3. Grid (R, S)."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        inv_t = tl.load(inv_t_ptr + row)
        start = split * chunk
        end = tl.minimum(start + chunk, V)
        Mq, Sq, Iq, Mp, Sp, Ip = _pass1(q_ptr + row * stride_q, p_ptr + row * stride_p, start, end, inv_t, BLOCK_V)
        k = row * num_splits + split
        plane = R * num_splits
        tl.store(ws1_ptr + k, Mq)
        tl.store(ws1_ptr + plane + k, Sq)
        tl.store(ws1_ptr + 2 * plane + k, Mp)
        tl.store(ws1_ptr + 3 * plane + k, Sp)
        tl.store(ws1i_ptr + k, Iq)
        tl.store(ws1i_ptr + plane + k, Ip)

    @triton.jit
    def _verify_pass2_kernel(
        q_ptr,  # [R, V] draft logits
        p_ptr,  # [R, V] target logits
        temp_ptr,  # [R] fp32 temperature
        inv_t_ptr,  # [R] fp32
        seed_ptr,  # [R] int64 noise seeds
        ws1_ptr,  # [4, R, S] fp32 pass-1 partials
        ws1i_ptr,  # [2, R, S] int32 pass-1 partials
        ws2_ptr,  # [3, R, S] fp32 out: tv, residual best score, target best score per chunk
        ws2i_ptr,  # [2, R, S] int32 out: residual best index, target best index per chunk
        R, V, stride_q, stride_p, chunk, num_splits,
        BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Split branch, launch 2 of 3. Grid (R, S)."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        inv_t = tl.load(inv_t_ptr + row)
        greedy = tl.load(temp_ptr + row) <= 0.0
        seed = tl.load(seed_ptr + row)
        Mq, Sq, Iq, Mp, Sp, Ip = _load_pass1(ws1_ptr, ws1i_ptr, row, R, num_splits, inv_t, BLOCK_S)
        start = split * chunk
        end = tl.minimum(start + chunk, V)
        TV, BR, BRI, BT, BTI = _pass2(q_ptr + row * stride_q, p_ptr + row * stride_p, start, end, inv_t, greedy,
                                      Mq, tl.log(Sq), Iq, Mp, tl.log(Sp), Ip,
                                      _row_key(seed, 0x9E3779B9), _row_key(seed, 0x85EBCA6B), BLOCK_V)
        k = row * num_splits + split
        plane = R * num_splits
        tl.store(ws2_ptr + k, TV)
        tl.store(ws2_ptr + plane + k, BR)
        tl.store(ws2_ptr + 2 * plane + k, BT)
        tl.store(ws2i_ptr + k, BRI)
        tl.store(ws2i_ptr + plane + k, BTI)

    @triton.jit
    def _verify_combine_kernel(
        q_ptr,  # [R, V] draft logits (only x's logit is read)
        p_ptr,  # [R, V] target logits (only x's logit is read)
        tokens_ptr,  # [R] int64 draft tokens
        temp_ptr,  # [R] fp32 temperature
        inv_t_ptr,  # [R] fp32
        ws1_ptr,  # [4, R, S] fp32 pass-1 partials
        ws1i_ptr,  # [2, R, S] int32 pass-1 partials
        ws2_ptr,  # [3, R, S] fp32 pass-2 partials
        ws2i_ptr,  # [2, R, S] int32 pass-2 partials
        out_ptr,  # [6, R] fp32 out
        tok_out_ptr,  # [2, R] int64 out
        R, stride_q, stride_p, num_splits,
        BLOCK_S: tl.constexpr,
    ):
        """Split branch, launch 3 of 3. Grid (R,)."""
        row = tl.program_id(0).to(tl.int64)
        inv_t = tl.load(inv_t_ptr + row)
        greedy = tl.load(temp_ptr + row) <= 0.0
        Mq, Sq, Iq, Mp, Sp, Ip = _load_pass1(ws1_ptr, ws1i_ptr, row, R, num_splits, inv_t, BLOCK_S)
        j = tl.arange(0, BLOCK_S)
        mask = j < num_splits
        k = row * num_splits + j
        plane = R * num_splits
        TV = tl.sum(tl.load(ws2_ptr + k, mask=mask, other=0.0), axis=0)
        BR, BRI = _best_merge(tl.load(ws2_ptr + plane + k, mask=mask, other=-1.0),
                              tl.load(ws2i_ptr + k, mask=mask, other=2147483647))
        BT, BTI = _best_merge(tl.load(ws2_ptr + 2 * plane + k, mask=mask, other=-1.0),
                              tl.load(ws2i_ptr + plane + k, mask=mask, other=2147483647))
        _finalize(row, R, q_ptr + row * stride_q, p_ptr + row * stride_p, tokens_ptr, out_ptr, tok_out_ptr, inv_t,
                  greedy, Mq, Sq, Iq, Mp, Sp, Ip, TV, BR, BRI, BT, BTI)


# ----------------------------------------------------------------------------------------- launcher
def default_block_v(dtype: torch.dtype) -> int:
    """Tile width: 4 KiB of each row's logits per tile (2048 16-bit or 1024 fp32 values)."""
    return 1024 if dtype == torch.float32 else 2048


def verify_triton(
    draft_logits: torch.Tensor,  # [R, V] fp32 | bf16 | fp16
    target_logits: torch.Tensor,  # [R, V] fp32 | bf16 | fp16
    draft_tokens: torch.Tensor,  # [R] int64
    temperature: torch.Tensor,  # [R] fp32, <= 0: greedy row
    inv_t: torch.Tensor,  # [R] fp32, 1 / temperature (1 on greedy rows)
    noise_seed: torch.Tensor,  # [R] int64 >= 0
    *,
    block_v: int | None = None,
    num_splits: int | None = None,  # None: choose_num_splits; 1: one program per row; > 1: split
    num_warps: int = 8,
) -> dict[str, torch.Tensor]:
    """Launch the verify kernel(s); returns the stats keyed by FIELDS ([R] tensors)."""
    if triton is None:
        raise RuntimeError("the Triton verify kernel needs the `triton` package")
    R, V = draft_logits.shape
    device = draft_logits.device
    out = torch.empty(6, R, dtype=torch.float32, device=device)
    tok_out = torch.empty(2, R, dtype=torch.int64, device=device)
    if R > 0:
        q = draft_logits if draft_logits.stride(1) == 1 else draft_logits.contiguous()
        p = target_logits if target_logits.stride(1) == 1 else target_logits.contiguous()
        x = draft_tokens.to(device=device, dtype=torch.int64).contiguous()
        temp = temperature.to(device=device, dtype=torch.float32).contiguous()
        inv_t = inv_t.to(device=device, dtype=torch.float32).contiguous()
        seed = noise_seed.to(device=device, dtype=torch.int64).contiguous()
        block_v = triton.next_power_of_2(block_v or default_block_v(q.dtype))
        if num_splits is None:
            num_splits = choose_num_splits(R, V, block_v, num_sms(device))
        chunk, num_splits = split_layout(V, block_v, num_splits)
        if num_splits == 1:
            _verify_kernel[(R,)](q, p, x, temp, inv_t, seed, out, tok_out, R, V, q.stride(0), p.stride(0),
                                 BLOCK_V=block_v, num_warps=num_warps)
        else:
            block_s = triton.next_power_of_2(num_splits)
            ws1 = torch.empty(4, R, num_splits, dtype=torch.float32, device=device)
            ws1i = torch.empty(2, R, num_splits, dtype=torch.int32, device=device)
            ws2 = torch.empty(3, R, num_splits, dtype=torch.float32, device=device)
            ws2i = torch.empty(2, R, num_splits, dtype=torch.int32, device=device)
            grid = (R, num_splits)
            _verify_pass1_kernel[grid](q, p, inv_t, ws1, ws1i, R, V, q.stride(0), p.stride(0), chunk, num_splits,
                                       BLOCK_V=block_v, num_warps=num_warps)
            _verify_pass2_kernel[grid](q, p, temp, inv_t, seed, ws1, ws1i, ws2, ws2i, R, V, q.stride(0), p.stride(0),
                                       chunk, num_splits, BLOCK_V=block_v, BLOCK_S=block_s, num_warps=num_warps)
            _verify_combine_kernel[(R,)](q, p, x, temp, inv_t, ws1, ws1i, ws2, ws2i, out, tok_out, R,
                                         q.stride(0), p.stride(0), num_splits, BLOCK_S=block_s, num_warps=1)
    return {**{n: out[i] for i, n in enumerate(_FLOAT_FIELDS)}, **{n: tok_out[i] for i, n in enumerate(_INT_FIELDS)}}


# ----------------------------------------------------------------------------------------- reference
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x and c in [0, 2^32), never overflowing int64."""
    if c < 2**31:
        return (x * c) & _M32
    return (x * (c - 2**31) + ((x & 1) << 31)) & _M32  # x * 2^31 mod 2^32 = (x & 1) << 31


def hash32_reference(x: torch.Tensor) -> torch.Tensor:
    """The kernel's lowbias32 hash on int64 tensors holding uint32 values (any device)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash32_numpy(x: np.ndarray) -> np.ndarray:
    """The same hash on a uint32 array (wrapping arithmetic), in place; the fast path for CPU tensors."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def row_keys_reference(noise_seed: torch.Tensor, stream: int) -> torch.Tensor:
    """noise_seed [n] int64 >= 0 -> [n] int64 (uint32 values): the kernel's per-row key of one stream."""
    seed = noise_seed.to(torch.int64)
    return hash32_reference((seed & _M32) ^ hash32_reference((seed >> 32) ^ _SALTS[stream]))


def exp_noise_at(keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise of vocabulary indices idx under row keys (broadcast together, int64) -> fp32."""
    if keys.device.type == "cpu":
        k = keys.numpy().astype(np.uint32)
        h = hash32_numpy(idx.numpy().astype(np.uint32) ^ k)
        h += k
        h = hash32_numpy(h)
        w = torch.from_numpy(h).to(torch.float32)
    else:
        h = hash32_reference((hash32_reference(idx ^ keys) + keys) & _M32)
        w = h.to(torch.float32)
    w = ((w + 0.5) * 2.0**-32).clamp_max_(_W_MAX)
    return torch.log1p(-w).neg_()


def exp_noise_reference(noise_seed: torch.Tensor, stream: int, vocab: int) -> torch.Tensor:
    """The kernel's noise: noise_seed [n] int64 >= 0 -> [n, vocab] fp32 Exp(1) draws of stream 0 / 1."""
    keys = row_keys_reference(noise_seed, stream)[:, None]  # [n, 1]
    return exp_noise_at(keys, torch.arange(vocab, dtype=torch.int64, device=keys.device)[None, :])


def _race(weights: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponential race: weights [n, V] >= 0, keys [n] -> (argmax_v weights / E_v [n] int64 (first index on
    ties), its score [n]). Noise is only generated where the weight is > 0 when that is a small part
    (top-k / top-p rows); elsewhere the score is 0, as in the kernel."""
    n, V = weights.shape
    live = weights > 0
    if live.sum().item() > 0.25 * n * V:
        idx = torch.arange(V, dtype=torch.int64, device=weights.device)[None, :]
        score = weights / exp_noise_at(keys[:, None], idx)
    else:
        r, c = live.nonzero(as_tuple=True)
        score = torch.zeros_like(weights)
        score[r, c] = weights[r, c] / exp_noise_at(keys[r], c)
    best = score.argmax(-1)
    return best, score.gather(1, best[:, None])[:, 0]


def verify_reference(
    draft_logits: torch.Tensor,  # [R, V] any float dtype
    target_logits: torch.Tensor,  # [R, V] any float dtype
    draft_tokens: torch.Tensor,  # [R] int64
    temperature: torch.Tensor,  # [R] fp32, <= 0: greedy row
    inv_t: torch.Tensor,  # [R] fp32, 1 / temperature (1 on greedy rows)
    noise_seed: torch.Tensor,  # [R] int64 >= 0
) -> dict[str, torch.Tensor]:
    """Torch implementation of the kernel's semantics; rows in chunks so temporaries stay small. The
    noise is only generated for non-greedy rows. Returns [R] tensors keyed by FIELDS."""
    R, V = draft_logits.shape
    device = draft_logits.device
    out = torch.empty(6, R, dtype=torch.float32, device=device)
    tok_out = torch.empty(2, R, dtype=torch.int64, device=device)
    inv_t = inv_t.to(device=device, dtype=torch.float32)
    greedy_all = temperature.to(device) <= 0
    x_all = draft_tokens.to(device=device, dtype=torch.int64)
    seed_all = noise_seed.to(device=device, dtype=torch.int64)
    step = max(1, _ROW_CHUNK_ELEMS // max(V, 1))
    for a in range(0, R, step):
        b = min(R, a + step)
        it = inv_t[a:b, None]  # [n, 1]
        greedy = greedy_all[a:b]  # [n]
        x = x_all[a:b, None]  # [n, 1]
        probs, argmaxes, sums, logps = [], [], [], []
        for logits in (draft_logits[a:b], target_logits[a:b]):
            logits = logits.float()  # [n, V]
            m = logits.amax(-1, keepdim=True)
            z = (logits - m).mul_(it)
            s = torch.exp(z).sum(-1, keepdim=True)
            log_s = torch.log(s)
            logps.append(((logits.gather(1, x) - m) * it - log_s)[:, 0])  # log of the rule prob at x, as the kernel
            probs.append(z.sub_(log_s).exp_())  # rule distribution (T = 1 on greedy rows)
            argmaxes.append(logits.argmax(-1))
            sums.append(s[:, 0])
        q1, p1 = probs
        iq, ip = argmaxes
        out[0, a:b] = torch.where(greedy, (x[:, 0] == iq).float(), q1.gather(1, x)[:, 0])
        out[1, a:b] = torch.where(greedy, (x[:, 0] == ip).float(), p1.gather(1, x)[:, 0])
        out[2, a:b] = 1.0 / sums[0]
        out[3, a:b] = 1.0 / sums[1]
        diff = (p1 - q1).clamp_min_(0.0)  # [n, V] max(0, p - q)
        out[4, a:b] = diff.sum(-1)
        out[5, a:b] = logps[1]  # log p(x)
        tok_out[0, a:b] = ip
        tok_out[1, a:b] = ip
        sampled = (~greedy).nonzero()[:, 0]  # greedy rows keep argmax p for both tokens
        if sampled.numel():
            seeds = seed_all[a:b][sampled]
            target, _ = _race(p1[sampled], row_keys_reference(seeds, TARGET_STREAM))
            best, best_score = _race(diff[sampled], row_keys_reference(seeds, RESIDUAL_STREAM))
            tok_out[0, a + sampled] = torch.where(best_score > 0, best, target)  # zero residual mass: from p
            tok_out[1, a + sampled] = target
    return {**{n: out[i] for i, n in enumerate(_FLOAT_FIELDS)}, **{n: tok_out[i] for i, n in enumerate(_INT_FIELDS)}}
