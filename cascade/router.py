"""The learned deferral router: a tiny MLP on the draft's confidence statistics that predicts, per drafted
position, the probability that the target's greedy token differs from the draft's.

Why: a max-prob threshold reads one number; the router reads the confidence kernel's four (max q, the
top-1 / top-2 margin, the entropy, log q of the drafted token) through a small non-linear model trained
for the event a cascade cares about, where the target disagrees (CITER, R2R and Judge Decoding train
comparable routers, on richer features).

- Features (``router_features``): computed identically by the engine (from ``BlockConfidence``), by the
  replay (from ``PathStats``) and by training, so a router scores the same position the same way in all
  three.
- Labels: free, from teacher forcing: along each recorded draft answer, 1 where ``argmax p != argmax q``
  (``cascade.bench.paths.PathStats``); no human labels.
- Model: ``features (F) -> hidden (H, SiLU) -> 1`` with inputs standardised by the training set's mean and
  standard deviation; a few hundred parameters, so scoring costs one ``[N, F] x [F, H]`` matmul per round
  for every drafted position of the batch, on the runner's device.
- File: JSON (``save`` / ``load``) next to the converted draft (``ROUTER_FILE`` in the draft's model
  directory); ``Cascade.from_pretrained`` loads it when present, and ``cascade train-router`` writes it.

The ``learned`` policy (``cascade.policies.learned``) reads the score from ``BlockConfidence.router``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

ROUTER_FILE = "router.json"
FEATURES = ("max_prob", "margin", "entropy", "token_logprob", "log_one_minus_max_prob")
FORMAT_VERSION = 1


def router_features(max_prob: torch.Tensor, margin: torch.Tensor, entropy: torch.Tensor,
                    token_logprob: torch.Tensor) -> torch.Tensor:
    """Per-position statistics (any equal shapes [...]) -> features [..., F] float32 (``FEATURES``)."""
    mp = max_prob.float()
    return torch.stack([mp, margin.float(), entropy.float(), token_logprob.float().clamp_min(-30.0),
                        (1.0 - mp).clamp_min(1e-6).log()], dim=-1)


@dataclass
class DeferralRouter:
    """A trained router: standardisation + a one-hidden-layer MLP (see the module docstring)."""

    mean: torch.Tensor  # [F]
    std: torch.Tensor  # [F]
    w1: torch.Tensor  # [F, H]
    b1: torch.Tensor  # [H]
    w2: torch.Tensor  # [H]
    b2: torch.Tensor  # [] scalar
    info: dict  # how it was trained (data, sizes, AUCs), saved with it

    def to(self, device) -> "DeferralRouter":
        moved = {k: getattr(self, k).to(device) for k in ("mean", "std", "w1", "b1", "w2", "b2")}
        return DeferralRouter(**moved, info=self.info)

    @property
    def device(self) -> torch.device:
        return self.w1.device

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, F] -> [N] logits of P(target disagrees)."""
        x = (features.to(self.w1.device) - self.mean) / self.std
        return torch.nn.functional.silu(x @ self.w1 + self.b1) @ self.w2 + self.b2

    @torch.no_grad()
    def score(self, max_prob: torch.Tensor, margin: torch.Tensor, entropy: torch.Tensor,
              token_logprob: torch.Tensor) -> torch.Tensor:
        """Per-position statistics [...] -> P(target disagrees) [...] float32, on the router's device."""
        feats = router_features(max_prob, margin, entropy, token_logprob)
        shape = feats.shape[:-1]
        return torch.sigmoid(self.logits(feats.reshape(-1, feats.shape[-1]))).reshape(shape)

    # ------------------------------------------------------------------ file
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = {k: getattr(self, k).detach().cpu().tolist() for k in ("mean", "std", "w1", "b1", "w2", "b2")}
        fingerprint = hashlib.sha256(json.dumps(weights).encode()).hexdigest()[:16]
        self.info = {**self.info, "fingerprint": fingerprint}  # names these weights in the bench's cache keys
        blob = {"format": FORMAT_VERSION, "features": list(FEATURES), "info": self.info, **weights}
        path.write_text(json.dumps(blob) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "DeferralRouter":
        """Read a router file; ValueError naming the file when it is not one this version wrote."""
        try:
            blob = json.loads(Path(path).read_text())
            if blob.get("format") != FORMAT_VERSION or tuple(blob.get("features", ())) != FEATURES:
                raise ValueError(f"format {blob.get('format')!r} with features {blob.get('features')!r}")
            t = {k: torch.tensor(blob[k], dtype=torch.float32, device=device) for k in ("mean", "std", "w1", "b1", "w2", "b2")}
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"router file {path}: not a cascade router ({exc}); retrain it with `cascade train-router`") from None
        return cls(**t, info=blob.get("info", {}))


def train_router(features: torch.Tensor, labels: torch.Tensor, *, hidden: int = 16, steps: int = 400,
                 lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0, info: dict | None = None) -> DeferralRouter:
    """Fit the router on features [N, F] and labels [N] (1 = the target disagrees) by full-batch Adam on the
    logistic loss, so the score is a probability (``learned``'s cost-aware entry sums it as expected
    disagreements). Deterministic for a seed."""
    if features.ndim != 2 or features.shape[1] != len(FEATURES) or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be [N, {len(FEATURES)}] and labels [N], got {tuple(features.shape)} and {tuple(labels.shape)}")
    y = labels.float()
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("labels: need both agreements and disagreements to train a router")
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    F = x.shape[1]
    w1 = (torch.randn(F, hidden, generator=gen) / math.sqrt(F)).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(hidden, generator=gen) / math.sqrt(hidden)).requires_grad_()
    b2 = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=lr, weight_decay=weight_decay)
    xs = (x - mean) / std
    for _ in range(steps):
        opt.zero_grad()
        logit = torch.nn.functional.silu(xs @ w1 + b1) @ w2 + b2
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
        loss.backward()
        opt.step()
    return DeferralRouter(mean, std, w1.detach(), b1.detach(), w2.detach(), b2.detach().clone(),
                          info={**(info or {}), "hidden": hidden, "steps": steps, "train_positions": int(len(y)),
                                "train_disagreements": int(y.sum())})


def roc_auc(scores: Sequence[float] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Area under the ROC curve (the probability that a random positive outscores a random negative, ties
    counted half); NaN without both classes."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten().bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    # average ranks over ties
    uniq, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def load_router(model_dir: str | Path, device="cpu") -> DeferralRouter | None:
    """The router saved next to a model (``ROUTER_FILE`` in its directory), or None when there is none."""
    path = Path(model_dir) / ROUTER_FILE
    return DeferralRouter.load(path, device=device) if path.is_file() else None
