"""The runner contract (``cascade.models.base.ModelRunner``) written once and checked on every local runner:
``tests/test_runner.py`` runs it on ``LlamaRunner``, ``tests/test_llamacpp_runner.py`` on ``LlamaCppRunner``.

Each ``check_*`` takes ``make(**kw)``, a factory of fresh runners over the same weights (4 rows; ``max_len`` and the
runner's own options as keywords), and where it compares logits, ``reference(seq) -> [len(seq), V]``: the logits
of the same weights by another implementation (transformers), within ``tol``. Among runners of one kind
(rollback vs a fresh runner, a fused loop vs its decodes) the bound is ``SAME``: the same kernels on the same inputs.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

SAME = 1e-5  # one runner's own results along two paths (the same kernels up to the batch's shape)

Make = Callable[..., object]
Reference = Callable[[list], torch.Tensor]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two equal-shaped tensors."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def check_rollback_equals_fresh(make: Make) -> None:
    """``truncate`` rolls a row back: what follows equals a fresh runner fed only the kept tokens."""
    prompt, kept, dropped, new = [3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5], [8, 9]
    r = make()
    r.forward_span([1], [prompt + kept])
    r.forward_span([1], [dropped[:3]])
    r.decode(torch.tensor([1]), torch.tensor([dropped[3]]))
    assert r.lengths([1]) == [len(prompt) + len(kept) + len(dropped)]
    r.truncate([1], [len(prompt) + len(kept)])
    assert r.lengths([1]) == [len(prompt) + len(kept)]
    a1 = r.decode(torch.tensor([1]), torch.tensor([new[0]]))
    a2 = r.forward_span([1], [new[1:]])
    f = make()
    f.forward_span([1], [prompt + kept])
    b1 = f.decode(torch.tensor([1]), torch.tensor([new[0]]))
    b2 = f.forward_span([1], [new[1:]])
    assert maxdiff(a1, b1) < SAME and maxdiff(a2, b2) < SAME


def check_free_then_reuse(make: Make, reference: Reference, tol: float) -> None:
    """A freed row has length 0 and starts clean; the other rows keep their cache."""
    r = make()
    r.forward_span([0, 1], [[7] * 20, [2, 3]])
    r.free([0])
    assert r.lengths([0, 1]) == [0, 2]
    seq = [4, 5, 6]
    assert maxdiff(r.forward_span([0], [seq]), reference(seq)) < tol
    assert maxdiff(r.decode(torch.tensor([1]), torch.tensor([9])), reference([2, 3, 9])[-1:]) < tol


def check_ragged_batch(make: Make, reference: Reference, tol: float, vocab: int) -> None:
    """Rows of different lengths in one call (prefill, a decode step, ragged spans, rows out of order) each get
    the logits of their own sequence, as if alone."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (7, 1, 12, 4)]
    spans = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (3, 5, 1, 2)]
    rows = [3, 1, 0, 2]
    r = make()
    pre = r.forward_span(rows, prompts, num_logits=[1] * 4)
    step = r.decode(torch.tensor(rows), torch.tensor([5, 6, 7, 8]))
    span = r.forward_span(rows, spans)
    off = 0
    for i in range(4):
        want = reference(prompts[i] + [5 + i] + spans[i])
        n, p = len(spans[i]), len(prompts[i])
        assert maxdiff(pre[i:i + 1], want[p - 1:p]) < tol
        assert maxdiff(step[i:i + 1], want[p:p + 1]) < tol
        assert maxdiff(span[off:off + n], want[p + 1:]) < tol
        off += n
    assert r.lengths(rows) == [len(p) + 1 + len(s) for p, s in zip(prompts, spans)]


def check_decode_equals_single_token_spans(make: Make) -> None:
    """``decode`` is ``forward_span`` of one token per row."""
    a, b = make(), make()
    prompts, rows = [[1, 2, 3], [4, 5, 6, 7, 8], [9]], [0, 2, 3]
    a.forward_span(rows, prompts)
    b.forward_span(rows, prompts)
    for ids in ([10, 11, 12], [13, 14, 15]):
        assert maxdiff(a.decode(torch.tensor(rows), torch.tensor(ids)), b.forward_span(rows, [[t] for t in ids])) < SAME
    assert a.lengths(rows) == b.lengths(rows) == [5, 7, 3]


def check_greedy_loop(make: Make, vocab: int | None = None, **loop_options) -> None:
    """``decode_loop`` equals ``decode`` calls fed their own argmax (over ids < ``vocab``); rows it does not name keep
    their length. ``loop_options``: the looping runner's own options (e.g. the torch runner's static path)."""
    a, b = make(**loop_options), make()
    for r in (a, b):
        r.forward_span([0, 2, 3], [[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    first = torch.tensor([5, 6, 7])
    logits, tokens = a.decode_loop([0, 2, 3], first, 4, vocab=vocab)
    assert logits.shape == (4, 3, a.vocab_size) and tokens.shape == (4, 3)
    cur = first
    for j in range(4):
        want = b.decode(torch.tensor([0, 2, 3]), cur)
        assert maxdiff(logits[j], want) < SAME
        cur = want[:, :vocab].argmax(dim=-1)
        assert tokens[j].tolist() == cur.tolist()
    assert a.lengths([0, 1, 2, 3]) == b.lengths([0, 1, 2, 3]) == [7, 0, 6, 8]


# (call on a fresh 4-row runner with max_len 16, the field its ValueError names)
BAD_ARGUMENTS = [
    (lambda r: r.forward_span([0], [list(range(17))]), "spans"),
    (lambda r: r.forward_span([0], [[]]), "spans"),
    (lambda r: r.forward_span([0], [[r.vocab_size]]), "spans"),
    (lambda r: r.forward_span([0], [[1.5]]), "spans"),
    (lambda r: r.forward_span([4], [[1]]), "rows"),
    (lambda r: r.forward_span([-1], [[1]]), "rows"),
    (lambda r: r.forward_span([1, 1], [[1], [2]]), "rows"),
    (lambda r: r.forward_span([0, 1], [[1]]), "spans"),
    (lambda r: r.forward_span([0], [[1, 2]], num_logits=[3]), "num_logits"),
    (lambda r: r.decode(torch.tensor([5]), torch.tensor([1])), "rows"),
    (lambda r: r.decode(torch.tensor([0, 1]), torch.tensor([1])), "ids"),
    (lambda r: r.decode_loop([0], torch.tensor([1]), 0), "steps"),
    (lambda r: r.truncate([0], [1]), "lengths"),
    (lambda r: r.free([9]), "rows"),
]


def check_bad_argument(make: Make, call, field: str) -> None:
    """A bad argument raises a ValueError naming ``field`` and changes no row."""
    r = make(max_len=16)
    with pytest.raises(ValueError, match=field):
        call(r)
    assert r.lengths([0, 1, 2, 3]) == [0, 0, 0, 0]  # nothing half-applied


def check_full_row_rejected(make: Make) -> None:
    """A row at ``max_len`` takes no more tokens, by either call, and keeps its length."""
    r = make(max_len=8)
    r.forward_span([0], [[1] * 8])
    with pytest.raises(ValueError, match="rows"):
        r.decode(torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="spans"):
        r.forward_span([0], [[1]])
    assert r.lengths([0]) == [8]
