"""cascade: a speculative cascade runtime for LLM inference.

A small draft model serves every request; its exact token-level confidence decides which spans a larger
target model verifies in one parallel forward pass. Importing this package loads no model and writes no
environment variable.

Vocabulary (used in code, docs and metrics):

- **draft model** ``q``: the small model; decodes every token.
- **target model** ``p``: the large model; runs only on escalated spans.
- **block**: up to ``k`` tokens the draft proposes in one round.
- **confidence**: per-position statistics of the draft distribution, exact over the full vocabulary:
  max-prob, top-1/top-2 margin, entropy, log-prob of the chosen token.
- **trigger**: the draft-only test that decides whether a block is escalated (no target output needed).
- **escalation**: one target forward pass over a block (plus any catch-up tokens).
- **catch-up**: tokens the draft emitted without escalation; the target's KV cache lags by them and
  prefills them at its next escalation.
- **deferral rule** ``δ(q, p)``: at a verified position, picks the acceptance distribution
  ``π = (1 - δ)·q + δ·p``.
- **acceptance**: keep draft token ``x`` with probability ``min(1, π(x)/q(x))``; at the first rejection
  resample from ``norm(max(0, π - q))`` and drop the rest of the block; if all are accepted, a bonus
  token comes from ``p`` (a free target token, whatever the rule says there; none after a block that
  ends the request).
- **policy**: trigger + deferral rule (+ ``k``); a registered name with parameters, e.g. ``chow(alpha=0.2)``.
- **lossless**: a policy whose output distribution is exactly the target's (``speculative``: always
  escalate, ``δ ≡ 1``); its greedy output equals target-only greedy output token for token where the
  verify pass and the decode step compute alike: with ``EngineConfig.exact_verify`` (batch-invariant: equal
  to batch-1 target-only) in any dtype at any batch, and in practice in fp32; in bf16 a multi-row verify
  pass and a 1-row decode round differently and part at near-ties (README, "Lossless").

Public API: ``Cascade`` (load a pair, ``generate``), ``SamplingParams``, ``EngineConfig``, the policy
registry (``make_policy``, ``parse_policy``, ``policy_names``) and ``load_pair``.
"""

from importlib import metadata as _metadata

from cascade.config import EngineConfig, SamplingParams
from cascade.metrics import RequestStats, TokenSource
from cascade.policies import Policy, make_policy, parse_policy, policy_names

try:
    __version__ = _metadata.version("cascade")
except _metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
    __version__ = "0+unknown"

__all__ = [
    "__version__", "Cascade", "GenerationResult", "SamplingParams", "EngineConfig", "Policy", "RequestStats", "TokenSource",
    "make_policy", "parse_policy", "policy_names", "load_pair",
]


def __getattr__(name: str):
    # The library module pulls in the engine and the kernels' dispatch; load it on first use.
    if name in ("Cascade", "GenerationResult"):
        from cascade import library

        return getattr(library, name)
    raise AttributeError(f"module 'cascade' has no attribute {name!r}")


def load_pair(draft=None, target=None, **kwargs):
    """Shorthand for ``Cascade.from_pretrained(draft, target, **kwargs)``."""
    from cascade.library import Cascade

    return Cascade.from_pretrained(draft, target, **kwargs)
