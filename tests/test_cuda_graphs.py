"""``GraphedSteps`` replay order, checked on the CPU with a stand-in for the capture itself.

The real capture needs CUDA; what can go wrong around it can be checked here: a graph first met while
serving (a loop step count or bucket not captured at start-up) is captured on scratch-row-only inputs,
which overwrites the static buffers, so the batch must be copied in after the capture, never before, or the
replay computes the scratch row for every request. ``_record`` (warm-up + ``torch.cuda.graph``) is
replaced by a graph whose replay reruns the captured function into the same output tensors, as a replay
writes its static outputs; everything else is the real code."""

import pytest
import torch

from cascade.models.cuda_graphs import GraphedSteps

V, SCRATCH = 32, 7


def step(rows, ids, valid):
    """[B] rows, [B, n] ids, [B] valid -> [B, n, V]: a one-hot at (id + 3 * row) % V, so the output depends
    on both static inputs."""
    hot = (ids + 3 * rows.view(-1, 1)) % V
    return torch.nn.functional.one_hot(hot, V).float() + 0.01 * valid.view(-1, 1, 1)


class ReplayedGraph:
    """What ``graph.replay()`` does to a captured function's outputs: recompute them in place."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        new = self.fn()
        for dst, src in zip(*(((x,) if isinstance(x, torch.Tensor) else x) for x in (self.out, new))):
            dst.copy_(src)


@pytest.fixture
def captured(monkeypatch):
    def record(self, fn):
        out = fn()
        return ReplayedGraph(fn, out), out

    monkeypatch.setattr(GraphedSteps, "_record", record)
    return lambda: GraphedSteps(step, max_rows=4, token_buckets=(1, 4), scratch_row=SCRATCH,
                                device=torch.device("cpu"), capture=True, width=V)


def uncaptured():
    return GraphedSteps(step, max_rows=4, token_buckets=(1, 4), scratch_row=SCRATCH, device=torch.device("cpu"),
                        capture=False, width=V)


def test_a_loop_first_met_while_serving_replays_the_batch_not_the_scratch_row(captured):
    rows, ids = torch.tensor([0, 2, 3]), torch.tensor([5, 1, 9])
    want_logits, want_tokens = uncaptured().greedy_loop(rows, ids, steps=3, vocab=V)
    graphs = captured()  # nothing captured at start-up: the first call captures
    got_logits, got_tokens = graphs.greedy_loop(rows, ids, steps=3, vocab=V)
    assert torch.equal(got_tokens, want_tokens) and torch.equal(got_logits, want_logits)
    again_logits, again_tokens = graphs.greedy_loop(rows, ids.flip(0), steps=3, vocab=V)  # a plain replay
    assert torch.equal(again_tokens, uncaptured().greedy_loop(rows, ids.flip(0), steps=3, vocab=V)[1])


def test_a_bucket_first_met_while_serving_replays_the_batch(captured):
    rows = torch.tensor([1, 2])
    ids, valid = torch.tensor([[4, 5, 6], [7, 8, 9]]), torch.tensor([3, 2])
    want = uncaptured()(rows, ids, valid)
    graphs = captured()
    got = graphs(rows, ids, valid)
    assert (2, 4) in graphs.graphs and torch.equal(got, want)
    assert torch.equal(graphs(rows.flip(0), ids, valid), uncaptured()(rows.flip(0), ids, valid))
