"""The verify endpoint inside ``vllm serve``, beside vLLM's own OpenAI routes, on vLLM's async engine.

``cascade target-serve --target vllm:DIR`` starts vLLM's OpenAI server with
``--middleware cascade.target_server.vllm_route.verify_middleware``: vLLM's supported hook for extra ASGI
code (no fork, no monkey-patching). The middleware answers ``/cascade/v1/verify`` itself and passes every
other request on, so one deployment serves both the cascade's verifications and plain OpenAI traffic.

Why an endpoint of our own: vLLM's OpenAI routes turn prefix-cache *reads* off for any request with
``prompt_logprobs`` (``SamplingParams.skip_reading_prefix_cache`` defaults to True then, because cached
positions get no real log-probs), and the routes do not expose the field. Here each sequence goes to the
engine as token ids with reads on and ``prompt_logprobs``; only entries past ``num_cached_tokens`` are used
(``cascade.models.vllm._tail``), and a sequence whose asked-for positions came from the cache is asked again
with reads off, exactly as the in-process vLLM target does. So an escalation costs its new positions.

vLLM adds this middleware outside its own API-key check, so the key (``--api-key`` / ``VLLM_API_KEY``) is
checked here for the verify path the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import uuid

from cascade.models.scoring import FULL_ROWS, topk_to_logits
from cascade.target_server import wire


def _keys(app) -> list[bytes]:
    args = getattr(app.state, "args", None)
    keys = list(getattr(args, "api_key", None) or []) or [os.environ.get("VLLM_API_KEY") or ""]
    return [hashlib.sha256(k.encode()).digest() for k in keys if k]


def _authorized(request) -> bool:
    keys = _keys(request.app)
    if not keys:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(token.encode()).digest()
    return any(secrets.compare_digest(digest, k) for k in keys)


def _error(message: str, status: int = 400, code: str | None = None):
    from starlette.responses import JSONResponse

    from cascade.server.protocol import error_body

    return JSONResponse(error_body(message, param=message.split(":", 1)[0] if status == 400 else None, code=code),
                        status_code=status)


async def _score_one(engine, prompt: list[int], n: int, k: int, read_cache: bool):
    """One sequence through vLLM's engine: (prompt log-probs, the sampled step's log-probs, cached tokens)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, prompt_logprobs=k, detokenize=False,
                            skip_reading_prefix_cache=not read_cache)
    final = None
    async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, f"cascade-verify-{uuid.uuid4().hex}"):
        final = out
    return final


async def score(engine, call: wire.VerifyCall, vocab_size: int):
    """``ScoredPositions`` per sequence of ``call``, the sequences submitted concurrently (vLLM batches them)."""
    from cascade.models.vllm import _tail

    k = call.top_k  # vLLM's -1 is "the whole vocabulary", as ours
    outs = await asyncio.gather(*(_score_one(engine, p, n, k, True) for p, n in zip(call.prompts, call.last_n)))
    result = []
    for p, n, out in zip(call.prompts, call.last_n, outs):
        scored = _tail(out.prompt_logprobs, out.outputs[0].logprobs[0], n, int(out.num_cached_tokens or 0))
        if scored is None:  # the asked-for positions came from the cache: ask again with reads off
            out = await _score_one(engine, p, n, k, False)
            scored = _tail(out.prompt_logprobs, out.outputs[0].logprobs[0], n)
            if scored is None:
                raise RuntimeError("vLLM returned fewer prompt log-probs than the prompt has positions")
        if k == FULL_ROWS:
            scored.dense, scored.ids, scored.logprobs = topk_to_logits([scored], vocab_size), [], []
        result.append(scored)
    return result


async def verify_middleware(request, call_next):
    """ASGI middleware for ``vllm serve --middleware``: serves ``/cascade/v1/verify``, passes the rest on."""
    if request.url.path != wire.VERIFY_PATH:
        return await call_next(request)
    if not _authorized(request):
        return _error("invalid or missing API key: send 'Authorization: Bearer <key>'", 401, "invalid_api_key")
    state = request.app.state
    model_config = state.vllm_config.model_config
    served = (getattr(state.args, "served_model_name", None) or [model_config.model])[0]
    max_len, vocab = int(model_config.max_model_len), int(model_config.get_vocab_size())
    max_top_k = int(model_config.max_logprobs)
    full_rows = max_top_k == -1
    if request.method == "GET":
        from starlette.responses import JSONResponse

        return JSONResponse(wire.capabilities(served, max_len=max_len, max_top_k=max_top_k if max_top_k > 0 else vocab,
                                              full_rows=full_rows, engine="vllm"))
    if request.method != "POST":
        return _error(f"method {request.method} is not allowed on {wire.VERIFY_PATH}", 405, "method_not_allowed")
    try:
        body = json.loads(await request.body())
        call = wire.parse_request(body, vocab_size=vocab, max_len=max_len,
                                  max_top_k=max_top_k if max_top_k > 0 else vocab, full_rows=full_rows)
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        return _error(f"body: malformed request body, it must be UTF-8 JSON ({type(exc).__name__})")
    except ValueError as exc:
        return _error(str(exc))
    if call.model is not None and call.model != served:
        return _error(f"model: {call.model!r} is not served here (this server serves {served!r})", 404, "model_not_found")
    try:
        scored = await score(state.engine_client, call, vocab)
    except Exception as exc:  # an engine failure is the target's, in OpenAI's shape
        return _error(f"the target failed: {type(exc).__name__}: {exc}", 500, "engine_error")
    from starlette.responses import JSONResponse

    return JSONResponse(wire.encode_results(served, scored))


__all__ = ["verify_middleware", "score"]
