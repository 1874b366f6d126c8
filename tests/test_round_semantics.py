"""What one round does at the edges, on a hand-built pair whose logits depend on the token history only
(``scripted_pair``), so every expected token and counter is worked out by hand: a drafted EOS or stop
string ends the block, tokens past a stop string are trimmed everywhere, the bonus token's semantics
(and chow-cut's relation to Chow), the rules' own trigger, OPT's TV convention, and BiLD as the authors'
code runs it (hand-over after k tokens, no rollback where the replacement equals the draft token)."""

from __future__ import annotations

import pytest
import torch

from cascade import SamplingParams, TokenSource
from cascade.policies import parse_policy
from cascade.verification import verify_stats

from scripted_pair import chain, scripted_cascade

EOS = 3
LETTERS = "abcdefghijklmnop"


def letters(ids) -> str:
    return "".join(LETTERS[int(i)] for i in ids)


def one(c, policy, max_tokens=12, stop=(), prompt=(0,)):
    [r] = c.generate([list(prompt)], SamplingParams(max_tokens=max_tokens, stop=stop), policy=parse_policy(policy))
    assert c.engine.scheduler.num_free_rows == c.engine.max_rows
    return r


# ------------------------------------------------------------------ 1. a drafted EOS ends the block
@pytest.fixture(scope="module")
def eos_pair():
    # draft: 0 -> 1 -> 2 -> EOS, sure of each; past the EOS it is unsure (max prob 0.3), which used to fire
    # the trigger on positions that are never emitted
    draft = chain({0: 1, 1: 2, 2: EOS, EOS: 4, 4: 4}, confidence={EOS: 0.3, 4: 0.3})
    target = chain({0: 1, 1: 2, 2: EOS, EOS: 4, 4: 4})
    return scripted_cascade(draft, target, eos=[EOS])


@pytest.mark.parametrize("policy", ["chow(alpha=0.1, k=5)", "draft-only(k=5)", "diff(alpha=0.1, trigger_below=0.9, k=5)"])
def test_drafted_eos_ends_the_block(eos_pair, policy):
    r = one(eos_pair, policy)
    assert r.token_ids == [1, 2] and r.finish_reason == "stop"
    s = r.stats
    # one prefill position gives token 1, then two decode steps give 2 and EOS: nothing past the EOS
    assert s.draft_tokens == 2
    assert s.escalations == 0 and s.target_tokens == 0 and s.target_prefill_tokens == 0


def test_a_verified_block_that_ends_the_request_scores_no_bonus_position(eos_pair):
    r = one(eos_pair, "speculative(k=5)")
    assert r.token_ids == [1, 2] and r.finish_reason == "stop"
    s = r.stats
    assert s.escalations == 1 and s.draft_tokens == 2
    # the target predicts 1, 2 and the EOS from the prompt, 1 and 2: the EOS itself is not fed, no bonus
    assert s.target_tokens == 2 and s.target_scored_tokens == 3
    assert s.accepted_tokens == 3 and s.bonus_tokens == 0
    # max_tokens ends the request too: the block of 2 is the last, so no bonus position either
    r = one(eos_pair, "speculative(k=5)", max_tokens=2)
    assert r.token_ids == [1, 2] and r.finish_reason == "length"
    assert r.stats.target_tokens == 1 and r.stats.target_scored_tokens == 2 and r.stats.bonus_tokens == 0


# ------------------------------------------------------------------ 2. stop strings trim the tokens
@pytest.fixture(scope="module")
def stop_pair():
    # 0 -> 1 -> 2 -> 3 -> 4 -> 5 ... ("b", "c", "d", "e", "f"); unsure only of the token after "d"
    draft = chain({i: i + 1 for i in range(12)}, confidence={3: 0.3})
    target = chain({i: i + 1 for i in range(12)})
    return scripted_cascade(draft, target, detokenize=letters)


@pytest.mark.parametrize("policy", ["chow(alpha=0.1, k=5)", "draft-only(k=5)", "speculative(k=5)", "target-only",
                                    "quantile(tau=-0.5)"])
@pytest.mark.parametrize("stop", ["d", "cd"])
def test_stop_string_trims_tokens_logprobs_and_counts(stop_pair, policy, stop):
    r = one(stop_pair, policy, stop=(stop,))
    assert r.text == "bc"[: len("bc") - (len(stop) - 1)] and r.finish_reason == "stop"
    # the token that completes the stop string is the last one; nothing after it is kept or counted
    assert r.token_ids == [1, 2, 3]
    assert len(r.token_logprobs) == len(r.token_sources) == r.stats.emitted_tokens == 3
    if policy.startswith(("chow", "draft-only", "quantile")):
        # the unsure position after "d" is never drafted, so it can neither fire the trigger nor lower the
        # quantile score (a quantile(-0.5) route needs a token with log q < -0.5: none is emitted)
        assert r.stats.draft_tokens == 2 and r.stats.escalations == 0 and r.stats.target_tokens == 0
        assert r.stats.routed_to_target == 0


def test_stop_string_completed_by_the_target(stop_pair):
    """A token the target decides may complete the stop string: it is the last token of its round."""
    r = one(stop_pair, "speculative(k=2)", stop=("e",))
    assert r.token_ids == [1, 2, 3, 4] and r.text == "bcd"
    assert r.token_sources[-1] is TokenSource.VERIFIED


# ------------------------------------------------------------------ 3. the bonus token
@pytest.fixture(scope="module")
def bonus_pair():
    # The draft is unsure of the first token only. The target agrees with the draft everywhere except
    # after token 2, where it says 5 (the draft says 3, and is sure of it).
    draft = chain({0: 1, 1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 6: 7}, confidence={0: 0.5})
    target = chain({0: 1, 1: 2, 2: 5, 3: 4, 4: 5, 5: 6, 6: 7})
    return scripted_cascade(draft, target)


def test_bonus_token_is_a_free_target_token(bonus_pair):
    """chow(k=2): the block [1, 2] escalates (1 is unsure); both kept; the bonus after it is the target's 5
    although the draft is sure of 3 there. With k=1 the bonus lands after token 1 (the target's 2, the
    same as the draft's) and the draft's 3 stands. So chow's output depends on k: documented."""
    D, V, B = TokenSource.DRAFT, TokenSource.VERIFIED, TokenSource.BONUS
    r2 = one(bonus_pair, "chow(alpha=0.1, k=2)", max_tokens=4)
    assert r2.token_ids == [1, 2, 5, 6] and r2.token_sources == [V, D, B, D]
    r1 = one(bonus_pair, "chow(alpha=0.1, k=1)", max_tokens=4)
    assert r1.token_ids == [1, 2, 3, 4] and r1.token_sources == [V, B, D, D]


def _chow_per_position(draft, target, prompt, alpha, n):
    """The authors' notebook's Chow cascade, greedy: one token per step, the draft's argmax where its max
    prob >= 1 - alpha, the target's argmax elsewhere."""
    seq = list(prompt)
    for _ in range(n):
        q = draft.logits(seq).softmax(-1)
        seq.append(int(q.argmax()) if float(q.max()) >= 1 - alpha else int(target.logits(seq).argmax()))
    return seq[len(prompt):]


def test_chow_cut_is_the_notebooks_per_position_chow(bonus_pair):
    r = one(bonus_pair, "chow-cut(alpha=0.1, k=2)", max_tokens=4)
    assert r.token_ids == [1, 2, 3, 4] == _chow_per_position(bonus_pair.draft, bonus_pair.target, [0], 0.1, 4)
    assert r.token_sources == [TokenSource.BONUS, TokenSource.DRAFT, TokenSource.DRAFT, TokenSource.DRAFT]
    assert r.token_ids != one(bonus_pair, "chow(alpha=0.1, k=2)", max_tokens=4).token_ids


# ------------------------------------------------------------------ 4. the rules' own trigger
@pytest.fixture(scope="module")
def sure_pair():
    # the draft is sure (0.99) everywhere; the target is surer (0.999) and disagrees after token 2
    draft = chain({i: i + 1 for i in range(12)}, confidence=0.99)
    target = chain({**{i: i + 1 for i in range(12)}, 2: 7}, confidence=0.999)
    return scripted_cascade(draft, target)


@pytest.mark.parametrize("rule", ["diff", "opt", "token-v1", "token-v2", "token-v3"])
def test_rule_trigger_is_separate_from_alpha(sure_pair, rule):
    draft_only = one(sure_pair, "draft-only", max_tokens=6).token_ids
    target_only = one(sure_pair, "target-only", max_tokens=6).token_ids
    assert draft_only != target_only
    # alpha = 1 no longer silences the trigger: every block is verified (the paper's setting) ...
    never = one(sure_pair, f"{rule}(alpha=1.0, k=3)", max_tokens=6)
    assert never.stats.escalations == 2
    # ... and a draft-only trigger below the draft's confidence never escalates, whatever the rule's alpha
    quiet = one(sure_pair, f"{rule}(alpha=0.0, trigger_below=0.9, k=3)", max_tokens=6)
    assert quiet.stats.escalations == 0 and quiet.token_ids == draft_only
    # at alpha = 0 every rule defers to the surer target wherever the two disagree
    assert one(sure_pair, f"{rule}(alpha=0.0, k=3)", max_tokens=6).token_ids == target_only


def test_opt_tv_is_between_the_sampling_distributions():
    """Greedy rows: TV between the one-hot sampling distributions, 1[x != argmax p] (the notebook's
    convention); sampled rows: TV between softmax(logits / T)."""
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(6, 40, generator=g) * 3, torch.randn(6, 40, generator=g) * 3
    p[:3] = q[:3] + 0.3 * torch.randn(3, 40, generator=g)  # some rows agree on the argmax
    x = q.argmax(-1)
    temps = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.7, 1.3])
    v = verify_stats(q, p, x, temps, torch.arange(6), backend="torch")
    greedy = (x != p.argmax(-1)).float()
    assert torch.equal(v.tv[:4], greedy[:4])
    for i in (4, 5):
        qs, ps = (q[i] / temps[i]).softmax(-1), (p[i] / temps[i]).softmax(-1)
        assert float(v.tv[i]) == pytest.approx(float((ps - qs).clamp_min(0).sum()), abs=1e-5)
    assert torch.equal(v.token, x)


# ------------------------------------------------------------------ 5. BiLD as the authors run it
def test_bild_hands_over_after_k_draft_tokens():
    """No fallback ever fires (the draft is sure), yet the target checks every k = 3 tokens and adds its
    own token: nothing is released unchecked but a last block that ends the request before k tokens."""
    V, B, D = TokenSource.VERIFIED, TokenSource.BONUS, TokenSource.DRAFT
    table = {i: i + 1 for i in range(12)}
    c = scripted_cascade(chain(table, confidence=0.99), chain(table, confidence=0.999))
    r = one(c, "bild(fallback=0.5, rollback=5, k=3)", max_tokens=10)
    assert r.token_ids == list(range(1, 11))
    assert r.stats.escalations == 2
    assert r.token_sources == [V, V, V, B, V, V, V, B, D, D]


def test_bild_skips_a_rollback_whose_replacement_is_the_draft_token():
    # the target's argmax after token 1 is the draft's 2, but it gives it only p = 0.3 (CE 1.2 nats)
    draft = chain({i: i + 1 for i in range(12)}, confidence=0.99)
    target = chain({i: i + 1 for i in range(12)}, confidence={1: 0.3})
    c = scripted_cascade(draft, target)
    r = one(c, "bild(fallback=0.5, rollback=1.0, k=4)", max_tokens=5)
    assert r.token_ids == [1, 2, 3, 4, 5]
    assert r.stats.rejected_tokens == 0 and r.stats.accepted_tokens == 4 and r.stats.bonus_tokens == 1
    # where the replacement differs, it rolls back: the target is unsure of 2 and prefers 9
    target2 = chain({**{i: i + 1 for i in range(12)}, 1: 9}, confidence={1: 0.6})
    r = one(scripted_cascade(draft, target2), "bild(fallback=0.5, rollback=1.0, k=4)", max_tokens=5)
    assert r.token_ids[:2] == [1, 9] and r.stats.rejected_tokens == 1
