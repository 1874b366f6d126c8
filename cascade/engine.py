"""The cascade round (DESIGN.md, "One round"), run for every active sequence at once. No HTTP, no CLI.

``Engine.step`` is the round's stages in order, each a small object or function with explicit inputs, over one
``cascade.round_batch.RoundBatch`` that each stage extends (flat tensors, per-sequence offsets): the plan
(``Engine._plan``), the draft stage (``cascade.drafting.Drafter``: steps 2-4 -> ``DraftedBlocks``), the target
pass (``cascade.target_pass.TargetPass``: step 5 -> ``TargetLogits``), verification (``cascade.acceptance``:
step 6 -> verdicts) and the commit (``cascade.commit.Committer``: step 7). What the stages share (vocabulary, end ids, detokenizer, router,
counters, the one host read point) is one ``cascade.round_context.RoundContext``; the policy-dependent steps
they run (block ends, triggers, the acceptance rule, policy state) are defined once in ``cascade.round``, where
the benchmark's replay calls them too. This module owns the order, requests, target failures and reporting.

One ``Engine.step()``:
1. admits waiting requests into free cache rows and plans the round;
2. drafts up to ``k`` tokens for every sequence whose policy uses the draft: one ragged draft pass feeds
   each sequence's pending tokens (the prompt on its first round, else the last one or two emitted
   tokens), then one batched ``decode`` per further position; a drafted EOS or a drafted token that
   completes a stop string ends the sequence's block (nothing past the end of the answer is drafted,
   triggered on or verified), and a policy may stop drafting early (BiLD's fallback);
3. computes the draft's confidence over all drafted positions in one call (and, when a policy of the
   batch reads it, the learned router's score of every position in one more: ``cascade.router``);
4. lets each policy's trigger decide, per sequence, the block to keep and whether to escalate it;
5. runs ONE ragged target pass over every escalated sequence (catch-up + block, logits for the block
   positions and the bonus position; no bonus position after a kept block that ends the request) and
   every target-only sequence (its pending tokens);
6. computes the fused verify statistics of all escalated positions in one call, applies each policy's
   deferral rule and acceptance test (or, for rules that need them, the full distributions: see
   ``cascade.policies.base``), and emits accepted tokens plus one replacement or bonus token
   (``cascade.acceptance``);
7. rolls both caches back to the accepted length (a length update), applies stop conditions, lets each
   policy update its requests' state (``Policy.after_round``: ``handoff``'s window) and, where an answer
   ended, decide on it (``Policy.at_finish``: ``quantile``'s routing).

What a request's round is (does the draft propose, is the output held back) is its policy's declaration
from the request's state (``Policy.plan``, ``cascade.policies.state``), not a field of the sequence.

Per emitted token the engine keeps one record (``cascade.metrics.EmittedToken``: id, source, log-prob, top
alternatives), passed as is to the library, the server and the metrics. Its source is who decided it
(``TokenSource``) and its log-prob the natural
(T = 1) log-softmax, at the token, of the logits row of the model that decided it, as the engine sampled
from it (after the request's top-k / top-p filtering, which removes tokens but keeps the other logits;
without a filter it is the model's own log-prob). DRAFT tokens get the draft's log q(x) (the confidence
stats' ``token_logprob`` at T in {0, 1}, recomputed for other temperatures); VERIFIED ones the target's
log p(x); TARGET / BONUS / target-only tokens the target's log-prob of the token drawn.

Vocabulary: the engine works on the tokenizer's vocabulary, ``vocab_size`` ids. Checkpoints of one
tokenizer often pad their embedding matrices to different sizes (Qwen2.5 0.5B: 151,936 rows, 7B: 152,064,
the tokenizer: 151,665 ids), so every logits row a runner returns is cut to its first ``vocab_size``
columns (a view, no copy) before anything reads it: a padding row is never drafted, accepted, sampled or
counted in a confidence statistic.

Held-back output: while a request's plan holds its output (``RoundPlan.holds_output``: a request-level
policy's answer until it is decided), its deltas are empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable
from typing import Sequence as Seq

import torch

from cascade.acceptance import decide_on_device, sample_target_only
from cascade.commit import Committer
from cascade.config import EngineConfig, SamplingParams
from cascade.drafting import Drafter
from cascade.host import fetch
from cascade.metrics import EmittedToken, RequestStats, TokenSource, top_logprob_lists
from cascade.models.base import ModelRunner, TargetUnavailable
from cascade.models.cuda_graphs import buckets_for
from cascade.policies import Policy, make_policy
from cascade.round_batch import DraftedBlocks, RoundBatch
from cascade.round_context import RoundContext
from cascade.router import DeferralRouter
from cascade.sampling import RequestRng
from cascade.scheduler import Scheduler, Sequence, SequenceSnapshot
from cascade.speculation import BlockLengthController, RoundClock, profile_pair
from cascade.target_pass import TargetPass


@dataclass
class RequestOutput:
    """What one round produced for one request (deltas since the previous output)."""

    request_id: str
    new_tokens: list[EmittedToken]  # one record per new token (id, source, log-prob, top alternatives)
    text: str  # the whole output text reported so far
    finished: bool
    finish_reason: str | None
    stats: RequestStats
    new_escalation_lengths: list[int] = field(default_factory=list)  # tokens each new escalation emitted

    # views of the records, per field
    @property
    def new_token_ids(self) -> list[int]:
        return [t.id for t in self.new_tokens]

    @property
    def new_sources(self) -> list[TokenSource]:
        return [t.source for t in self.new_tokens]

    @property
    def new_logprobs(self) -> list[float]:
        """Natural log-prob of each new token under the model that decided it."""
        return [t.logprob for t in self.new_tokens]

    @property
    def new_top_logprobs(self) -> list[list[tuple[int, float]]]:
        """Per new token, when the request asks for top log-probs: the deciding model's best (id, log-prob)."""
        return top_logprob_lists(self.new_tokens)


class _InContext:
    """An ``Engine`` attribute that lives in its ``RoundContext`` (one copy, which every stage reads)."""

    def __init__(self, doc: str, *, settable: bool = True) -> None:
        self.__doc__, self.settable = doc, settable

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, engine, owner=None):
        return self if engine is None else getattr(engine.context, self.name)

    def __set__(self, engine, value) -> None:
        if not self.settable:
            raise AttributeError(f"Engine.{self.name} is fixed when the engine is built")
        setattr(engine.context, self.name, value)


class Engine:
    """Runs cascade rounds over a draft runner and a target runner that share a tokenizer."""

    def __init__(
        self,
        draft: ModelRunner,
        target: ModelRunner,
        *,
        eos_token_ids: Iterable[int] = (),
        detokenize: Callable[[list[int]], str] | None = None,
        config: EngineConfig | None = None,
        router: DeferralRouter | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.config = config or EngineConfig(max_rows=min(draft.max_rows, target.max_rows))
        self.max_rows = min(draft.max_rows, target.max_rows, self.config.max_rows)
        eos = frozenset(eos_token_ids)
        # what every stage of the round shares (``cascade.round_context``); the properties below are its fields
        self.context = RoundContext(
            vocab_size=shared_vocab_size(draft.vocab_size, target.vocab_size, vocab_size),
            max_len=min(draft.max_len, target.max_len), eos_token_ids=eos,
            eos_ids=torch.tensor(sorted(eos), dtype=torch.int64, device=draft.device),  # [E]
            detokenize=detokenize, router=router.to(draft.device) if router is not None else None,
            read=_read_host)
        self.drafter = Drafter(draft, self.context)
        self.target_pass = TargetPass(target, self.context)
        self.committer = Committer(draft, target, self.context)
        # dynamic speculation: each round's block length for lossless requests (``cascade.speculation``)
        self.block_controller = BlockLengthController() if self.config.adaptive_k else None
        self.scheduler = Scheduler(self.max_rows)
        self._device = target.device

    # the runners, each held by the stages that use it
    @property
    def draft(self) -> ModelRunner:
        """The draft runner (drafting, the commit's rollbacks)."""
        return self.drafter.draft

    @draft.setter
    def draft(self, runner: ModelRunner) -> None:
        self.drafter.draft = self.committer.draft = runner

    @property
    def target(self) -> ModelRunner:
        """The target runner (the target pass, the commit's rollbacks)."""
        return self.target_pass.target

    @target.setter
    def target(self, runner: ModelRunner) -> None:
        self.target_pass.target = self.committer.target = runner

    # the round's shared state, kept once in ``self.context`` (read by every stage); settable where a caller
    # may swap it (a benchmark resets the counters, the bench traces requests, tests install a detokenizer)
    vocab_size = _InContext("the tokenizer's ids the pair cascades over", settable=False)
    max_len = _InContext("positions per cache row", settable=False)
    eos_token_ids = _InContext("the ids that end an answer", settable=False)
    stats = _InContext("engine-wide counters (``EngineStats``)")
    detokenize = _InContext("ids -> text (stop strings, output text); None: ids only")
    router = _InContext("the learned router that scores drafted positions for ``uses_router`` policies")
    trace = _InContext("per-position statistics of chosen requests (``cascade.trace``); None: off")

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams, policy: Policy) -> None:
        """Queue a request. Raises ValueError naming the field for an empty or too long prompt, or a
        policy the engine cannot run (see ``check_request``)."""
        prompt_ids = self.check_request(prompt_ids, params, policy)
        seq = Sequence(request_id, prompt_ids, params, policy, RequestRng(params.seed),
                       end_ids=params.end_ids(self.eos_token_ids))
        self.scheduler.add(seq)

    def check_request(self, prompt_ids: Seq[int], params: SamplingParams, policy: Policy) -> list[int]:
        """Validate a request without queueing it (reads no mutable state, so any thread may call it).
        Returns the prompt as a list of ints; raises ValueError naming the field."""
        if policy.benchmark_only:
            raise ValueError(f"policy: {policy.name} is benchmark-only (the benchmark harness derives it from the "
                             "draft-only and target-only runs); the engine cannot run it")
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("prompt: must not be empty")
        if len(prompt_ids) > self.max_len - 2:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens is longer than the cache allows (max_len={self.max_len}, at most {self.max_len - 2} prompt tokens)")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if policy.uses_router and self.router is None:
            raise ValueError(f"policy: {policy.name} needs a learned deferral router, and none is loaded (train one "
                             "with `cascade train-router`; it is saved next to the draft model)")
        if policy.k > self.config.max_draft_block:
            raise ValueError(f"k: {policy.k} exceeds the engine's max_draft_block={self.config.max_draft_block}")
        return prompt_ids

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its rows are freed at once. Returns False if it is unknown or done."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        if seq.row < 0:
            self.scheduler.remove_waiting(seq)
        seq.finished, seq.finish_reason = True, "abort"
        self._release(seq)
        return True

    def profile_speculation(self, k: int = 5, context: int = 16) -> dict[int, dict]:
        """Seed dynamic speculation's cost model from a start-up profile of the pair (``profile_pair``), one
        batch bucket per power of two up to max_rows, verify passes of ``k`` + 1 positions per row. Call it
        before the first request: it uses the cache rows. Returns the measured seconds per batch size."""
        if self.block_controller is None:
            raise ValueError("adaptive_k: dynamic speculation is off (EngineConfig.adaptive_k), nothing to profile")
        if self.scheduler.has_work():
            raise RuntimeError("profile_speculation needs free cache rows: call it before the first request")
        return profile_pair(self.block_controller, self.draft, self.target, batches=buckets_for(self.max_rows),
                            k=k, vocab_size=self.vocab_size, context=min(context, self.max_len - 2 * k - 4))

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ the round
    def step(self, only: Collection[str] | None = None) -> list[RequestOutput]:
        """Run one round for every running sequence (or only those whose request ids are in ``only``);
        return the new output of each. An exception leaves the round half done: use ``step_isolating``
        where other requests must go on."""
        t_start = time.perf_counter()
        batch = self._plan(only)  # 1. admit; who drafts, block lengths
        if batch.cascading:  # 2-4. drafted blocks, their ends, confidence, triggers
            batch.blocks = self.drafter.settle(self.drafter.run(batch.cascading, batch.ks, batch.clock))
        batch.mark("drafted")
        self._target(batch)  # 5. one target pass
        batch.mark("verified")
        self._verify(batch)  # 6. acceptance, one host read
        self._commit(batch)  # 7. emit, roll back, policy state, decisions
        self._observe_speed(batch)
        return self._report(batch.running, t_start)

    def _plan(self, only: Collection[str] | None) -> RoundBatch:
        """Admit waiting requests and plan the round: who is at max_tokens, who drafts (its policy's plan),
        who the target decodes alone, this round's dynamic block length for lossless requests and each
        drafting sequence's block length."""
        self.scheduler.admit()
        running = [s for s in self.scheduler.running.values()
                   if not s.finished and (only is None or s.request_id in only)]
        for s in running:
            if self._block_size(s) <= 0:
                self.committer.finish(s, "length")
        seqs = [s for s in running if not s.finished]
        drafts = [s.plan.drafts for s in seqs]  # each policy's declaration for its request
        cascading = [s for s, d in zip(seqs, drafts) if d]
        target_only = [s for s, d in zip(seqs, drafts) if not d]
        lossless = [s for s in cascading if s.policy.lossless] if self.block_controller is not None else []
        k_round = None
        if lossless:  # (the draft lags after rounds without drafting: speculating again first catches it up)
            catch_up = sum(max(0, len(s.tokens) - s.draft_len - 1) for s in lossless)
            remaining = sum(s.params.max_tokens - s.num_emitted for s in lossless) / len(lossless)
            k_round = self.block_controller.choose(len(seqs), max(s.policy.k for s in lossless), catch_up, remaining)
            self.stats.block_length_rounds[k_round] = self.stats.block_length_rounds.get(k_round, 0) + 1
        fed = sum(len(s.tokens) - s.draft_len for s in cascading if not (k_round == 0 and s in lossless))
        moved = lossless if k_round == 0 else []  # no speculation this round: the target decodes them alone
        if moved:
            cascading = [s for s in cascading if not s.policy.lossless]
            target_only = target_only + moved
        clock = RoundClock(self._device) if k_round is not None else None
        batch = RoundBatch(running=running, cascading=cascading, target_only=target_only, lossless=lossless,
                           moved=moved, k_round=k_round, ks=[self._block_size(s, k_round) for s in cascading],
                           draft_fed=fed, clock=clock, size=len(seqs))
        batch.mark("start")
        return batch

    def _target(self, batch: RoundBatch) -> None:
        """The target pass over the escalated blocks and the target-only sequences (``batch.target``). An
        unreachable target fails the round (``on_target_error == "fail"``) or the round goes on without it:
        blocks stand as drafted and target-only sequences switch to the draft (``_degrade_to_draft``)."""
        blocks = batch.blocks
        batch.escalated = blocks.escalated() if blocks is not None else []
        try:
            batch.target = self.target_pass.run(batch.escalated_seqs(), [blocks.blocks[i] for i in batch.escalated]
                                                 if blocks is not None else [], batch.target_only,
                                                 exact=self.config.exact_verify)
        except TargetUnavailable:
            if self.config.on_target_error == "fail":
                raise
            self._degrade_to_draft(blocks, batch.escalated, [s for s in batch.target_only if s not in batch.moved])
            batch.escalated, batch.target_only = [], []

    def _verify(self, batch: RoundBatch) -> None:
        """Acceptance of every escalated block and the target's own token of every target-only sequence,
        decided on the device and read in one host read (``batch.verdicts``, ``batch.sampled``)."""
        if batch.target is None:
            return
        t0 = time.perf_counter()
        pending = decide_on_device(batch.cascading, batch.blocks, batch.escalated, batch.target, self.eos_token_ids) \
            if batch.escalated else None
        sampled = sample_target_only(batch.target_only, batch.target, len(batch.escalated), self.eos_token_ids)
        tensors = pending.tensors() if pending is not None else []
        if tensors or sampled:
            host = self.context.fetch(*tensors, *sampled)
            batch.verdicts = pending.finish(host[: len(tensors)]) if pending is not None else {}
            batch.sampled = host[len(tensors):]
        self.stats.time_kernels_s += time.perf_counter() - t0

    def _commit(self, batch: RoundBatch) -> None:
        """Emit the round's tokens, update the policies' states, then let each finished answer be decided."""
        emitted_before = [s.num_emitted for s in batch.cascading]
        blocks = batch.blocks.blocks if batch.blocks is not None else []
        for i, (s, block) in enumerate(zip(batch.cascading, blocks)):
            self.committer.commit_block(s, block, batch.verdicts.get(i))
        self.committer.after_round(batch.cascading, blocks, emitted_before)
        self.committer.commit_target_tokens(batch.target_only, batch.sampled)
        batch.mark("end")
        for s in batch.running:
            self.committer.settle(s)

    def _observe_speed(self, batch: RoundBatch) -> None:
        """Dynamic speculation learns this round's measured costs and acceptance (when it chose the round's k)."""
        clock, k = batch.clock, batch.k_round
        if clock is None:
            return
        lossless = {id(s) for s in batch.lossless}
        spec = [i for i in batch.verdicts if id(batch.cascading[i]) in lossless]
        drafted = bool(batch.cascading)
        drafted_steps = max(0, k - 1) if drafted else 0
        self.block_controller.observe(
            batch=batch.size, k=k, draft_s=clock.seconds("start", "drafted"),
            decode_s=clock.seconds("draft_fed", "draft_steps_done") if drafted_steps else 0.0,
            decode_steps=drafted_steps, target_s=clock.seconds("drafted", "verified"),
            target_positions=batch.target.positions if batch.target is not None else 0,
            total_s=clock.seconds("start", "end"),
            accepted=sum(batch.verdicts[i].kept for i in spec), verified=sum(batch.blocks.blocks[i].keep for i in spec),
            fed_positions=batch.draft_fed if drafted else 0,
            fed_s=clock.seconds("start", "draft_fed") if drafted else 0.0)

    def _report(self, running: list[Sequence], t_start: float) -> list[RequestOutput]:
        """Each request's new output; finished requests release their rows; the round's time is counted."""
        outputs = [self._output(s) for s in running]
        for s in running:
            if s.finished:
                self._release(s)
        elapsed = time.perf_counter() - t_start
        for s in running:
            s.stats.wall_time_s = time.perf_counter() - s.arrival_time
        self.stats.rounds += 1
        self.stats.time_total_s += elapsed
        return outputs

    def step_isolating(self) -> tuple[list[RequestOutput], dict[str, Exception]]:
        """``step()``, but an exception fails only the request that raised it.

        The batched round is tried first. If it raises, every running sequence is restored to its state
        before the round (tokens, cache lengths, stats, RNG state), then the round is rerun one sequence at
        a time; a sequence that raises alone is restored, finished with reason ``"error"`` and its rows
        freed. Returns the outputs (the failed requests' final ones included) and the exception of each
        failed request. Costs nothing extra while no round fails (a snapshot of a few lists per sequence)."""
        self.scheduler.admit()
        snapshot = {s.request_id: SequenceSnapshot.of(s) for s in self.scheduler.running.values() if not s.finished}
        try:
            return self.step(), {}
        except Exception:  # noqa: BLE001 -- isolated below, sequence by sequence
            for rid, state in snapshot.items():
                state.restore(self.scheduler.running[rid], self.draft, self.target)
        outputs: list[RequestOutput] = []
        failed: dict[str, Exception] = {}
        for rid, state in snapshot.items():
            try:
                outputs += self.step(only={rid})
            except Exception as exc:  # noqa: BLE001 -- this request fails, the others go on
                seq = self.scheduler.running[rid]
                state.restore(seq, self.draft, self.target)
                seq.finished, seq.finish_reason = True, "error"
                failed[rid] = exc
                outputs.append(self._output(seq))
                self._release(seq)
        return outputs, failed

    def _block_size(self, s: Sequence, k_round: int | None = None) -> int:
        """Tokens to draft this round: the policy's k (for a lossless policy, at most this round's dynamic
        block length ``k_round``), capped by max_tokens and by cache room (the block, plus the
        replacement/bonus token, must fit in max_len)."""
        room = self.max_len - len(s.tokens) - 1
        k = s.policy.k if k_round is None or not s.policy.lossless else min(s.policy.k, k_round)
        return min(k, s.params.max_tokens - s.num_emitted, room)

    def _degrade_to_draft(self, blocks: DraftedBlocks | None, escalated: list[int], target_only: list[Sequence]) -> None:
        """on_target_error == "draft-only": escalated blocks are kept as drafted (unverified), and
        sequences that only the target was decoding switch to the draft for the rest of the request."""
        for i in escalated:  # the whole drafted block stands: a block its policy cut to 0 tokens (bild,
            block = blocks.blocks[i]  # chow-cut) would otherwise be drafted and cut again every round
            block.escalate, block.keep = False, len(block.tokens)
        fallback = make_policy("draft-only")
        for s in target_only:
            s.policy, s.policy_state = fallback, fallback.init_state()

    def _release(self, s: Sequence) -> None:
        if s.row >= 0:
            self.draft.free([s.row])
            self.target.free([s.row])
            self.scheduler.release(s)

    def _output(self, s: Sequence) -> RequestOutput:
        ready, start = s.num_ready, s.emitted_reported
        s.emitted_reported = max(start, ready)
        lengths, s.escalation_lengths = s.escalation_lengths, []
        if not s.plan.holds_output:
            text = s.text
        else:
            text = self.detokenize(s.output_ids[:ready]) if self.detokenize is not None and ready else ""
        return RequestOutput(
            request_id=s.request_id, new_tokens=s.emitted[start:ready],
            text=text, finished=s.finished,
            finish_reason=s.finish_reason, stats=s.stats, new_escalation_lengths=lengths,
        )


def shared_vocab_size(draft_rows: int, target_rows: int, vocab_size: int | None) -> int:
    """The vocabulary a pair cascades over: ``vocab_size`` (the shared tokenizer's, at most both runners'
    logits widths), or the common width when none is given. A pair whose widths differ needs it: the engine
    cannot tell padding rows from a different tokenizer."""
    if vocab_size is None:
        if draft_rows != target_rows:
            raise ValueError(f"vocab_size: the draft has {draft_rows} logits rows and the target {target_rows}; pass the "
                             "shared tokenizer's vocabulary size (len(tokenizer)) so the padding rows can be masked")
        return draft_rows
    if not 0 < vocab_size <= min(draft_rows, target_rows):
        raise ValueError(f"vocab_size: {vocab_size} must be in [1, {min(draft_rows, target_rows)}] (the draft has "
                         f"{draft_rows} logits rows, the target {target_rows}): the tokenizer does not fit the pair")
    return vocab_size


def _read_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The round's one host read point, ``cascade.host.fetch``, looked up in this module at every call (where
    ``tests/test_host_syncs.py`` counts the syncs)."""
    return fetch(*tensors)
