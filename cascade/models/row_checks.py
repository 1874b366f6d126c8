"""The argument checks every local runner makes before it touches its cache: rows in range and distinct, spans
of token ids that fit their rows, logits counts within their spans, rollback lengths within the cached ones.

One set of checks for every runner (``LlamaRunner`` on torch, ``LlamaCppRunner`` on llama.cpp), so bad input
gets the same ValueError, naming the field, whichever engine runs the model. Nothing here touches a model.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch


def as_int(x) -> int | None:
    """``x`` as a Python int if it is an integer (int, numpy / 0-d torch integer), else None."""
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def as_list(x, field: str) -> list:
    """A 1-D tensor or any sequence as a list (a tensor of another rank is an error naming ``field``)."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"{field} must be 1-D, got shape {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]
    return list(x)


def check_rows(rows, max_rows: int, field: str = "rows") -> list[int]:
    """``rows`` as distinct ints in ``[0, max_rows)``."""
    out = []
    for r in as_list(rows, field):
        i = as_int(r)
        if i is None or not 0 <= i < max_rows:
            raise ValueError(f"{field}: row {r!r} is out of range [0, {max_rows})")
        out.append(i)
    if len(set(out)) != len(out):
        raise ValueError(f"{field}: rows must be distinct, got {out}")
    return out


def check_spans(lengths: Sequence[int], rows, spans, num_logits, *, max_rows: int, max_len: int,
                vocab_size: int) -> tuple[list[int], list[list[int]], list[int]]:
    """The arguments of ``ModelRunner.forward_span`` checked against the rows' cached ``lengths`` ->
    (rows, spans as int lists, logits per span)."""
    rows = check_rows(rows, max_rows)
    spans = [as_list(s, "spans") for s in spans]
    if len(spans) != len(rows):
        raise ValueError(f"spans has {len(spans)} entries for {len(rows)} rows")
    if not rows:
        raise ValueError("rows must not be empty")
    if num_logits is None:
        num_logits = [len(s) for s in spans]
    else:
        num_logits = as_list(num_logits, "num_logits")
        if len(num_logits) != len(rows):
            raise ValueError(f"num_logits has {len(num_logits)} entries for {len(rows)} rows")
    out_spans = []
    for i, (r, s, k) in enumerate(zip(rows, spans, num_logits)):
        if not s:
            raise ValueError(f"spans[{i}] is empty")
        if lengths[r] + len(s) > max_len:
            raise ValueError(f"spans[{i}]: row {r} has length {lengths[r]}, + {len(s)} tokens > max_len {max_len}")
        ids = [as_int(t) for t in s]
        if any(t is None for t in ids):
            raise ValueError(f"spans must hold integer token ids, got {s!r}")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"spans[{i}]: token ids must be in [0, {vocab_size})")
        if as_int(k) is None or not 0 <= k <= len(s):
            raise ValueError(f"num_logits[{i}] = {k!r} must be in [0, len(spans[{i}]) = {len(s)}]")
        out_spans.append(ids)
    return rows, out_spans, [int(k) for k in num_logits]


def check_truncate(lengths: Sequence[int], rows, new_lengths, *, max_rows: int) -> tuple[list[int], list[int]]:
    """The arguments of ``ModelRunner.truncate``: each new length within ``[0, current length]``."""
    rows = check_rows(rows, max_rows)
    new_lengths = as_list(new_lengths, "lengths")
    if len(new_lengths) != len(rows):
        raise ValueError(f"lengths has {len(new_lengths)} entries for {len(rows)} rows")
    out = []
    for r, n in zip(rows, new_lengths):
        m = as_int(n)
        if m is None or not 0 <= m <= lengths[r]:
            raise ValueError(f"lengths: {n!r} for row {r} is not in [0, current length {lengths[r]}]")
        out.append(m)
    return rows, out


def check_decode(lengths: Sequence[int], rows, ids, *, max_rows: int, max_len: int,
                 vocab_size: int) -> tuple[list[int], torch.Tensor]:
    """The arguments of ``ModelRunner.decode``: ``rows [B]`` not empty and none full, ``ids [B]`` integer
    token ids (their range checked where they live on the host: a device tensor is not synced for it)
    -> (rows, ids as a tensor)."""
    rows = check_rows(rows, max_rows)
    if not rows:
        raise ValueError("rows must not be empty")
    ids_t = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
    if ids_t.dim() != 1 or ids_t.shape[0] != len(rows):
        raise ValueError(f"ids must have shape [{len(rows)}], got {tuple(ids_t.shape)}")
    if ids_t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be an integer tensor, got {ids_t.dtype}")
    if ids_t.device.type == "cpu" and (int(ids_t.min()) < 0 or int(ids_t.max()) >= vocab_size):
        raise ValueError(f"ids must be in [0, {vocab_size})")
    for r in rows:
        if lengths[r] + 1 > max_len:
            raise ValueError(f"rows: row {r} is full (length {lengths[r]} = max_len)")
    return rows, ids_t


def check_decode_loop(lengths: Sequence[int], rows, steps, vocab, *, max_rows: int, max_len: int,
                      vocab_size: int) -> tuple[list[int], int]:
    """The arguments of ``ModelRunner.decode_loop``: ``steps >= 1`` that fit every row, the argmax's vocabulary
    in ``[1, vocab_size]`` (None: all of it) -> (rows, vocab)."""
    rows = check_rows(rows, max_rows)
    if as_int(steps) is None or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    vocab = vocab_size if vocab is None else int(vocab)
    if not 1 <= vocab <= vocab_size:
        raise ValueError(f"vocab must be in [1, {vocab_size}], got {vocab}")
    for r in rows:
        if lengths[r] + steps > max_len:
            raise ValueError(f"rows: row {r} has length {lengths[r]}, + {steps} steps > max_len {max_len}")
    return rows, vocab


__all__ = ["as_int", "as_list", "check_decode", "check_decode_loop", "check_rows", "check_spans", "check_truncate"]
