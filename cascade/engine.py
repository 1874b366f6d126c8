"""The cascade round (DESIGN.md, "One round"), run for every active sequence at once. No HTTP, no CLI.
Steps 2-4 (drafting, block ends, confidence, triggers) live in ``cascade.drafting``, step 6 in
``cascade.acceptance``; this module owns the round's order, the target pass and the commit.

One ``Engine.step()``:
1. admits waiting requests into free cache rows;
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

Per emitted token the engine records its source (``TokenSource``) and ``token_logprobs``: the natural
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

from cascade.acceptance import Block, Verdict, decide_on_device, group_by_policy, natural_logprob
from cascade.config import EngineConfig, SamplingParams
from cascade.metrics import EngineStats, RequestStats, TokenSource
from cascade.models.base import ModelRunner, TargetUnavailable
from cascade.policies import Policy, make_policy
from cascade.policies.state import has_fields, stack, unstack
from cascade.router import DeferralRouter
from cascade.round import target_layout
from cascade.host import fetch
from cascade.detokenize import extend_text
from cascade.drafting import DraftSteps
from cascade.sampling import RequestRng, filter_logits, sample, top_lists, top_logprobs
from cascade.scheduler import Scheduler, Sequence, SequenceSnapshot
from cascade.models.cuda_graphs import buckets_for
from cascade.speculation import BlockLengthController, RoundClock, profile_pair
from cascade.trace import Trace


@dataclass
class RequestOutput:
    """What one round produced for one request (deltas since the previous output)."""

    request_id: str
    new_token_ids: list[int]
    new_sources: list[TokenSource]
    new_logprobs: list[float]  # natural log-prob of each new token under the model that decided it
    text: str  # the whole output text reported so far
    finished: bool
    finish_reason: str | None
    stats: RequestStats
    new_escalation_lengths: list[int] = field(default_factory=list)  # tokens each new escalation emitted
    new_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per new token, when the
    #   request asks for top log-probs (params.logprobs): (id, natural log-prob) of the deciding model's best


class Engine(DraftSteps):
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
        self.vocab_size = shared_vocab_size(draft.vocab_size, target.vocab_size, vocab_size)
        self.draft, self.target = draft, target
        self.config = config or EngineConfig(max_rows=min(draft.max_rows, target.max_rows))
        self.max_rows = min(draft.max_rows, target.max_rows, self.config.max_rows)
        self.max_len = min(draft.max_len, target.max_len)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._eos_ids = torch.tensor(sorted(self.eos_token_ids), dtype=torch.int64, device=draft.device)  # [E]
        self.detokenize = detokenize
        self.router = router.to(draft.device) if router is not None else None  # scores for ``uses_router`` policies
        # dynamic speculation: each round's block length for lossless requests (``cascade.speculation``)
        self.block_controller = BlockLengthController() if self.config.adaptive_k else None
        self.scheduler = Scheduler(self.max_rows)
        self.stats = EngineStats()
        self.trace: Trace | None = None  # per-position statistics of chosen requests (``cascade.trace``)
        self._device = target.device

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
        self.scheduler.admit()
        running = [s for s in self.scheduler.running.values()
                   if not s.finished and (only is None or s.request_id in only)]
        for s in running:
            if self._block_size(s) <= 0:
                self._finish(s, "length")
        seqs = [s for s in running if not s.finished]
        cascading = [s for s in seqs if _drafts(s)]
        target_only = [s for s in seqs if not _drafts(s)]
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
        if clock is not None:
            clock.mark("start")

        blocks = self._settle_blocks(self._draft(cascading, k_round, clock)) if cascading else {}
        escalated = [s for s in cascading if blocks[s.request_id].escalate]
        if clock is not None:
            clock.mark("drafted")
        target_logits, target_positions = self._target_pass(escalated, blocks, target_only)
        if clock is not None:
            clock.mark("verified")
        if target_logits is None:  # the target is unavailable and on_target_error is "draft-only"
            target_logits = {}
            self._degrade_to_draft(escalated, blocks, [s for s in target_only if s not in moved])
            escalated, target_only = [], []

        t0 = time.perf_counter()
        pending = decide_on_device(escalated, blocks, target_logits, self.eos_token_ids)
        sampled = self._sample_target_only(target_only, target_logits)
        if pending.tensors() or sampled:
            host = self._fetch(*pending.tensors(), *sampled)
            verdicts = pending.finish(host[: len(pending.tensors())])
            sampled = host[len(pending.tensors()):]
        else:
            verdicts = {}
        self.stats.time_kernels_s += time.perf_counter() - t0

        emitted_before = [s.num_emitted for s in cascading]
        for s in cascading:
            self._commit_cascade(s, blocks[s.request_id], verdicts.get(s.request_id))
        self._after_round(cascading, blocks, emitted_before)
        if target_only:
            tops = top_lists(sampled[2], sampled[3], sampled[2].shape[1]) if len(sampled) > 2 else [[]] * len(target_only)
            for s, tok, lp, top in zip(target_only, sampled[0].tolist(), sampled[1].tolist(), tops):
                if self.trace is not None and self.trace.wants(s.request_id, "target"):  # the EOS step too
                    self.trace.add_target(s.request_id, tok, lp, top[:s.params.logprobs])
                self._append(s, [tok], [TokenSource.TARGET], [lp], [top[:s.params.logprobs]])
        if clock is not None:
            clock.mark("end")
            spec = [s for s in lossless if s.request_id in verdicts]
            drafted_steps = max(0, k_round - 1) if cascading else 0
            self.block_controller.observe(
                batch=len(seqs), k=k_round, draft_s=clock.seconds("start", "drafted"),
                decode_s=clock.seconds("draft_fed", "draft_steps_done") if drafted_steps else 0.0,
                decode_steps=drafted_steps, target_s=clock.seconds("drafted", "verified"),
                target_positions=target_positions, total_s=clock.seconds("start", "end"),
                accepted=sum(verdicts[s.request_id].kept for s in spec), verified=sum(blocks[s.request_id].keep for s in spec),
                fed_positions=fed if cascading else 0, fed_s=clock.seconds("start", "draft_fed") if cascading else 0.0)
        for s in running:
            self._settle(s)

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

    def _vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """A runner's logits [n, V_runner] -> [n, vocab_size]: the tokenizer's ids only (a view)."""
        return logits if logits.shape[-1] == self.vocab_size else logits[:, : self.vocab_size]

    def _block_size(self, s: Sequence, k_round: int | None = None) -> int:
        """Tokens to draft this round: the policy's k (for a lossless policy, at most this round's dynamic
        block length ``k_round``), capped by max_tokens and by cache room (the block, plus the
        replacement/bonus token, must fit in max_len)."""
        room = self.max_len - len(s.tokens) - 1
        k = s.policy.k if k_round is None or not s.policy.lossless else min(s.policy.k, k_round)
        return min(k, s.params.max_tokens - s.num_emitted, room)

    def _count_positions(self, s: Sequence, start: int, n: int, *, draft: bool) -> None:
        """Count n positions from `start` as prefill (inside the prompt) or generated-region work."""
        prompt_part = max(0, min(n, len(s.prompt_ids) - start))
        if draft:
            s.stats.draft_prefill_tokens += prompt_part
            s.stats.draft_tokens += n - prompt_part
        else:
            s.stats.target_prefill_tokens += prompt_part
            s.stats.target_tokens += n - prompt_part

    def _fetch(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Bring device results to the host: one sync (``cascade.host``), counted."""
        self.stats.host_syncs += 1
        return fetch(*tensors)

    def _after_round(self, seqs: list[Sequence], blocks: dict[str, Block], emitted_before: list[int]) -> None:
        """Let each policy with a state update its requests' (``Policy.after_round``, on the host: no sync)."""
        members = [i for i, s in enumerate(seqs) if has_fields(s.policy.State)]
        for policy, group in group_by_policy(members, [seqs[i].policy for i in members]).items():
            after = policy.after_round(
                stack([seqs[i].policy_state for i in group]),
                torch.tensor([blocks[seqs[i].request_id].escalate for i in group]),
                torch.tensor([seqs[i].num_emitted - emitted_before[i] for i in group], dtype=torch.int64))
            for i, state in zip(group, unstack(after)):
                seqs[i].policy_state = state

    # ------------------------------------------------------------------ 4. target pass
    def _target_pass(
        self, escalated: list[Sequence], blocks: dict[str, Block], target_only: list[Sequence]
    ) -> tuple[dict[str, torch.Tensor] | None, int]:
        """One ragged target pass; returns (per request its logits [n, V]: the block positions + the bonus
        position for escalated sequences (no bonus position after a kept block that ends the request), one
        position for target-only sequences; the positions the pass processed).

        A target that raises ``TargetUnavailable`` leaves every sequence as it was; the error propagates
        when ``on_target_error == "fail"``, else None is returned and the caller degrades the round."""
        members = escalated + target_only
        if not members:
            return {}, 0
        t0 = time.perf_counter()
        blks = [blocks[s.request_id] for s in escalated] + [None] * len(target_only)
        # a block that ends the request is fed without its last token and has no bonus position (its catch-up
        # is never empty: the target lags by at least the previous round's last token); target-only: 0 and 1
        fed, num_logits = (t.tolist() for t in target_layout(
            torch.tensor([blk.keep if blk is not None else 0 for blk in blks]),
            torch.tensor([blk is not None and blk.ends_request for blk in blks])))
        spans = [s.tokens[s.target_len:] + (blk.tokens[:n] if blk is not None else []) for s, blk, n in zip(members, blks, fed)]
        try:
            if self.config.exact_verify:
                logits = self._target_stepwise(members, spans, num_logits)
            else:
                logits = self.target.forward_span([s.row for s in members], spans, num_logits=num_logits)
            logits = self._vocab(logits)
        except TargetUnavailable:
            self.stats.time_target_s += time.perf_counter() - t0
            for s in members:
                s.stats.target_errors += 1
            if self.config.on_target_error == "fail":
                raise
            return None, 0
        out, start = {}, 0
        for s, blk, span, n, n_block in zip(members, blks, spans, num_logits, fed):
            catch_up = len(span) - n_block
            self._count_positions(s, s.target_len, catch_up, draft=False)
            s.stats.target_tokens += len(span) - catch_up
            s.stats.target_scored_tokens += n
            s.target_len += len(span)
            if blk is not None:
                s.stats.escalations += 1
            else:
                s.stats.target_only_steps += 1
            out[s.request_id] = logits[start:start + n]
            start += n
        self.stats.time_target_s += time.perf_counter() - t0
        return out, sum(len(span) for span in spans)

    def _target_stepwise(self, members: list[Sequence], spans: list[list[int]], num_logits: list[int]) -> torch.Tensor:
        """``forward_span`` of the target pass, computed the way target-only decoding computes it at batch 1:
        a prompt in a call of its own (as a target-only request's first round), then one token of one
        sequence per call. A 1-row decode and a k-row verify reduce in different orders, and so do calls
        whose row count differs (GEMM blocking depends on it), so in bf16 they part at near-ties; this path
        makes every target position's arithmetic that of a batch-1 target-only decode, whatever else is in
        the batch (batch-invariant), hence ``speculative`` greedy == batch-1 ``target-only`` greedy token
        for token at any batch in any dtype (and so does ``target-only`` itself in this mode). The cost: a
        block is verified in as many sequential target calls as it has tokens, one sequence at a time.
        Returns logits [sum(num_logits), V] in ``forward_span``'s layout."""
        rows = [s.row for s in members]
        picked: list[list[torch.Tensor]] = [[] for _ in members]
        pos = [0] * len(members)
        for i, s in enumerate(members):
            if s.target_len == 0:  # the prompt, alone, as target-only's first round feeds it
                n = len(s.prompt_ids)
                logits = self.target.forward_span([rows[i]], [spans[i][:n]], num_logits=[1])
                if n > len(spans[i]) - num_logits[i]:
                    picked[i].append(logits[0])
                pos[i] = n
        while True:
            active = [i for i in range(len(members)) if pos[i] < len(spans[i])]
            if not active:
                break
            for i in active:  # one row per call: a row's result never depends on the others
                logits = self.target.forward_span([rows[i]], [[spans[i][pos[i]]]], num_logits=[1])
                pos[i] += 1
                if pos[i] > len(spans[i]) - num_logits[i]:
                    picked[i].append(logits[0])
        return torch.cat([torch.stack(p) for p in picked])

    def _degrade_to_draft(self, escalated: list[Sequence], blocks: dict[str, Block], target_only: list[Sequence]) -> None:
        """on_target_error == "draft-only": escalated blocks are kept as drafted (unverified), and
        sequences that only the target was decoding switch to the draft for the rest of the request."""
        for s in escalated:  # the whole drafted block stands: a block its policy cut to 0 tokens (bild,
            block = blocks[s.request_id]  # chow-cut) would otherwise be drafted and cut again every round
            block.escalate, block.keep = False, len(block.tokens)
        fallback = make_policy("draft-only")
        for s in target_only:
            s.policy, s.policy_state = fallback, fallback.init_state()

    # ------------------------------------------------------------------ 6. commit
    def _commit_cascade(self, s: Sequence, block: Block, verdict: Verdict | None) -> None:
        if verdict is None:  # not escalated: the kept block is emitted as drafted
            kept = block.keep
            new, sources, logprobs = block.tokens[:kept], [TokenSource.DRAFT] * kept, block.logprobs[:kept]
            tops = block.top[:kept]
        else:
            kept = verdict.kept
            new = block.tokens[:kept] + verdict.extra
            s.escalation_lengths.append(len(new))
            sources, logprobs, tops = verdict.sources, verdict.logprobs, verdict.top
            s.target_len = min(s.target_len, len(s.tokens) + kept)  # (a block that ends the request was fed
            self.target.truncate([s.row], [s.target_len])            #  without its last token)
        # the draft cache keeps the kept tokens it was fed, and always lags the last token (it is fed next round)
        end = min(len(s.tokens) + kept, len(s.tokens) + len(new) - 1)
        if s.draft_len > end:
            self.draft.truncate([s.row], [end])
            s.draft_len = end
        self._append(s, new, sources, logprobs, tops)

    def _sample_target_only(self, seqs: list[Sequence], target_logits: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The next token of every target-only sequence and its natural log-prob, on the device: [] or
        [tokens [T] int64, logprobs [T] float32]."""
        if not seqs:
            return []
        params = [s.params for s in seqs]
        filtered = filter_logits(torch.cat([target_logits[s.request_id][-1:] for s in seqs]), params,
                                 [s.num_emitted for s in seqs], self.eos_token_ids)
        toks = sample(filtered, params, [s.rng for s in seqs])
        K = max(p.logprobs for p in params)
        return [toks, natural_logprob(filtered, toks)] + (top_logprobs(filtered, K) if K else [])

    def _append(self, s: Sequence, new: list[int], sources: list[TokenSource], logprobs: list[float],
                tops: list[list[tuple[int, float]]] | None = None) -> None:
        """Emit tokens one by one, applying EOS, stop strings and max_tokens. Nothing after the token
        that ends the request is kept: not in the tokens, the log-probs or the counts. The token that
        completes a stop string is kept (its text is cut at the stop string)."""
        for i, (tok, src, lp) in enumerate(zip(new, sources, logprobs)):
            if tok in s.end_ids:
                self._finish(s, "stop")
                break
            s.tokens.append(tok)
            s.sources.append(src)
            s.token_logprobs.append(lp)
            if s.params.logprobs:
                s.top_logprobs.append(tops[i])
            s.stats.emitted_tokens += 1
            if self._completes_stop(s):
                self._finish(s, "stop")
                break
            if s.num_emitted >= s.params.max_tokens:
                self._finish(s, "length")
                break
        if self.detokenize is not None:
            searched = max(0, len(s.text) - max(map(len, s.params.stop), default=0))
            self._extend_text(s)
            cut = _first_stop(s.text, s.params.stop, searched)
            if cut is not None:  # (found above already, unless a stop string spans more than the tail)
                s.text = s.text[:cut]
                self._finish(s, "stop")

    # ------------------------------------------------------------------ 7. settle
    def _settle(self, s: Sequence) -> None:
        """At the end of a request its policy decides on the answer (``Policy.at_finish``): it stands (what
        was held back is released with the decided state) or the target answers again from the prompt."""
        if not s.finished or s.finish_reason == "abort":
            return
        s.policy_state, answer_again = s.policy.at_finish(s.policy_state, s.token_logprobs)
        if answer_again:
            self._restart_on_target(s)

    def _restart_on_target(self, s: Sequence) -> None:
        """Discard the draft's answer (its work stays counted) and let the target answer from the prompt (the
        policy's state, set by ``at_finish``, now plans target rounds)."""
        n_prompt = len(s.prompt_ids)
        s.cut_output(0)
        s.text, s.detok_prefix, s.detok_read, s.finished, s.finish_reason = "", 0, 0, False, None
        s.stats.routed_to_target = 1
        if s.draft_len > n_prompt:
            self.draft.truncate([s.row], [n_prompt])
            s.draft_len = n_prompt
        if s.target_len > n_prompt:  # the target has not run for this request; kept for safety
            self.target.truncate([s.row], [n_prompt])
            s.target_len = n_prompt

    def _extend_text(self, s: Sequence) -> None:
        """Add the text of the tokens emitted since the last call (``cascade.detokenize.extend_text``; a
        finished request's held-back partial character too)."""
        added, s.detok_prefix, s.detok_read = extend_text(self.detokenize, s.output_ids, s.detok_prefix,
                                                          s.detok_read, final=s.finished)
        s.text += added

    def _finish(self, s: Sequence, reason: str) -> None:
        if not s.finished:
            s.finished, s.finish_reason = True, reason
            if self.detokenize is not None and reason not in ("stop", "abort"):
                self._extend_text(s)  # an unfinished character held back is text now (as one decode would give)

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
            request_id=s.request_id, new_token_ids=s.output_ids[start:ready], new_sources=s.sources[start:ready],
            new_logprobs=s.token_logprobs[start:ready], new_top_logprobs=s.top_logprobs[start:ready],
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


def _drafts(s: Sequence) -> bool:
    """Does this sequence's next round start with the draft? (Its policy's plan: not target-only, not a
    request-level one routed to the target.)"""
    return s.plan.drafts


def _first_stop(text: str, stops: Seq[str], start: int = 0) -> int | None:
    hits = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(hits) if hits else None
