"""Cascade policies: a trigger (draft-only test: escalate this block or not) and a deferral rule (at
each verified position, the distribution the draft token is verified against), behind one registry.

Modules: ``base`` (the Policy contract, registry, parsing, distribution-level speculative sampling), ``state``
(the per-request state a policy carries between rounds, and the ``RoundPlan`` it declares from it),
``baselines`` (speculative, draft-only, target-only), ``speculative_cascades`` (chow, diff, opt,
token-v1..v3), ``bild`` (bild), ``handoff`` (handoff, handoff-v3), ``learned`` (learned), ``routing`` (quantile, oracle), ``takeover`` (takeover, takeover-spec). Add a policy by writing one class with
``@register("name")``; ``make_policy`` / ``parse_policy`` turn a name and parameters (from the library,
CLI or HTTP) into an instance, with ValueErrors that name the bad field.
"""

from cascade.policies.base import (
    DEFAULT_K,
    BlockConfidence,
    Policy,
    VerifyDistributions,
    make_policy,
    parse_policy,
    parse_value,
    policy_names,
    register,
    residual_distribution,
    split_policy_specs,
    speculative_acceptance,
    verify_distributions,
)
from cascade.policies.baselines import DraftOnly, Speculative, TargetOnly
from cascade.policies.bild import BiLD
from cascade.policies.handoff import Handoff, HandoffV3
from cascade.policies.learned import Learned
from cascade.policies.routing import Oracle, Quantile, linear_quantile
from cascade.policies.speculative_cascades import (
    Chow,
    Diff,
    Opt,
    TokenV1,
    TokenV2,
    TokenV3,
)
from cascade.policies.takeover import Takeover, TakeoverSpec

__all__ = [
    "DEFAULT_K", "BlockConfidence", "Policy", "VerifyDistributions", "make_policy", "parse_policy", "parse_value",
    "policy_names", "register", "residual_distribution", "split_policy_specs", "speculative_acceptance", "verify_distributions",
    "Speculative", "DraftOnly", "TargetOnly", "Chow", "Diff", "Opt", "TokenV1", "TokenV2", "TokenV3", "BiLD", "Handoff", "HandoffV3", "Learned",
    "Quantile", "Oracle", "linear_quantile", "Takeover", "TakeoverSpec",
]
