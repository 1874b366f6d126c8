"""Confidence kernel: exact per-row statistics of a softmax over the full vocabulary, in one pass.

Terms (one row ``r`` = one drafted position; ``x = logits[r]``, ``V`` = vocabulary size):

- ``T``: the row's temperature; a value <= 0 (a greedy row) is treated as 1, so greedy rows still get a
  meaningful confidence. Launchers take ``inv_t = 1 / T`` (computed once on the host side, in fp32).
- ``z = x * inv_t`` and ``softmax(z)``; ``-inf`` logits (tokens removed by top-k / top-p) have
  probability 0 and contribute nothing to any statistic.
- ``argmax``: first index of the max logit. ``max_prob = p(top1)``, ``margin = p(top1) - p(top2)``
  (top-2 counts ties: two equal maxima give margin 0), ``entropy = -sum p log p`` in nats,
  ``logsumexp = log sum exp(z)``, ``token_logprob = log softmax(z)[tokens[r]]``.

One pass, online softmax. Every lane of a program keeps, over the logits it has seen,
``m`` (running max in raw logit units, so ``argmax`` is exactly the logits' argmax), ``s = sum exp(d)`` and
``t = sum exp(d) * d`` with ``d = (x - m) * inv_t``, the index of its max and its second-largest logit.
This is the running "sum of exp * logit" of the entropy, kept relative to the running max:
``entropy = log s - t / s`` and ``logsumexp = m * inv_t + log s``, with no cancellation of large numbers.
A new lane maximum ``m'`` multiplies ``s`` and ``t`` by ``a = exp((m - m') * inv_t)`` (``t`` also shifts by
``(m - m') * inv_t * s``), so each element costs one ``exp`` and no cross-lane reduction happens inside
the loop. At the end the lanes are merged with the same algebra; the same merge combines the partials of
several programs, which is how the vocabulary is split:

- one program per row (``num_splits == 1``): it finalises the row itself; right for large ``R``;
- split (flash-decoding / split-K style, ``num_splits > 1``): a ``[R, num_splits]`` grid, each program
  scans a contiguous chunk (a multiple of ``BLOCK_V``) and writes its partial
  ``(m, s, t, top-2 logit, argmax)`` to a small fp32 / int32 workspace; a tiny second kernel, one program
  per row, merges the ``num_splits`` partials and finalises. ``choose_num_splits`` aims at ~4 programs per
  SM, so small batches still fill the GPU.

Inputs are read in their own dtype (fp32 / bf16 / fp16), math is fp32. ``confidence_reference`` is the
torch implementation of exactly these semantics (the CPU path of ``cascade.confidence``).
"""

from __future__ import annotations


import torch

from cascade.kernels.splits import choose_num_splits, num_sms, split_layout

try:  # the torch reference below must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on triton-less installs
    triton = None
    tl = None

FIELDS = ("argmax", "max_prob", "margin", "entropy", "logsumexp", "token_logprob")
_FLOAT_FIELDS = FIELDS[1:]  # packed as rows of one [5, R] fp32 output
_ROW_CHUNK_ELEMS = 1 << 22  # torch reference: rows per chunk * V stays below this (bounds temporaries)


# ----------------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _conf_update(x, idx, m, s, t, v2, i1, inv_t):
        """Fold one tile into the per-lane state. x: [BLOCK] fp32 logits (-inf = absent), idx: [BLOCK]
        int32 vocabulary indices; m, s, t, v2: [BLOCK] fp32, i1: [BLOCK] int32 lane state."""
        valid = x > float("-inf")
        up = x > m  # a new lane maximum (never for -inf); ties keep the earlier index
        xs = tl.where(valid, x, 0.0)
        ms = tl.where(m > float("-inf"), m, xs)  # finite stand-in; equals xs for a lane's first element
        d = tl.where(up, ms - xs, xs - ms) * inv_t  # <= 0 and finite for valid lanes
        e = tl.where(valid, tl.exp(d), 0.0)
        # up: old terms scale by e = exp((m_old - x) * inv_t) and shift by d; the new element adds (1, 0)
        t = tl.where(up, e * (t + d * s), t + e * d)
        s = tl.where(up, s * e + 1.0, s + e)
        v2 = tl.where(up, m, tl.maximum(v2, x))
        i1 = tl.where(up, idx, i1)
        m = tl.where(up, x, m)
        return m, s, t, v2, i1

    @triton.jit
    def _conf_merge(m, s, t, v2, i1, inv_t):
        """Merge partial states (the lanes of one program, or the splits of one row) into scalars.
        m, s, t, v2: [N] fp32, i1: [N] int32 -> (M, S, T, V2, I) with S, T relative to M."""
        M = tl.max(m, axis=0)
        live = m > float("-inf")
        d = tl.where(live, (m - tl.where(M > float("-inf"), M, 0.0)) * inv_t, 0.0)
        a = tl.where(live, tl.exp(d), 0.0)
        S = tl.sum(s * a, axis=0)
        T = tl.sum(a * (t + d * s), axis=0)
        I = tl.min(tl.where(live & (m == M), i1, 2147483647), axis=0)
        V2 = tl.max(tl.where(i1 == I, v2, m), axis=0)  # the winner's runner-up vs every other top-1
        return M, S, T, V2, I

    @triton.jit
    def _conf_finalize(row, row_ptr, R, M, S, T, V2, I, inv_t, tokens_ptr, argmax_ptr, out_ptr,
                       HAS_TOKENS: tl.constexpr):
        """Write one row's stats. out_ptr: [5, R] fp32 (max_prob, margin, entropy, logsumexp,
        token_logprob), argmax_ptr: [R] int64."""
        log_s = tl.log(S)
        tl.store(argmax_ptr + row, tl.where(I == 2147483647, 0, I).to(tl.int64))  # all -inf row: 0
        tl.store(out_ptr + row, 1.0 / S)
        tl.store(out_ptr + R + row, (1.0 - tl.exp((V2 - M) * inv_t)) / S)
        tl.store(out_ptr + 2 * R + row, log_s - T / S)
        tl.store(out_ptr + 3 * R + row, M * inv_t + log_s)
        if HAS_TOKENS:
            tok = tl.load(tokens_ptr + row)
            x_tok = tl.load(row_ptr + tok).to(tl.float32)
            tl.store(out_ptr + 4 * R + row, (x_tok - M) * inv_t - log_s)
        else:
            tl.store(out_ptr + 4 * R + row, 0.0)

    @triton.jit
    def _confidence_kernel(
        logits_ptr,  # [R, V] fp32 | bf16 | fp16, unit column stride, row stride stride_r
        inv_t_ptr,  # [R] fp32, 1 / temperature (1 for greedy rows)
        tokens_ptr,  # [R] int64 (read only when HAS_TOKENS)
        argmax_ptr,  # [R] int64 out (not SPLIT)
        out_ptr,  # [5, R] fp32 out (not SPLIT)
        ws_ptr,  # [4, R, NUM_SPLITS] fp32 partials m, s, t, v2 (SPLIT)
        ws_idx_ptr,  # [R, NUM_SPLITS] int32 partial argmax (SPLIT)
        R, V, stride_r, chunk, num_splits,
        HAS_TOKENS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Grid (R, num_splits). Program (r, j) scans logits[r, j*chunk : (j+1)*chunk]."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        row_ptr = logits_ptr + row * stride_r
        inv_t = tl.load(inv_t_ptr + row)
        start = split * chunk
        end = tl.minimum(start + chunk, V)
        offs = tl.arange(0, BLOCK_V)
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        t = tl.zeros([BLOCK_V], tl.float32)
        v2 = tl.full([BLOCK_V], float("-inf"), tl.float32)
        i1 = tl.full([BLOCK_V], 2147483647, tl.int32)
        for off in range(start, end, BLOCK_V):
            idx = off + offs
            x = tl.load(row_ptr + idx, mask=idx < end, other=float("-inf")).to(tl.float32)
            m, s, t, v2, i1 = _conf_update(x, idx, m, s, t, v2, i1, inv_t)
        M, S, T, V2, I = _conf_merge(m, s, t, v2, i1, inv_t)
        if SPLIT:
            k = row * num_splits + split
            plane = R * num_splits
            tl.store(ws_ptr + k, M)
            tl.store(ws_ptr + plane + k, S)
            tl.store(ws_ptr + 2 * plane + k, T)
            tl.store(ws_ptr + 3 * plane + k, V2)
            tl.store(ws_idx_ptr + k, I)
        else:
            _conf_finalize(row, row_ptr, R, M, S, T, V2, I, inv_t, tokens_ptr, argmax_ptr, out_ptr, HAS_TOKENS)

    @triton.jit
    def _confidence_combine_kernel(
        logits_ptr,  # [R, V] (only the token's logit is read)
        inv_t_ptr,  # [R] fp32
        tokens_ptr,  # [R] int64 (read only when HAS_TOKENS)
        argmax_ptr,  # [R] int64 out
        out_ptr,  # [5, R] fp32 out
        ws_ptr,  # [4, R, NUM_SPLITS] fp32 partials
        ws_idx_ptr,  # [R, NUM_SPLITS] int32 partial argmax
        R, stride_r, num_splits,
        HAS_TOKENS: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Grid (R,): merge a row's num_splits partials and finalise it."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_r
        inv_t = tl.load(inv_t_ptr + row)
        j = tl.arange(0, BLOCK_S)
        mask = j < num_splits
        k = row * num_splits + j
        plane = R * num_splits
        m = tl.load(ws_ptr + k, mask=mask, other=float("-inf"))
        s = tl.load(ws_ptr + plane + k, mask=mask, other=0.0)
        t = tl.load(ws_ptr + 2 * plane + k, mask=mask, other=0.0)
        v2 = tl.load(ws_ptr + 3 * plane + k, mask=mask, other=float("-inf"))
        i1 = tl.load(ws_idx_ptr + k, mask=mask, other=2147483647)
        M, S, T, V2, I = _conf_merge(m, s, t, v2, i1, inv_t)
        _conf_finalize(row, row_ptr, R, M, S, T, V2, I, inv_t, tokens_ptr, argmax_ptr, out_ptr, HAS_TOKENS)


# ----------------------------------------------------------------------------------------- launcher
def default_block_v(dtype: torch.dtype) -> int:
    """Tile width: 2048 values, 8 per thread at 8 warps (one 16-byte load for 16-bit logits). Wider tiles
    cost registers: for sm_90 ptxas reports ~75 registers at 2048 and ~140 at 4096 (bf16), and the per-lane
    online state is what occupies them."""
    return 2048


def confidence_triton(
    logits: torch.Tensor,  # [R, V] fp32 | bf16 | fp16
    inv_t: torch.Tensor,  # [R] fp32, 1 / temperature (1 for greedy rows)
    tokens: torch.Tensor | None = None,  # [R] int64 or None
    *,
    block_v: int | None = None,
    num_splits: int | None = None,  # None: choose_num_splits; 1: one program per row; > 1: split
    num_warps: int = 8,
) -> dict[str, torch.Tensor]:
    """Launch the confidence kernel; returns the stats keyed by FIELDS ([R] tensors)."""
    if triton is None:
        raise RuntimeError("the Triton confidence kernel needs the `triton` package")
    R, V = logits.shape
    device = logits.device
    argmax = torch.empty(R, dtype=torch.int64, device=device)
    out = torch.empty(5, R, dtype=torch.float32, device=device)
    if R > 0:
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        inv_t = inv_t.to(device=device, dtype=torch.float32).contiguous()
        has_tokens = tokens is not None
        tok = tokens.to(device=device, dtype=torch.int64).contiguous() if has_tokens else argmax
        block_v = triton.next_power_of_2(block_v or default_block_v(logits.dtype))
        if num_splits is None:
            num_splits = choose_num_splits(R, V, block_v, num_sms(device))
        chunk, num_splits = split_layout(V, block_v, num_splits)
        if num_splits == 1:
            _confidence_kernel[(R, 1)](
                logits, inv_t, tok, argmax, out, out, argmax, R, V, logits.stride(0), V, 1,
                HAS_TOKENS=has_tokens, SPLIT=False, BLOCK_V=block_v, num_warps=num_warps,
            )
        else:
            ws = torch.empty(4, R, num_splits, dtype=torch.float32, device=device)
            ws_idx = torch.empty(R, num_splits, dtype=torch.int32, device=device)
            _confidence_kernel[(R, num_splits)](
                logits, inv_t, tok, argmax, out, ws, ws_idx, R, V, logits.stride(0), chunk, num_splits,
                HAS_TOKENS=has_tokens, SPLIT=True, BLOCK_V=block_v, num_warps=num_warps,
            )
            _confidence_combine_kernel[(R,)](
                logits, inv_t, tok, argmax, out, ws, ws_idx, R, logits.stride(0), num_splits,
                HAS_TOKENS=has_tokens, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=1,
            )
    return {"argmax": argmax, **{name: out[i] for i, name in enumerate(_FLOAT_FIELDS)}}


# ----------------------------------------------------------------------------------------- reference
def confidence_reference(
    logits: torch.Tensor,  # [R, V] any float dtype
    inv_t: torch.Tensor,  # [R] fp32, 1 / temperature (1 for greedy rows)
    tokens: torch.Tensor | None = None,  # [R] int64 or None
) -> dict[str, torch.Tensor]:
    """Torch implementation of the kernel's semantics (same formulas, vectorised instead of online);
    rows are processed in chunks so the fp32 temporaries stay small. Returns [R] tensors keyed by FIELDS."""
    R, V = logits.shape
    device = logits.device
    argmax = torch.empty(R, dtype=torch.int64, device=device)
    out = torch.empty(5, R, dtype=torch.float32, device=device)
    inv_t = inv_t.to(device=device, dtype=torch.float32)
    step = max(1, _ROW_CHUNK_ELEMS // max(V, 1))
    for a in range(0, R, step):
        b = min(R, a + step)
        x = logits[a:b].float()  # [n, V]
        it = inv_t[a:b, None]  # [n, 1]
        top = x.topk(min(2, V), dim=-1).values  # [n, <=2]
        m = top[:, :1]
        v2 = top[:, 1] if V >= 2 else torch.full_like(top[:, 0], float("-inf"))
        d = (x - m) * it  # [n, V], <= 0, -inf for absent tokens
        e = torch.exp(d)
        s = e.sum(-1)
        t = torch.where(e > 0, e * d, torch.zeros((), device=device)).sum(-1)
        log_s = torch.log(s)
        argmax[a:b] = x.argmax(-1)
        out[0, a:b] = 1.0 / s
        out[1, a:b] = (1.0 - torch.exp((v2 - m[:, 0]) * it[:, 0])) / s
        out[2, a:b] = log_s - t / s
        out[3, a:b] = m[:, 0] * it[:, 0] + log_s
        if tokens is None:
            out[4, a:b] = 0.0
        else:
            x_tok = x.gather(1, tokens[a:b, None].to(device=device, dtype=torch.int64))[:, 0]
            out[4, a:b] = (x_tok - m[:, 0]) * it[:, 0] - log_s
    return {"argmax": argmax, **{name: out[i] for i, name in enumerate(_FLOAT_FIELDS)}}
