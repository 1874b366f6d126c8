"""The FastAPI app: OpenAI-compatible routes over an ``EngineLoop``.

``/v1/chat/completions`` and ``/v1/completions`` (plain JSON or SSE with ``stream=true``, ending with
``data: [DONE]``), ``/v1/models``, ``/health``, ``/metrics`` (Prometheus text format).

Every handler is a module-level function on one ``APIRouter``; what a handler needs besides its request (the
engine loop, the config, the metrics) is the ``ServerState`` that ``build_app`` puts on ``app.state.server``
and ``_state(request)`` reads back, so a handler can be read, and tested, on its own.

Every refusal has OpenAI's error shape (``cascade.server.protocol.error_body``) with the offending field in
``param``: 400 for malformed JSON, bad or out-of-range fields and too long prompts, 404 for an unknown
model, 401 without the server's API key (when it has one: ``/v1`` routes only), 429 with ``Retry-After``
when rows and queue are full, 503 while shutting down. A request that fails
inside a round answers 500 (or ends its stream with an error event); the others go on. A client that
disconnects, streaming or not, has its requests cancelled and their cache rows freed at the next round.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from cascade.engine import RequestOutput
from cascade.metrics import EmittedToken, top_logprob_lists
from cascade.policies import Policy, parse_policy, policy_names
from cascade.server import protocol as P
from cascade.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from cascade.server.serving import EngineLoop, Handle, QueueFull, RequestFailed, ServerStopping

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


@dataclass(frozen=True)
class ServerConfig:
    """What the routes need besides the engine loop."""

    served_name: str = "cascade"
    default_policy: Policy | None = None  # None: speculative
    default_max_tokens: int = 256  # when a request gives no max_tokens
    drain_timeout_s: float = 30.0
    keepalive_s: float = 10.0  # an SSE comment after this long without a chunk
    api_key: str | None = None  # when set, every /v1 route needs ``Authorization: Bearer <api_key>``


@dataclass(frozen=True)
class ServerState:
    """Everything the handlers share: one per app, on ``app.state.server``."""

    loop: EngineLoop
    config: ServerConfig
    metrics: ServerMetrics
    default_policy: Policy


def build_app(loop: EngineLoop, config: ServerConfig, metrics: ServerMetrics) -> FastAPI:
    """The app; its lifespan starts the engine thread and, at shutdown, drains it."""
    app = FastAPI(title="cascade", lifespan=_lifespan)
    app.state.server = ServerState(loop, config, metrics, config.default_policy or parse_policy("speculative"))
    if config.api_key:
        app.middleware("http")(_authorize)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
    app.add_exception_handler(P.InvalidRequest, _on_invalid_request)
    app.add_exception_handler(QueueFull, _on_queue_full)
    app.add_exception_handler(ServerStopping, _on_stopping)
    app.include_router(router)
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.server


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.server
    state.loop.start(asyncio.get_running_loop())
    try:
        yield
    finally:
        await asyncio.to_thread(state.loop.stop, drain=True, timeout_s=state.config.drain_timeout_s)


# --- refusals ------------------------------------------------------------------------------------------------


def _refuse(state: ServerState, exc: P.InvalidRequest, headers: dict | None = None) -> JSONResponse:
    state.metrics.refused(exc.status)
    return JSONResponse(P.error_body(exc.message, type=exc.type, param=exc.param, code=exc.code),
                        status_code=exc.status, headers=headers)


async def _authorize(request: Request, call_next):
    """With an API key, every ``/v1`` route needs ``Authorization: Bearer <key>``; /health and /metrics stay
    open (as vLLM's): probes and scrapers carry no key."""
    state = _state(request)
    expected = f"Bearer {state.config.api_key}".encode()
    if request.url.path.startswith("/v1") and not hmac.compare_digest(
            request.headers.get("authorization", "").encode(), expected):
        state.metrics.refused(401)
        return JSONResponse(P.error_body("invalid or missing API key: send 'Authorization: Bearer <key>'",
                                         type="invalid_request_error", code="invalid_api_key"),
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _refuse(_state(request), _validation_error(exc))


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """The framework's own refusals in OpenAI's shape: an unknown route (404), a wrong method (405), and a body
    FastAPI cannot parse at all (400: not UTF-8, or JSON nested past the parser's depth)."""
    message = {400: f"malformed request body ({exc.detail}): it must be UTF-8 JSON, nested at most a few hundred "
                    "levels deep"}.get(exc.status_code, str(exc.detail))
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _refuse(_state(request), P.InvalidRequest(message, status=exc.status_code, code=code),
                   headers=getattr(exc, "headers", None))


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """Any other error outside the engine (a bug): a 500 in OpenAI's shape instead of a plain-text traceback, so a
    client can parse it and the connection stays usable (Starlette still logs the traceback)."""
    return _refuse(_state(request), P.InvalidRequest(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                                     type="server_error", code="internal_error"))


async def _on_invalid_request(request: Request, exc: P.InvalidRequest) -> JSONResponse:
    return _refuse(_state(request), exc)


async def _on_queue_full(request: Request, exc: QueueFull) -> JSONResponse:
    return _refuse(_state(request), P.InvalidRequest(str(exc), status=429, type="rate_limit_error",
                                                     code="queue_full"),
                   headers={"Retry-After": str(exc.retry_after_s)})


async def _on_stopping(request: Request, exc: ServerStopping) -> JSONResponse:
    return _refuse(_state(request), P.InvalidRequest(str(exc), status=503, type="server_error",
                                                     code="shutting_down"))


# --- routes --------------------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    loop = _state(request).loop
    if not loop.alive:
        return JSONResponse({"status": "engine not running"}, status_code=503)
    return JSONResponse({"status": "ok", "in_flight": loop.in_flight()})


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    state = _state(request)
    served, created = state.config.served_name, int(time.time())
    names = [served] + [f"{served}:{n}" for n in policy_names(runnable=True)]
    return JSONResponse({"object": "list", "data": [
        {"id": n, "object": "model", "created": created, "owned_by": "cascade", "root": served,
         "max_model_len": state.loop.engine.max_len} for n in names]})


@router.post("/v1/chat/completions")
async def chat(body: P.ChatCompletionRequest, request: Request):
    state = _state(request)
    policy = _policy_of(state, body)
    params = body.engine_params(state.config.default_max_tokens)
    prompt_ids = _encode(state, body.conversation(), "messages")
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = _fit_context(state, prompt_ids, params, body.max_completion_tokens or body.max_tokens, field)
    handles = _submit(state, [(prompt_ids, p) for p in params], policy, prompt_field="messages")
    return await _respond(request, state, handles, policy, body, chat=True, prompt_tokens=len(prompt_ids))


@router.post("/v1/completions")
async def completions(body: P.CompletionRequest, request: Request):
    state = _state(request)
    policy = _policy_of(state, body)
    params = body.engine_params(state.config.default_max_tokens)
    prompt_ids = [_encode(state, p, "prompt") for p in body.prompts()]
    pairs = [(ids, p) for ids in prompt_ids
             for p in _fit_context(state, ids, params, body.max_tokens, "max_tokens")]
    handles = _submit(state, pairs, policy)
    return await _respond(request, state, handles, policy, body, chat=False,
                          prompt_tokens=sum(len(p) for p in prompt_ids))


# --- what the two completion routes share ---------------------------------------------------------------------


def _policy_of(state: ServerState, body: P._Body) -> Policy:
    return P.resolve_policy(body.model, body.cascade, served_name=state.config.served_name,
                            default=state.default_policy)


def _fit_context(state: ServerState, prompt_ids: list[int], params_per_choice, asked: int | None, field: str):
    """A request's answer must fit the context: an explicit ``max_tokens`` past the room the prompt
    leaves is a 400 (as vLLM answers it); without one, the default is cut to that room."""
    max_len = state.loop.engine.max_len
    room = max_len - 1 - len(prompt_ids)
    if room < 1:
        return params_per_choice  # the engine refuses the prompt itself, naming it
    if asked is not None and asked > room:
        raise P.InvalidRequest(f"{field}: this model's maximum context length is {max_len} tokens; you requested "
                               f"{len(prompt_ids) + asked} tokens ({len(prompt_ids)} in the prompt, {asked} for the "
                               f"completion); at most {room} completion tokens fit", param=field)
    return [dataclasses.replace(p, max_tokens=min(p.max_tokens, room)) for p in params_per_choice]


def _encode(state: ServerState, prompt, field: str) -> list[int]:
    """Token ids of a prompt or a conversation; a ValueError becomes a 400 naming ``field`` (or the field the
    error names)."""
    try:
        return state.loop.encode(prompt)
    except ValueError as exc:
        raise P.from_value_error(exc, default_param=field) from None


def _submit(state: ServerState, pairs: list, policy: Policy, prompt_field: str = "prompt") -> list[Handle]:
    """Queue (prompt ids, params) pairs; the engine's ValueError becomes a 400 naming the field, the prompt
    by the request's own name for it (``prompt_field``: chat calls it ``messages``)."""
    try:
        return state.loop.submit(pairs, policy)
    except ValueError as exc:
        err = P.from_value_error(exc, default_param=prompt_field)
        if err.param == "prompt":
            err.param = prompt_field
        raise err from None


async def _respond(request: Request, state: ServerState, handles: list[Handle], policy: Policy, body, *,
                   chat: bool, prompt_tokens: int):
    loop, metrics = state.loop, state.metrics
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    want_logprobs = bool(body.logprobs) if chat else body.logprobs is not None
    token_text = _token_texts(loop)
    if body.stream:
        events = _stream(request, loop, handles, policy, body, rid=rid, chat=chat, prompt_tokens=prompt_tokens,
                         want_logprobs=want_logprobs, token_text=token_text, keepalive_s=state.config.keepalive_s)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    finals = await _collect(request, loop, handles)
    if finals is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    failed = [f for f in finals if isinstance(f, RequestFailed)]
    if failed:
        metrics.refused(failed[0].status)
        return JSONResponse(P.error_body(failed[0].error, type="server_error", code=failed[0].code),
                            status_code=failed[0].status)
    choices = []
    for i, (out, tokens) in enumerate(finals):
        choice = {"index": i, "finish_reason": P.finish_reason(out.finish_reason)}
        if chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice["text"] = out.text
        choice["logprobs"] = _logprobs(token_text, chat, tokens) if want_logprobs else None
        choices.append(choice)
    usage = P.usage(prompt_tokens, [out.stats for out, _ in finals], policy)
    make = P.chat_response if chat else P.completion_response
    return JSONResponse(make(rid, body.model, choices, usage))


def _token_texts(loop: EngineLoop) -> Callable[[list[int]], list[tuple[str, bytes]]]:
    """(text, own bytes) of each token, for the log-prob entries."""
    cascade = loop.cascade

    def texts(ids: list[int]) -> list[tuple[str, bytes]]:
        if cascade.tokenizer is None:
            return [(str(t), str(t).encode()) for t in ids]
        return list(zip((cascade.decode([t]) for t in ids), cascade.token_bytes(ids)))

    return texts


def _logprobs(token_text: Callable[[list[int]], list[tuple[str, bytes]]], chat: bool, tokens: list[EmittedToken],
              offset: int = 0) -> dict:
    """The ``logprobs`` body of a choice or chunk: each token's text, bytes and log-prob, and its top
    alternatives when the request asked for them (each record's ``top``)."""
    pieces = token_text([t.id for t in tokens])
    lps = [t.logprob for t in tokens]
    tops = top_logprob_lists(tokens)
    alternatives = None
    if tops:
        flat = token_text([tid for top in tops for tid, _ in top])
        alternatives, at = [], 0
        for top in tops:
            alternatives.append([(flat[at + j], lp) for j, (_, lp) in enumerate(top)])
            at += len(top)
    if chat:
        return P.chat_logprobs(pieces, lps, alternatives)
    return P.completion_logprobs(pieces, lps, offset, alternatives)


def _validation_error(exc: RequestValidationError) -> P.InvalidRequest:
    """Pydantic's first error as a 400 naming the field (``messages.0.role``), or malformed JSON."""
    errors = exc.errors()
    if not errors:
        return P.InvalidRequest("invalid request body")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return P.InvalidRequest(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # drop pydantic's union-branch names (e.g. 'str', 'list[int]') so the param is the field path
    loc = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "function-after")]
    param = ".".join(loc) or None
    if err.get("type") == "model_attributes_type" or (not loc and err.get("type") in ("dict_type", "model_type")):
        return P.InvalidRequest("the request body must be a JSON object", param=None)
    return P.InvalidRequest(f"{param or 'body'}: {err.get('msg')}", param=param)


async def _collect(request: Request, loop: EngineLoop, handles: list[Handle]):
    """Wait for every handle's final event. -> [(final output, its tokens' records) | RequestFailed], or None
    if the client disconnected (its requests are then cancelled)."""
    results = []
    try:
        for h in handles:
            tokens: list[EmittedToken] = []
            while True:
                try:
                    event = await asyncio.wait_for(h.events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        loop.cancel(handles)
                        return None
                    continue
                if isinstance(event, RequestFailed):
                    results.append(event)
                    break
                tokens += event.new_tokens
                if event.finished:
                    results.append((event, tokens))
                    break
    except asyncio.CancelledError:
        loop.cancel(handles)
        raise
    return results


async def _stream(request: Request, loop: EngineLoop, handles: list[Handle], policy: Policy, body, *, rid: str,
                  chat: bool, prompt_tokens: int, want_logprobs: bool,
                  token_text: Callable[[list[int]], list[tuple[str, bytes]]], keepalive_s: float) -> AsyncIterator[str]:
    """SSE events: chunks as rounds produce tokens (choices interleaved), a final chunk per choice with its
    finish reason, an optional usage chunk, then ``[DONE]``. Cancelled (client gone) -> requests aborted."""
    created = int(time.time())
    make = P.chat_chunk if chat else P.completion_chunk
    stops = handles[0].params.stop
    deltas = [P.TextDelta(stops) for _ in handles]
    finals: dict[int, RequestOutput] = {}
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Handle) -> None:
        while True:
            event = await h.events.get()
            await merged.put((i, event))
            if isinstance(event, RequestFailed) or event.finished:
                return

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    pumps = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        if chat:
            yield sse(make(rid, body.model, created, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": None, "finish_reason": None}
                                                       for i in range(len(handles))]))
        done = 0
        while done < len(handles):
            try:
                i, event = await asyncio.wait_for(merged.get(), timeout=keepalive_s)
            except asyncio.TimeoutError:  # nothing to send yet (a request-level policy holds its answer back):
                yield ": keep-alive\n\n"  # an SSE comment, so proxies do not cut an idle stream
                continue
            if isinstance(event, RequestFailed):
                done += 1
                yield sse(P.error_body(event.error, type="server_error", code=event.code))
                continue
            text = deltas[i](event.text, event.finished)
            lp = None
            if want_logprobs and event.new_tokens:
                lp = _logprobs(token_text, chat, event.new_tokens,
                               offset=len(deltas[i].sent) - len(text))
            if text or lp is not None:
                choice = {"index": i, "logprobs": lp, "finish_reason": None}
                if chat:
                    choice["delta"] = {"content": text}
                else:
                    choice["text"] = text
                yield sse(make(rid, body.model, created, [choice]))
            if event.finished:
                done += 1
                finals[i] = event
                last = {"index": i, "logprobs": None, "finish_reason": P.finish_reason(event.finish_reason)}
                if chat:
                    last["delta"] = {}
                else:
                    last["text"] = ""
                yield sse(make(rid, body.model, created, [last]))
        if body.include_usage_in_stream():
            usage = P.usage(prompt_tokens, [finals[i].stats for i in sorted(finals)], policy)
            yield sse(make(rid, body.model, created, [], usage))
        yield "data: [DONE]\n\n"
    finally:  # normal end, or the client went away (the generator is closed / cancelled)
        for t in pumps:
            t.cancel()
        loop.cancel([h for i, h in enumerate(handles) if i not in finals])
