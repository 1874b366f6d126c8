"""The verify endpoint's wire format, shared by the server (``cascade target-serve``) and the client
(``RemoteVLLM``).

``POST /cascade/v1/verify`` scores the last positions of token-id sequences, the way the in-process target
runner does for a verification: only the positions asked for get log-probs, and the server reads its
prefix cache, so a verification costs its new positions, not the whole sequence. Request::

    {"model": "target", "prompts": [[ids...], ...], "last_n": [n, ...], "top_k": 20}

``top_k``: the top-k log-probs per position (plus the log-prob of the token that is there, as vLLM's
prompt log-probs give it), or ``-1`` for the whole row (exact for every policy; ``V`` floats a position).
Answer::

    {"object": "cascade.verify", "model": "target",
     "results": [{"ids": [[...], ...], "logprobs": [[...], ...], "cached_tokens": c}, ...]}

with whole rows as ``"dense": {"shape": [n, V], "float32_le_base64": "..."}`` instead of ids / logprobs.
``cached_tokens``: prompt tokens the server took from its prefix cache (the client's evidence of reuse).

``GET /cascade/v1/verify`` says the endpoint exists and what it serves (``max_top_k``, ``full_rows``): the
client probes it once per replica and falls back to ``/v1/completions`` on a stock vLLM server.

The endpoint is stateless: any replica can serve any call (failover needs nothing), and one that has not
seen the sequence just computes more of it.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cascade.models.scoring import FULL_ROWS, ScoredPositions

VERIFY_PATH = "/cascade/v1/verify"
VERIFY_OBJECT = "cascade.verify"
MAX_PROMPTS = 1024  # sequences in one call


@dataclass(frozen=True)
class VerifyCall:
    """One parsed, checked verify request."""

    model: str | None
    prompts: list[list[int]]
    last_n: list[int]
    top_k: int  # >= 1, or FULL_ROWS


def request_body(model: str | None, prompts: Sequence[Sequence[int]], last_n: Sequence[int], top_k: int) -> dict:
    """The JSON body of a verify call."""
    body: dict[str, Any] = {"prompts": [[int(t) for t in p] for p in prompts], "last_n": [int(n) for n in last_n],
                            "top_k": int(top_k)}
    if model is not None:
        body["model"] = model
    return body


def _int(x: Any, field: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"{field}: must be an integer, got {type(x).__name__}")
    return x


def parse_request(body: Any, *, vocab_size: int, max_len: int, max_top_k: int, full_rows: bool) -> VerifyCall:
    """A verify request checked against what the server can do; ValueError naming the field otherwise."""
    if not isinstance(body, dict):
        raise ValueError("body: must be a JSON object")
    unknown = sorted(set(body) - {"model", "prompts", "last_n", "top_k"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown field (the verify endpoint takes model, prompts, last_n, top_k)")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError("model: must be a string")
    prompts, last_n = body.get("prompts"), body.get("last_n")
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("prompts: must be a non-empty list of token-id lists")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"prompts: at most {MAX_PROMPTS} sequences per call, got {len(prompts)}")
    if not isinstance(last_n, list) or len(last_n) != len(prompts):
        raise ValueError(f"last_n: must be a list with one count per prompt ({len(prompts)})")
    top_k = _int(body.get("top_k", 20), "top_k")
    if top_k == FULL_ROWS:
        if not full_rows:
            raise ValueError("top_k: this server does not return whole rows (-1); ask for a top-k")
    elif not 1 <= top_k <= max_top_k:
        raise ValueError(f"top_k: must be in [1, {max_top_k}] or -1 (whole rows), got {top_k}")
    checked, counts = [], []
    for i, (p, n) in enumerate(zip(prompts, last_n)):
        if not isinstance(p, list) or not p:
            raise ValueError(f"prompts.{i}: must be a non-empty list of token ids")
        ids = [_int(t, f"prompts.{i}") for t in p]
        if any(not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"prompts.{i}: token ids must be in [0, {vocab_size})")
        if len(ids) > max_len:
            raise ValueError(f"prompts.{i}: {len(ids)} tokens exceed the server's max_model_len {max_len}")
        n = _int(n, f"last_n.{i}")
        if not 1 <= n <= len(ids):
            raise ValueError(f"last_n.{i}: must be in [1, {len(ids)}] (the prompt's length), got {n}")
        checked.append(ids)
        counts.append(n)
    return VerifyCall(model=model, prompts=checked, last_n=counts, top_k=top_k)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no -inf; None reads back as -inf


def encode_results(model: str, scored: Sequence[ScoredPositions]) -> dict:
    """The JSON answer for ``scored`` (one per prompt, in order)."""
    results = []
    for s in scored:
        entry: dict[str, Any] = {"cached_tokens": int(s.cached_tokens)}
        if s.dense is not None:
            dense = s.dense.detach().to("cpu", torch.float32).contiguous()
            entry["dense"] = {"shape": list(dense.shape),
                              "float32_le_base64": base64.b64encode(dense.numpy().astype("<f4").tobytes()).decode()}
        else:
            entry["ids"] = s.ids
            entry["logprobs"] = [[_finite(float(x)) for x in row] for row in s.logprobs]
        results.append(entry)
    return {"object": VERIFY_OBJECT, "model": model, "results": results}


def decode_results(answer: Any, last_n: Sequence[int]) -> list[ScoredPositions]:
    """``ScoredPositions`` per prompt from a verify answer; ValueError when it does not match the call."""
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list) or len(results) != len(last_n):
        raise ValueError(f"verify answer: expected {len(last_n)} results")
    out = []
    for r, n in zip(results, last_n):
        cached = int(r.get("cached_tokens", 0))
        if "dense" in r:
            shape = r["dense"]["shape"]
            raw = bytearray(base64.b64decode(r["dense"]["float32_le_base64"]))
            dense = torch.frombuffer(raw, dtype=torch.float32).view(*shape) if raw else torch.empty(shape)
            if dense.shape[0] != n:
                raise ValueError(f"verify answer: {dense.shape[0]} rows for {n} positions")
            out.append(ScoredPositions(ids=[], logprobs=[], cached_tokens=cached, dense=dense))
            continue
        ids, lps = r.get("ids"), r.get("logprobs")
        if not isinstance(ids, list) or not isinstance(lps, list) or len(ids) != n or len(lps) != n:
            raise ValueError(f"verify answer: expected {n} positions of ids and logprobs")
        lps = [[float("-inf") if x is None else float(x) for x in row] for row in lps]
        out.append(ScoredPositions(ids=[[int(t) for t in row] for row in ids], logprobs=lps, cached_tokens=cached))
    return out


def capabilities(model: str, *, max_len: int, max_top_k: int, full_rows: bool, engine: str) -> dict:
    """The answer of ``GET /cascade/v1/verify``."""
    return {"object": VERIFY_OBJECT, "version": 1, "model": model, "max_model_len": max_len, "max_top_k": max_top_k,
            "full_rows": full_rows, "engine": engine}


__all__ = ["VERIFY_PATH", "VERIFY_OBJECT", "VerifyCall", "request_body", "parse_request", "encode_results",
           "decode_results", "capabilities"]
