"""Dynamic speculation: the block length of lossless requests, chosen every round from measured costs.

Speculation pays when a k-token verify pass costs little more than a 1-token step; under load (a batch
that already keeps the device busy) the verify pass grows with the batch's positions and speculation can
cost more than it saves. ``BlockLengthController`` picks, before each round, the block length
``k`` in ``0 .. policy k`` that maximises the expected tokens per second of the round's lossless requests
(``Policy.lossless``: their output does not depend on k, so the choice changes speed only); ``k = 0`` means
no speculation this round: those requests decode on the target alone, as ``target-only`` does.

The model, per batch-size bucket (powers of two), from the rounds it has seen:

- a draft step costs ``d`` seconds (EWMA over the decode steps of the draft phase; the pass that feeds the
  pending tokens is left out, as after rounds without drafting it is a long catch-up, which would make
  speculation look dearer than it is in steady state, where that pass is one step too);
- a target pass over ``P`` positions costs ``a + b * P`` (exponentially weighted least squares over
  the (positions, seconds) of the steady target passes: a pass that also prefills a prompt or catches up
  is left out, as its positions come cheaper each and would flatten the slope). The first rounds run the policy's k and then k = 0,
  which gives the fit two widths; after that, every ``explore_every`` rounds the controller runs a
  neighbour of its current choice (one more, one less, in turn), so the fit follows the load at the
  price of a round that is only a little slower (exploring the far end, k = policy's k when 0 is best,
  would cost a whole slow round each time);
- the rest of a round (scheduling, kernels, reads) costs ``o`` (EWMA);
- once a block length has run in steady rounds (no prompt prefill, no catch-up), its measured round time
  (EWMA per k) replaces the sum of the parts: the parts miss costs that grow with k (the confidence and
  verify statistics over the vocabulary, the draft's pending pass at k = 1, attention over a longer
  context than a profile's), which made k = 1 look faster than k = 0 under load where it was 2x dearer;
  a k > 0 not measured yet has its parts scaled by measured / parts at the nearest measured k > 0;
- a drafted token is accepted with probability ``alpha``, so a block of k yields
  ``(1 - alpha^(k+1)) / (1 - alpha)`` tokens per request (Leviathan et al. 2023). ``alpha`` is the
  accepted share of verified positions, exponentially weighted, with an optimistic prior (0.8 over 20
  positions): acceptance is only observed while speculating, so a pessimistic first block (answers often
  open with tokens the draft words differently) must not switch speculation off for good; a draft that
  really is poor is measured as such within a few blocks.

The expected rate of k is ``B * tokens(k) / (o + k * d + a + b * B * (k + 1))`` (or over its measured round
time); for k = 0 it is ``B / (o + a + b * B)``.

Rounds without drafting leave the draft behind: its cache lacks every token since it last ran, and the
first round that drafts again must feed them all (a catch-up of ``L`` positions over the batch). Under
load that pass can cost several target-only rounds, so a choice of k > 0 after rounds at k = 0 pays it,
spread over the rounds the switch serves: the catch-up's cost (a fit ``c + e * P`` of the draft's pending
pass over its positions, minus the pass a round pays anyway) divided by the rounds left to the batch's
requests at k (their mean remaining tokens / tokens(k)). For the same reason an exploration never leaves
k = 0 while the catch-up would cost more than a round, and a batch-size bucket seen for the first time
starts from the nearest bucket's measurements instead of warming up (a warm-up at the policy's k would pay
the catch-up too). Nothing is timed with extra syncs: on CUDA the phases are CUDA events read after the
round's last host read (waiting only for the "end" event, behind the commit's few cache-length updates);
elsewhere wall clock.

Better than any warm-up is a start-up profile (``profile_pair``, run by ``Engine.profile_speculation``;
``cascade serve`` and ``Cascade.from_pretrained(adaptive_k=True)`` run it): a few synthetic passes of both
models on free rows, per batch bucket, seed every bucket's fits before the first request, as vLLM profiles
and captures at start-up. The first round at any load then already picks its k from measured costs; the
round overhead ``o`` is learned from the first round on, and the measured points fade like any other.

What it reaches (``benchmarks/block_length_ab.py``, a 2-core EPYC in bf16, the default pair, full batches,
x target-only): at batch 1 1.54x (the best fixed k, 2: 1.54x), at 4 1.12x (k = 2: 1.23x), at 16 1.01x by
choosing k = 0 on every round, where every fixed k loses (0.65-0.86x): the target is compute-bound there.
A k = 0 round is a target-only round (the requests take the target-only path), so not speculating costs
nothing but the choice.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class RoundClock:
    """Phase timestamps of one round: CUDA events on a CUDA device (read after the round has synced),
    ``time.perf_counter`` elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: dict[str, object] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks[name] = ev
        else:
            self.marks[name] = time.perf_counter()

    def seconds(self, start: str, end: str) -> float:
        a, b = self.marks[start], self.marks[end]
        if self.cuda:
            # the round's last device read completed everything before it, but the commit enqueues a little
            # more (cache-length updates) before the "end" mark: wait for that event, or elapsed_time would
            # raise "device not ready" whenever the host gets here first (a wait of microseconds)
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a


@dataclass
class _LinearFit:
    """Exponentially weighted least squares of y = a + b * x."""

    decay: float
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.w, self.sx, self.sy = d * self.w + 1, d * self.sx + x, d * self.sy + y
        self.sxx, self.sxy = d * self.sxx + x * x, d * self.sxy + x * y

    def predict(self, x: float) -> float | None:
        if self.w == 0:
            return None
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var <= 1e-9 * max(1.0, mx * mx):  # one width seen so far: proportional to the positions
            return my * x / mx if mx > 0 else my
        b = (self.sxy / self.w - mx * my) / var
        b = max(b, 0.0)
        return max(my + b * (x - mx), 0.0)


def _ewma(old: float | None, new: float, decay: float) -> float:
    return new if old is None else decay * old + (1 - decay) * new


@dataclass
class _Bucket:
    target: _LinearFit
    draft_pass: _LinearFit  # the draft's pending pass: seconds over the positions it feeds
    draft_step_s: float | None = None
    overhead_s: float | None = None
    last_tried: dict[int, int] = field(default_factory=dict)  # k -> the round it last ran
    last_explored: int = 0  # the round of the last exploration
    explore_up: bool = False  # the direction of the next one
    profiled: bool = False  # seeded by a start-up profile (``profile_pair``): no warm-up rounds
    round_s: dict[int, float] = field(default_factory=dict)  # k -> EWMA seconds of its steady rounds


class BlockLengthController:
    """Chooses each round's block length for lossless requests (see the module docstring)."""

    def __init__(self, *, decay: float = 0.9, explore_every: int = 32):
        """decay: EWMA / fit weight of the past per observed round; explore_every: rounds between two
        exploration rounds."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if explore_every < 2:
            raise ValueError(f"explore_every must be >= 2, got {explore_every}")
        self.decay, self.explore_every = decay, explore_every
        self._accepted = 0.0  # exponentially weighted accepted / verified draft positions
        self._verified = 0.0
        self.rounds = 0
        self._buckets: dict[int, _Bucket] = {}
        self.last_choice: dict[str, float] = {}

    PRIOR_ALPHA, PRIOR_POSITIONS, ALPHA_DECAY = 0.8, 20.0, 0.98

    @property
    def alpha(self) -> float:
        """The acceptance probability of a drafted token (prior included)."""
        return (self._accepted + self.PRIOR_ALPHA * self.PRIOR_POSITIONS) / (self._verified + self.PRIOR_POSITIONS)

    @staticmethod
    def _key(batch: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(1, batch))))

    def _bucket(self, batch: int) -> _Bucket:
        key = self._key(batch)
        if key not in self._buckets:
            if self._buckets:  # start from the nearest bucket's measurements (no warm-up)
                near = min(self._buckets, key=lambda q: (abs(math.log2(q) - math.log2(key)), q))
                self._buckets[key] = copy.deepcopy(self._buckets[near])
            else:
                self._buckets[key] = _Bucket(target=_LinearFit(self.decay), draft_pass=_LinearFit(self.decay))
        return self._buckets[key]

    def seed(self, batch: int, *, draft_step_s: float, target_points: list[tuple[int, float]],
             draft_pass_points: list[tuple[int, float]]) -> None:
        """Start the bucket of ``batch`` from measured costs (a start-up profile, ``profile_pair``) instead of
        warm-up rounds: the draft's decode step, (positions, seconds) of target passes and of the draft's
        pending pass. The round overhead is learned from the first round on; the measured points fade as
        rounds are observed, like any other."""
        b = _Bucket(target=_LinearFit(self.decay), draft_pass=_LinearFit(self.decay), profiled=True)
        for positions, seconds in target_points:
            b.target.add(float(positions), seconds)
        for positions, seconds in draft_pass_points:
            b.draft_pass.add(float(positions), seconds)
        b.draft_step_s = draft_step_s
        self._buckets[self._key(batch)] = b

    def catch_up_s(self, batch: int, catch_up: int) -> float:
        """Seconds the draft's pending pass takes beyond a normal one (one position per request) when it
        must also feed ``catch_up`` positions it missed (0 when nothing is measured yet)."""
        if catch_up <= 0:
            return 0.0
        fit = self._bucket(batch).draft_pass
        full, normal = fit.predict(batch + catch_up), fit.predict(batch)
        return max(0.0, full - normal) if full is not None and normal is not None else 0.0

    def expected_rate(self, batch: int, k: int, catch_up: int = 0, remaining: float | None = None) -> float | None:
        """Expected tokens / s of a round of ``batch`` lossless requests at block length k (None: not
        enough measured yet). ``catch_up``: positions the draft missed (rounds without drafting), paid
        once by the first round that drafts, spread over the rounds left (``remaining``: the requests'
        mean remaining tokens; None: one round)."""
        b = self._bucket(batch)
        cost = self._round_cost(b, batch, k)
        if cost is None:
            return None
        tokens = 1.0 if k == 0 else _block_tokens(self.alpha, k)
        if k > 0 and catch_up > 0:
            rounds = max(1.0, (remaining or tokens) / tokens)
            cost += self.catch_up_s(batch, catch_up) / rounds
        return batch * tokens / max(cost, 1e-9)

    def _parts_cost(self, b: _Bucket, batch: int, k: int) -> float | None:
        """Seconds of a steady round at k as the sum of its parts (overhead, target pass, draft steps)."""
        t = b.target.predict(batch * (k + 1))
        if t is None or (b.overhead_s is None and not b.profiled) or (k > 0 and b.draft_step_s is None):
            return None
        return (b.overhead_s or 0.0) + t + (k * b.draft_step_s if k > 0 else 0.0)

    def _round_cost(self, b: _Bucket, batch: int, k: int) -> float | None:
        """Seconds of a steady round at k: measured where k has run, else the parts' sum, scaled for k > 0
        by measured / parts at the nearest measured k > 0 (the costs the parts miss grow with k too)."""
        if k in b.round_s:
            return b.round_s[k]
        parts = self._parts_cost(b, batch, k)
        measured = [j for j in b.round_s if j > 0]
        if parts is None or k == 0 or not measured:
            return parts
        near = min(measured, key=lambda j: (abs(j - k), j))
        near_parts = self._parts_cost(b, batch, near)
        return parts * b.round_s[near] / near_parts if near_parts else parts

    def choose(self, batch: int, k_max: int, catch_up: int = 0, remaining: float | None = None) -> int:
        """The block length for this round, in 0 .. k_max. ``catch_up``: positions the draft's cache lacks
        beyond the one each request feeds every round; ``remaining``: the requests' mean remaining tokens."""
        self.rounds += 1
        b = self._bucket(batch)
        for arm in (k_max, 0):  # warm-up: two widths for the target's fit (a profiled bucket has them)
            if arm not in b.last_tried and not b.profiled:
                return arm
        rates = {k: self.expected_rate(batch, k, catch_up, remaining) for k in range(k_max + 1)}
        known = {k: r for k, r in rates.items() if r is not None}
        if not known:
            return k_max
        best = max(known, key=lambda k: (known[k], k))
        self.last_choice = {str(k): r for k, r in known.items()}
        if self.rounds - b.last_explored >= self.explore_every:  # a neighbour now and then
            b.last_explored = self.rounds
            b.explore_up = not b.explore_up
            step = 1 if (b.explore_up and best < k_max) or best == 0 else -1
            round_s = batch / known[0] if known.get(0) else 0.0
            if best == 0 and self.catch_up_s(batch, catch_up) > round_s:
                return 0  # leaving k = 0 to look would cost a catch-up dearer than a round: stay
            return best + step
        return best

    def observe(self, *, batch: int, k: int, draft_s: float, decode_s: float, decode_steps: int, target_s: float,
                target_positions: int, total_s: float, accepted: int, verified: int, fed_positions: int = 0,
                fed_s: float = 0.0) -> None:
        """What a round at block length k measured: seconds of the whole draft phase (``draft_s``), of its
        ``decode_steps`` one-token steps (``decode_s``), of the target pass over ``target_positions``, of the
        round; the lossless requests' accepted and verified draft tokens; the draft's pending pass over
        ``fed_positions`` in ``fed_s`` seconds."""
        b = self._bucket(batch)
        b.last_tried[k] = self.rounds
        if fed_positions > 0 and fed_s > 0:
            b.draft_pass.add(float(fed_positions), fed_s)
        # a steady target pass: blocks and pending tokens only (a prefill's positions, cheaper each, would
        # flatten the slope the choice between widths depends on)
        steady_target = 0 < target_positions <= batch * (k + 2)
        if steady_target and target_s > 0:
            b.target.add(float(target_positions), target_s)
        if decode_steps > 0 and decode_s > 0:
            b.draft_step_s = _ewma(b.draft_step_s, decode_s / decode_steps, self.decay)
        b.overhead_s = _ewma(b.overhead_s, max(0.0, total_s - draft_s - target_s), self.decay)
        steady_draft = fed_positions <= 2 * batch if k > 0 else fed_positions == 0
        if steady_target and steady_draft and total_s > 0:
            b.round_s[k] = _ewma(b.round_s.get(k), total_s, self.decay)
        if verified > 0:
            self._accepted = self.ALPHA_DECAY * self._accepted + accepted
            self._verified = self.ALPHA_DECAY * self._verified + verified


def _block_tokens(alpha: float, k: int) -> float:
    """Expected tokens a block of k yields per request (accepted prefix + the replacement / bonus token)."""
    alpha = min(max(alpha, 0.0), 0.999)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def profile_pair(controller: BlockLengthController, draft, target, *, batches: list[int], k: int,
                 vocab_size: int, context: int = 16, catch_up: int = 8, reps: int = 2,
                 clock: Callable[[], float] = time.perf_counter) -> dict[int, dict]:
    """Measure the pair's costs on free cache rows and seed ``controller`` with them, one bucket per batch
    size, so serving never pays warm-up rounds at a block length the load makes slow (a warm-up at k also
    prefills the draft with every prompt). ``draft`` / ``target``: ``ModelRunner``s whose rows
    ``0 .. max(batches) - 1`` are free (the engine calls this before any request). Per batch size B, on a
    synthetic context of ``context`` tokens per row: the draft's decode step, its pending pass at 1 and
    ``catch_up`` positions per row, and the target's pass at 1 and k + 1 positions per row (a verify pass),
    each the best of ``reps`` timings (the first pays any one-off set-up), synchronised on CUDA. The rows are
    freed afterwards. Returns the measured seconds per batch size. ``clock``: the timer (a test seam)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cuda = {torch.device(r.device) for r in (draft, target) if torch.device(r.device).type == "cuda"}

    def sync() -> None:
        for dev in cuda:
            torch.cuda.synchronize(dev)

    def best_of(fn) -> float:
        best = math.inf
        for _ in range(reps):
            sync()
            t0 = clock()
            fn()
            sync()
            best = min(best, clock() - t0)
        return best

    def span_pass(runner, rows: list[int], width: int) -> float:
        spans = [[(7919 * r + 31 * j + 11) % vocab_size for j in range(width)] for r in rows]

        def run() -> None:
            runner.forward_span(rows, spans)
            runner.truncate(rows, [context] * len(rows))

        return best_of(run)

    figures: dict[int, dict] = {}
    for batch in batches:
        rows = list(range(batch))
        prompt = [[(104729 * r + 17 * j + 3) % vocab_size for j in range(context)] for r in rows]
        try:
            for runner in (draft, target):
                runner.forward_span(rows, prompt, num_logits=[1] * batch)
            rows_t = torch.tensor(rows, dtype=torch.int64, device=draft.device)
            ids_t = torch.tensor([p[0] for p in prompt], dtype=torch.int64, device=draft.device)

            def step() -> None:
                draft.decode(rows_t, ids_t)
                draft.truncate(rows, [context] * batch)

            step_s = best_of(step)
            draft_points = [(batch * w, span_pass(draft, rows, w)) for w in (1, catch_up)]
            target_points = [(batch * w, span_pass(target, rows, w)) for w in (1, k + 1)]
        finally:
            draft.free(rows)
            target.free(rows)
        controller.seed(batch, draft_step_s=step_s, target_points=target_points, draft_pass_points=draft_points)
        figures[batch] = {"draft_step_s": step_s, "draft_pass": draft_points, "target_pass": target_points}
    return figures
