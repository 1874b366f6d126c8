"""The cascade round (DESIGN.md, "One round"), run for every active sequence at once. No HTTP, no CLI.

One ``Engine.step()``:
1. admits waiting requests into free cache rows;
2. drafts up to ``k`` tokens for every sequence whose policy uses the draft: one ragged draft pass feeds
   each sequence's pending tokens (the prompt on its first round, else the last one or two emitted
   tokens), then one batched ``decode`` per further position;
3. computes the draft's confidence over all drafted positions in one call;
4. lets each policy's trigger decide, per sequence, the block to keep and whether to escalate it;
5. runs ONE ragged target pass over every escalated sequence (catch-up + block, logits for the block
   positions and the bonus position) and every target-only sequence (its pending tokens);
6. computes the fused verify statistics of all escalated positions in one call, applies each policy's
   deferral rule and acceptance test, and emits accepted tokens plus one replacement or bonus token;
7. rolls both caches back to the accepted length (a length update) and applies stop conditions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Sequence as Seq

import torch

from cascade.config import EngineConfig, SamplingParams
from cascade.confidence import confidence_stats
from cascade.metrics import EngineStats, RequestStats, TokenSource
from cascade.models.base import ModelRunner
from cascade.policies import BlockConfidence, Policy
from cascade.sampling import filter_logits, make_generator, noise_seeds, sample, uniforms
from cascade.scheduler import Scheduler, Sequence
from cascade.verification import VerifyStats, verify_stats


@dataclass
class RequestOutput:
    """What one round produced for one request (deltas since the previous output)."""

    request_id: str
    new_token_ids: list[int]
    new_sources: list[TokenSource]
    text: str  # the whole output text so far
    finished: bool
    finish_reason: str | None
    stats: RequestStats


@dataclass
class _Block:
    """A sequence's drafted block within the current round."""

    tokens: list[int]  # drafted tokens d_1..d_k
    logits: torch.Tensor  # [k, V] float32, filtered draft logits the tokens were drawn from
    keep: int = 0  # block length chosen by the trigger
    escalate: bool = False


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
    ) -> None:
        if draft.vocab_size != target.vocab_size:
            raise ValueError(f"draft vocab {draft.vocab_size} != target vocab {target.vocab_size}: the pair must share a tokenizer")
        self.draft, self.target = draft, target
        self.config = config or EngineConfig(max_rows=min(draft.max_rows, target.max_rows))
        self.max_rows = min(draft.max_rows, target.max_rows, self.config.max_rows)
        self.max_len = min(draft.max_len, target.max_len)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.detokenize = detokenize
        self.scheduler = Scheduler(self.max_rows)
        self.stats = EngineStats()
        self._device = target.device

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams, policy: Policy) -> None:
        """Queue a request. Raises ValueError naming the field for an empty or too long prompt."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("prompt: must not be empty")
        if len(prompt_ids) > self.max_len - 2:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens is longer than the cache allows (max_len={self.max_len}, at most {self.max_len - 2} prompt tokens)")
        bad = [t for t in prompt_ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.target.vocab_size})")
        if policy.k > self.config.max_draft_block:
            raise ValueError(f"k: {policy.k} exceeds the engine's max_draft_block={self.config.max_draft_block}")
        gen = make_generator(params.seed, "cpu")
        self.scheduler.add(Sequence(request_id, prompt_ids, params, policy, gen))

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

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ the round
    def step(self) -> list[RequestOutput]:
        """Run one round for every running sequence; return the new output of each."""
        t_start = time.perf_counter()
        self.scheduler.admit()
        running = [s for s in self.scheduler.running.values() if not s.finished]
        for s in running:
            if self._block_size(s) <= 0:
                self._finish(s, "length")
        seqs = [s for s in running if not s.finished]
        cascading = [s for s in seqs if s.policy.uses_draft]
        target_only = [s for s in seqs if not s.policy.uses_draft]

        blocks = self._draft(cascading) if cascading else {}
        if blocks:
            t0 = time.perf_counter()
            self._trigger(cascading, blocks)
            self.stats.time_kernels_s += time.perf_counter() - t0
        escalated = [s for s in cascading if blocks[s.request_id].escalate]
        target_logits = self._target_pass(escalated, blocks, target_only)

        t0 = time.perf_counter()
        accepted = self._verify(escalated, blocks, target_logits)
        self.stats.time_kernels_s += time.perf_counter() - t0

        for s in cascading:
            self._commit_cascade(s, blocks[s.request_id], accepted.get(s.request_id))
        for s in target_only:
            self._commit_target_only(s, target_logits[s.request_id])

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

    def _block_size(self, s: Sequence) -> int:
        """Tokens to draft this round: the policy's k, capped by max_tokens and by cache room (the
        block, plus the replacement/bonus token, must fit in max_len)."""
        room = self.max_len - len(s.tokens) - 1
        return min(s.policy.k, s.params.max_tokens - s.num_emitted, room)

    # ------------------------------------------------------------------ 1. draft
    def _draft(self, seqs: list[Sequence]) -> dict[str, _Block]:
        t0 = time.perf_counter()
        ks = [self._block_size(s) for s in seqs]
        rows = [s.row for s in seqs]
        pending = [s.tokens[s.draft_len:] for s in seqs]
        for s, span in zip(seqs, pending):
            self._count_positions(s, s.draft_len, len(span), draft=True)
            s.draft_len += len(span)
        logits = self.draft.forward_span(rows, pending, num_logits=[1] * len(seqs))  # [B, V]
        drafted: list[list[int]] = [[] for _ in seqs]
        step_logits: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for j in range(max(ks)):
            if j > 0:
                active = [i for i in active if ks[i] > j]
                row_t = torch.tensor([rows[i] for i in active], dtype=torch.int64, device=self.draft.device)
                ids_t = torch.tensor([drafted[i][-1] for i in active], dtype=torch.int64, device=self.draft.device)
                logits = self.draft.decode(row_t, ids_t)
                for i in active:
                    seqs[i].draft_len += 1
                    seqs[i].stats.draft_tokens += 1
            params = [seqs[i].params for i in active]
            filtered = filter_logits(logits, params)
            toks = sample(filtered, params, [seqs[i].generator for i in active]).tolist()
            for a, i in enumerate(active):
                drafted[i].append(toks[a])
                step_logits[i].append(filtered[a])
        self.stats.time_draft_s += time.perf_counter() - t0
        return {
            s.request_id: _Block(tokens=drafted[i], logits=torch.stack(step_logits[i]))
            for i, s in enumerate(seqs)
        }

    def _count_positions(self, s: Sequence, start: int, n: int, *, draft: bool) -> None:
        """Count n positions from `start` as prefill (inside the prompt) or generated-region work."""
        prompt_part = max(0, min(n, len(s.prompt_ids) - start))
        if draft:
            s.stats.draft_prefill_tokens += prompt_part
            s.stats.draft_tokens += n - prompt_part
        else:
            s.stats.target_prefill_tokens += prompt_part
            s.stats.target_tokens += n - prompt_part

    # ------------------------------------------------------------------ 2-3. confidence + trigger
    def _trigger(self, seqs: list[Sequence], blocks: dict[str, _Block]) -> None:
        all_logits = torch.cat([blocks[s.request_id].logits for s in seqs])  # [N, V]
        temps = torch.cat([torch.full((len(blocks[s.request_id].tokens),), s.params.temperature) for s in seqs])
        tokens = torch.tensor([t for s in seqs for t in blocks[s.request_id].tokens], dtype=torch.int64)
        conf = confidence_stats(all_logits, temps.to(all_logits.device), tokens.to(all_logits.device))
        lens = [len(blocks[s.request_id].tokens) for s in seqs]
        K = max(lens)
        B = len(seqs)
        valid = torch.zeros(B, K, dtype=torch.bool)
        index = torch.zeros(B, K, dtype=torch.int64)
        start = 0
        for b, n in enumerate(lens):
            valid[b, :n] = True
            index[b, :n] = torch.arange(start, start + n)
            start += n

        def pad(x: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, x.float().cpu()[index], torch.zeros(()))

        block_conf = BlockConfidence(
            max_prob=pad(conf.max_prob), margin=pad(conf.margin), entropy=pad(conf.entropy),
            token_logprob=pad(conf.token_logprob), valid=valid, drafted=torch.tensor(lens, dtype=torch.int64),
        )
        for policy, members in _group_by_policy(range(B), [s.policy for s in seqs]).items():
            idx = torch.tensor(members)
            sub = BlockConfidence(*(getattr(block_conf, f.name)[idx] for f in fields(BlockConfidence)))
            keep, escalate = policy.trigger(sub)
            for m, kp, esc in zip(members, keep.tolist(), escalate.tolist()):
                block = blocks[seqs[m].request_id]
                block.keep = max(0, min(int(kp), len(block.tokens)))
                block.escalate = bool(esc) or block.keep == 0  # an empty kept block must let the target decide

    # ------------------------------------------------------------------ 4. target pass
    def _target_pass(
        self, escalated: list[Sequence], blocks: dict[str, _Block], target_only: list[Sequence]
    ) -> dict[str, torch.Tensor]:
        """One ragged target pass; returns per request its logits [n, V]: block positions + bonus for
        escalated sequences, one position for target-only sequences."""
        members = escalated + target_only
        if not members:
            return {}
        t0 = time.perf_counter()
        spans, num_logits = [], []
        for s in members:
            block = blocks[s.request_id].tokens[: blocks[s.request_id].keep] if s.policy.uses_draft else []
            catch_up = s.tokens[s.target_len:]
            self._count_positions(s, s.target_len, len(catch_up), draft=False)
            s.stats.target_tokens += len(block)
            spans.append(catch_up + block)
            num_logits.append(len(block) + 1)
            s.target_len += len(spans[-1])
            if s.policy.uses_draft:
                s.stats.escalations += 1
            else:
                s.stats.target_only_steps += 1
        logits = self.target.forward_span([s.row for s in members], spans, num_logits=num_logits)
        out, start = {}, 0
        for s, n in zip(members, num_logits):
            out[s.request_id] = logits[start:start + n]
            start += n
        self.stats.time_target_s += time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ 5. verify
    def _verify(
        self, seqs: list[Sequence], blocks: dict[str, _Block], target_logits: dict[str, torch.Tensor]
    ) -> dict[str, tuple[int, int, TokenSource, list[TokenSource]]]:
        """Deferral + acceptance for every escalated sequence. Returns per request
        (accepted draft tokens, extra token, its source, sources of the accepted tokens)."""
        result = {}
        verified = [s for s in seqs if blocks[s.request_id].keep > 0]
        stats: VerifyStats | None = None
        if verified:
            q_logits = torch.cat([blocks[s.request_id].logits[: blocks[s.request_id].keep] for s in verified])
            p_logits = torch.cat([
                filter_logits(target_logits[s.request_id][: blocks[s.request_id].keep], [s.params] * blocks[s.request_id].keep)
                for s in verified
            ])
            toks = torch.tensor([t for s in verified for t in blocks[s.request_id].tokens[: blocks[s.request_id].keep]], dtype=torch.int64)
            temps = torch.cat([torch.full((blocks[s.request_id].keep,), s.params.temperature) for s in verified])
            seeds = torch.cat([noise_seeds(blocks[s.request_id].keep, s.generator) for s in verified])
            dev = p_logits.device
            stats = verify_stats(q_logits.to(dev), p_logits, toks.to(dev), temps.to(dev), seeds.to(dev))
        offsets, start = {}, 0
        for s in verified:
            offsets[s.request_id] = start
            start += blocks[s.request_id].keep
        decisions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for policy, members in _group_by_policy(verified, [s.policy for s in verified]).items():
            idx = torch.tensor([i for s in members for i in range(offsets[s.request_id], offsets[s.request_id] + blocks[s.request_id].keep)])
            sub = _take(stats, idx.to(stats.q_token.device))
            delta = policy.deferral(sub).float().cpu()
            accept = policy.acceptance(sub, delta.to(sub.q_token.device)).float().cpu()
            pos = 0
            for s in members:
                n = blocks[s.request_id].keep
                decisions[s.request_id] = (delta[pos:pos + n], accept[pos:pos + n])
                pos += n
        for s in seqs:
            block = blocks[s.request_id]
            n = block.keep
            if n > 0:
                delta, accept = decisions[s.request_id]
                u = uniforms(n, s.generator)
                ok = (u < accept).tolist()
                n_acc = ok.index(False) if False in ok else n
                sources = [TokenSource.VERIFIED if d > 0 else TokenSource.DRAFT for d in delta[:n_acc].tolist()]
            else:
                n_acc, sources = 0, []
            if n_acc < n:
                row = offsets[s.request_id] + n_acc
                replacement = stats.target_token if s.policy.replace_from_target else stats.residual_token
                extra, source = int(replacement[row]), TokenSource.TARGET
                s.stats.rejected_tokens += 1
                s.stats.replaced_tokens += 1
            else:
                bonus_logits = filter_logits(target_logits[s.request_id][n:n + 1], [s.params])
                extra = int(sample(bonus_logits, [s.params], [s.generator])[0])
                source = TokenSource.BONUS
                s.stats.bonus_tokens += 1
            s.stats.accepted_tokens += n_acc
            result[s.request_id] = (n_acc, extra, source, sources)
        return result

    # ------------------------------------------------------------------ 6. commit
    def _commit_cascade(self, s: Sequence, block: _Block, verdict) -> None:
        n_before = len(s.tokens)
        if verdict is None:  # not escalated: the kept block is emitted as drafted
            kept = block.keep
            new = block.tokens[:kept]
            sources = [TokenSource.DRAFT] * kept
        else:
            kept, extra, source, sources = verdict
            new = block.tokens[:kept] + [extra]
            sources = sources + [source]
            self.target.truncate([s.row], [n_before + kept])
            s.target_len = n_before + kept
        if s.draft_len > n_before + kept:
            self.draft.truncate([s.row], [n_before + kept])
            s.draft_len = n_before + kept
        self._append(s, new, sources)

    def _commit_target_only(self, s: Sequence, logits: torch.Tensor) -> None:
        filtered = filter_logits(logits[-1:], [s.params])
        tok = int(sample(filtered, [s.params], [s.generator])[0])
        self._append(s, [tok], [TokenSource.TARGET])

    def _append(self, s: Sequence, new: list[int], sources: list[TokenSource]) -> None:
        """Emit tokens one by one, applying EOS, max_tokens and stop strings."""
        for tok, src in zip(new, sources):
            if tok in self.eos_token_ids and not s.params.ignore_eos:
                self._finish(s, "stop")
                break
            s.tokens.append(tok)
            s.sources.append(src)
            s.stats.emitted_tokens += 1
            if s.num_emitted >= s.params.max_tokens:
                self._finish(s, "length")
                break
        if self.detokenize is not None:
            s.text = self.detokenize(s.output_ids)
            cut = _first_stop(s.text, s.params.stop)
            if cut is not None:
                s.text = s.text[:cut]
                self._finish(s, "stop")

    def _finish(self, s: Sequence, reason: str) -> None:
        if not s.finished:
            s.finished, s.finish_reason = True, reason

    def _release(self, s: Sequence) -> None:
        if s.row >= 0:
            self.draft.free([s.row])
            self.target.free([s.row])
            self.scheduler.release(s)

    def _output(self, s: Sequence) -> RequestOutput:
        start = s.emitted_reported
        s.emitted_reported = s.num_emitted
        return RequestOutput(
            request_id=s.request_id, new_token_ids=s.output_ids[start:], new_sources=s.sources[start:],
            text=s.text, finished=s.finished, finish_reason=s.finish_reason, stats=s.stats,
        )


def _group_by_policy(items, policies: Seq[Policy]) -> dict[Policy, list]:
    groups: dict[Policy, list] = {}
    for item, policy in zip(items, policies):
        groups.setdefault(policy, []).append(item)
    return groups


def _take(v: VerifyStats, idx: torch.Tensor) -> VerifyStats:
    return type(v)(**{f.name: getattr(v, f.name)[idx] for f in fields(v)})


def _first_stop(text: str, stops: Seq[str]) -> int | None:
    hits = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(hits) if hits else None
