"""Step 7 of a round: commit what the round decided. Emit each sequence's tokens (EOS, stop strings and
max_tokens applied token by token, the text extended incrementally), roll both caches back to what stands (a
length update), let each policy update its requests' state (``Policy.after_round``) and, when an answer ends,
decide on it (``Policy.at_finish``: a request-level policy may discard the draft's answer and let the target
answer again).

A ``Committer`` owns nothing but the two runners' rollbacks; it reads the round's ``RoundContext`` (the
detokenizer, the trace) and writes only the sequences it is given.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from cascade.acceptance import Verdict, group_by_policy
from cascade.detokenize import extend_text
from cascade.metrics import EmittedToken, TokenSource
from cascade.models.base import ModelRunner
from cascade.policies.state import RoundOutcome, has_fields, stack, unstack
from cascade.round import PolicyGroup, draft_cache_keeps, next_states
from cascade.round_batch import Block
from cascade.round_context import RoundContext
from cascade.sampling import top_lists
from cascade.scheduler import Sequence


class Committer:
    """Emission, rollback, policy state and end-of-answer decisions (see the module docstring)."""

    def __init__(self, draft: ModelRunner, target: ModelRunner, context: RoundContext) -> None:
        self.draft, self.target = draft, target
        self.context = context

    def commit_block(self, s: Sequence, block: Block, verdict: Verdict | None) -> None:
        """Emit a cascading sequence's round: its kept block as drafted (``verdict`` None: not escalated), or
        the accepted prefix and the replacement / bonus token; roll both caches back to what stands."""
        if verdict is None:  # not escalated: the kept block is emitted as drafted
            kept = block.keep
            new = [block.emitted(j) for j in range(kept)]
        else:
            kept, new = verdict.kept, verdict.emitted
            s.escalation_lengths.append(len(new))
            s.target_len = min(s.target_len, len(s.tokens) + kept)  # (a block that ends the request was fed
            self.target.truncate([s.row], [s.target_len])            #  without its last token)
        # the draft cache keeps the kept tokens it was fed, and always lags the last token (it is fed next round)
        end = len(s.tokens) + draft_cache_keeps(s.draft_len - len(s.tokens), kept, len(new))
        if s.draft_len > end:
            self.draft.truncate([s.row], [end])
            s.draft_len = end
        self.append(s, new)

    def append(self, s: Sequence, new: list[EmittedToken]) -> None:
        """Emit tokens one by one, applying EOS, stop strings and max_tokens. Nothing after the token
        that ends the request is kept: not in the tokens, their records or the counts. The token that
        completes a stop string is kept (its text is cut at the stop string)."""
        for token in new:
            if token.id in s.end_ids:
                self.finish(s, "stop")
                break
            s.tokens.append(token.id)
            s.emitted.append(token)
            s.stats.emitted_tokens += 1
            if self.context.completes_stop(s):
                self.finish(s, "stop")
                break
            if s.num_emitted >= s.params.max_tokens:
                self.finish(s, "length")
                break
        if self.context.detokenize is not None:
            searched = max(0, len(s.text) - max(map(len, s.params.stop), default=0))
            self.extend_text(s)
            cut = _first_stop(s.text, s.params.stop, searched)
            if cut is not None:  # (found above already, unless a stop string spans more than the tail)
                s.text = s.text[:cut]
                self.finish(s, "stop")

    def settle(self, s: Sequence) -> None:
        """At the end of a request its policy decides on the answer (``Policy.at_finish``): it stands (what
        was held back is released with the decided state) or the target answers again from the prompt."""
        if not s.finished or s.finish_reason == "abort":
            return
        s.policy_state, answer_again = s.policy.at_finish(s.policy_state, s.token_logprobs)
        if answer_again:
            self.restart_on_target(s)

    def restart_on_target(self, s: Sequence) -> None:
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

    def extend_text(self, s: Sequence) -> None:
        """Add the text of the tokens emitted since the last call (``cascade.detokenize.extend_text``; a
        finished request's held-back partial character too)."""
        added, s.detok_prefix, s.detok_read = extend_text(self.context.detokenize, s.output_ids, s.detok_prefix,
                                                          s.detok_read, final=s.finished)
        s.text += added

    def finish(self, s: Sequence, reason: str) -> None:
        """End a request (once) with ``reason``; a held-back partial character becomes text unless it stopped."""
        if not s.finished:
            s.finished, s.finish_reason = True, reason
            if self.context.detokenize is not None and reason not in ("stop", "abort"):
                self.extend_text(s)  # an unfinished character held back is text now (as one decode would give)

    def commit_target_tokens(self, seqs: list[Sequence], sampled: list[torch.Tensor]) -> None:
        """Emit the token the target decoded alone for each of ``seqs`` (``sampled``: host [tokens [T],
        log-probs [T]] and, when asked, the top log-probs [T, K] values and ids)."""
        if not seqs:
            return
        trace = self.context.trace
        tops = top_lists(sampled[2], sampled[3], sampled[2].shape[1]) if len(sampled) > 2 else [[]] * len(seqs)
        for s, tok, lp, top in zip(seqs, sampled[0].tolist(), sampled[1].tolist(), tops):
            if trace is not None and trace.wants(s.request_id, "target"):  # the EOS step too
                trace.add_target(s.request_id, tok, lp, top[:s.params.logprobs])
            self.append(s, [EmittedToken(tok, TokenSource.TARGET, lp, tuple(top[:s.params.logprobs]))])

    def after_round(self, seqs: list[Sequence], blocks: list[Block], emitted_before: list[int]) -> None:
        """Let each policy with a state update its requests' (``Policy.after_round`` through
        ``cascade.round.next_states``, as the replay does; on the host: no sync)."""
        members = [i for i, s in enumerate(seqs) if has_fields(s.policy.State)]
        if not members:
            return
        groups = [PolicyGroup(policy, torch.tensor(group, dtype=torch.int64), stack([seqs[i].policy_state for i in group]))
                  for policy, group in group_by_policy(members, [seqs[i].policy for i in members]).items()]
        new = [[t.logprob for t in s.emitted[before:]] for s, before in zip(seqs, emitted_before)]
        logprobs = torch.zeros(len(seqs), max(map(len, new), default=0))
        for i, lps in enumerate(new):
            logprobs[i, :len(lps)] = torch.tensor(lps)
        outcome = RoundOutcome(escalated=torch.tensor([b.escalate for b in blocks]),
                               emitted=torch.tensor(list(map(len, new)), dtype=torch.int64), logprobs=logprobs)
        for g, after in zip(groups, next_states(groups, outcome)):
            for i, state in zip(g.index.tolist(), unstack(after)):
                seqs[i].policy_state = state


def _first_stop(text: str, stops: Seq[str], start: int = 0) -> int | None:
    hits = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(hits) if hits else None
