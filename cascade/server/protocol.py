"""The OpenAI wire format: request bodies (pydantic), their translation into engine inputs, response and
stream-chunk bodies, and the error shape. No HTTP framework and no engine here.

Request fields follow OpenAI's API plus vLLM's sampling extensions. Nothing that would change the answer is
silently ignored: every field is either honoured or refused with a 400 naming it.

- Honoured: ``temperature``, ``top_p``, ``top_k`` (-1 or 0 = off), ``min_p``, ``seed``, ``stop`` (any
  number), ``n``, ``max_tokens`` / ``max_completion_tokens``, ``logit_bias`` (token id -> [-100, 100]),
  ``logprobs`` (each chosen token's log-prob and, with chat ``top_logprobs`` / completions ``logprobs`` up
  to 20, the most likely tokens of the model that decided it),
  ``ignore_eos``, ``min_tokens``, ``stop_token_ids``, ``stream`` / ``stream_options.include_usage``, and
  ``response_format`` ``{"type": "text"}``. The sampling fields shape the draft's and the target's
  distributions alike (``cascade.sampling.filter_logits``), so ``speculative`` stays lossless under them.
- Refused: non-zero ``presence_penalty`` / ``frequency_penalty``, ``repetition_penalty`` != 1,
  ``top_logprobs`` without ``logprobs``, ``echo``, ``suffix``, ``best_of`` != ``n``, ``tools`` / ``functions`` / a
  ``tool_choice`` other than none / auto, ``response_format`` json_object / json_schema, ``tool`` messages
  and ``tool_calls`` / ``tool_call_id`` in the history, and every field the server does not know.
- Accepted and ignored (they never change the answer): ``user``, ``metadata``, ``store``,
  ``service_tier``, ``parallel_tool_calls``, ``prompt_cache_key``, ``safety_identifier``, a message's
  ``name``, and any field sent with its empty value (null, [], {}, false).
- Types are strict, as OpenAI's: a string is not taken for a number or a boolean (``"max_tokens": "3"``,
  ``"stream": "false"`` are 400s naming the field); only an integer is taken where a float is asked. A string
  holding a lone UTF-16 surrogate (``"\\ud800"``: valid JSON, not valid Unicode text) is refused naming the
  field (``no_lone_surrogates``); ``seed`` is at most 2**64 - n (a 64-bit generator's seed).

The extra body field ``cascade`` picks the policy of one request: ``{"policy": "chow", "alpha": 0.2}``, or
only parameters (``{"alpha": 0.2}``) to adjust the policy the model name chose. Model names: the served
name (``cascade`` by default) runs the server's default policy; ``cascade:<policy>`` runs another one,
written as ``cascade generate --policy`` takes it (``cascade:chow:0.2``, ``cascade:chow(alpha=0.2,k=4)``).
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cascade.config import MAX_SEED, MAX_TOP_LOGPROBS, SamplingParams
from cascade.metrics import RequestStats
from cascade.policies import Policy, make_policy, parse_policy

MAX_N = 16  # choices per request (each is one engine request)


class InvalidRequest(Exception):
    """A request the server refuses: the HTTP status, OpenAI's error ``type`` / ``code``, and the field."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_value_error(exc: ValueError, default_param: str | None = None) -> InvalidRequest:
    """A library ValueError (whose message starts with the field name, ``"max_tokens must be ..."`` or
    ``"prompt: ..."``) as a 400 naming that field."""
    message = str(exc)
    head = message.split(" ", 1)[0].rstrip(":")
    param = head if head.replace("_", "").replace(".", "").isalnum() and head.islower() else default_param
    return InvalidRequest(message, param=param)


# ---------------------------------------------------------------------- request bodies
# Fields accepted and ignored because they never change the answer (bookkeeping for the client's side).
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                            "safety_identifier"})


def _asks_nothing(value: Any) -> bool:
    """A field sent with its empty value (null, [], {}, false, "") asks nothing of the server."""
    return value is None or value is False or (isinstance(value, (list, dict, str)) and not value)


def refuse_unknown(extra: dict[str, Any] | None, where: str = "") -> None:
    """Every field the server does not know is refused (400 naming it) rather than ignored: it may ask for
    something the server would not do (a JSON schema, a tool call, a vLLM guided-decoding option)."""
    for name, value in (extra or {}).items():
        if name in IGNORED_FIELDS or _asks_nothing(value):
            continue
        raise InvalidRequest(f"{where}{name}: not supported by this server (refused rather than ignored)",
                             param=f"{where}{name}")


_SURROGATE = re.compile("[\ud800-\udfff]")


def no_lone_surrogates(value: Any, path: str = "") -> None:
    """Raise InvalidRequest naming the first string (dotted path: ``messages.0.content``) in a parsed JSON value
    that holds a lone UTF-16 surrogate: JSON's ``\\ud800`` escape parses, but the text cannot be encoded (a
    tokenizer fails on it deep inside the engine)."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise InvalidRequest(f"{path or 'body'}: holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not "
                                 "valid Unicode text", param=path or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            no_lone_surrogates(key, path)
            no_lone_surrogates(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            no_lone_surrogates(item, f"{path}.{i}" if path else str(i))


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # unknown fields are kept to be refused by name
    #   (refuse_unknown); strict: no string taken for a number or a boolean

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        no_lone_surrogates(data)
        return data

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # an extension many OpenAI-compatible servers accept (vLLM: -1 = off)
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # vLLM's extension
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)  # vLLM's extension
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias in [-100, 100]
    ignore_eos: bool = False  # vLLM's extensions: keep going past the EOS,
    min_tokens: int = Field(0, ge=0)  # no EOS / stop token before this many tokens,
    stop_token_ids: list[int] | None = None  # more token ids that end the answer
    cascade: dict[str, Any] | None = None  # {"policy": name, **parameters} (see the module docstring)

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequest(f"{name}: not supported (only 0 is accepted)", param=name)
        if self.repetition_penalty != 1.0:
            raise InvalidRequest("repetition_penalty: not supported (only 1 is accepted)", param="repetition_penalty")
        refuse_unknown(self.model_extra)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise InvalidRequest("stop: stop strings must not be empty", param="stop")
        return tuple(stops)

    def token_bias(self) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidRequest(f"logit_bias: keys must be token ids, got {key!r}", param="logit_bias") from None
        return bias

    def include_usage_in_stream(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def sampling_params(self, max_tokens: int | None, default_max_tokens: int, top: int = 0) -> list[SamplingParams]:
        """One SamplingParams per choice (``top``: top log-probs per token). With a seed, choice i uses
        seed + i (so n > 1 with a seed gives n different, reproducible samples)."""
        self.check_unsupported()
        stop = self.stop_strings()
        bias = self.token_bias()
        try:
            base = SamplingParams(max_tokens=max_tokens or default_max_tokens, temperature=self.temperature,
                                  top_p=self.top_p, top_k=max(0, self.top_k), min_p=self.min_p, seed=self.seed,
                                  stop=stop, logit_bias=bias, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                                  stop_token_ids=tuple(self.stop_token_ids or ()), n=self.n, logprobs=top)
        except ValueError as exc:
            raise from_value_error(exc) from None
        return [base.choice(i) for i in range(self.n)]  # one engine request per choice (as Cascade.generate)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # unknown fields are refused by name (refuse_unknown)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None  # accepted; the chat template decides whether it shows

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    tools: list | None = None
    tool_choice: Union[str, dict, None] = None
    functions: list | None = None
    function_call: Union[str, dict, None] = None
    response_format: dict | None = None

    def check_unsupported(self) -> None:
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise InvalidRequest(f"{name}: tool calling is not supported by this server", param=name)
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                raise InvalidRequest(f"{name}: tool calling is not supported by this server", param=name)
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidRequest(f"response_format: only type 'text' is supported, not "
                                 f"{self.response_format.get('type')!r} (no constrained decoding)", param="response_format.type")
        super().check_unsupported()

    def conversation(self) -> list[dict]:
        if not self.messages:
            raise InvalidRequest("messages: must hold at least one message", param="messages")
        for i, m in enumerate(self.messages):
            if m.role in ("tool", "function"):
                raise InvalidRequest(f"messages[{i}].role: {m.role!r} messages (tool results) are not supported: this "
                                     "server does no tool calling", param=f"messages[{i}].role")
            for name in ("tool_calls", "tool_call_id", "function_call"):
                if not _asks_nothing((m.model_extra or {}).get(name)):
                    raise InvalidRequest(f"messages[{i}].{name}: tool calling is not supported by this server",
                                         param=f"messages[{i}].{name}")
            refuse_unknown({k: v for k, v in (m.model_extra or {}).items()
                            if k not in ("tool_calls", "tool_call_id", "function_call")}, where=f"messages[{i}].")
            if m.role in ("user", "system", "developer") and m.content is None:
                raise InvalidRequest(f"messages[{i}].content: a {m.role} message needs content", param=f"messages[{i}].content")
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def engine_params(self, default_max_tokens: int) -> list[SamplingParams]:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs: needs logprobs=true", param="top_logprobs")
        return self.sampling_params(self.max_completion_tokens or self.max_tokens, default_max_tokens,
                                    top=self.top_logprobs or 0)


class CompletionRequest(_Body):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: a string, a list of strings, a token-id list or a list of them."""
        p = self.prompt
        if isinstance(p, str):
            batch: list = [p]
        elif p and all(isinstance(t, int) for t in p):
            batch = [list(p)]
        else:
            batch = list(p)
        if not batch or any(len(x) == 0 for x in batch):
            raise InvalidRequest("prompt: must not be empty", param="prompt")
        return batch

    def engine_params(self, default_max_tokens: int) -> list[SamplingParams]:
        if self.echo:
            raise InvalidRequest("echo: not supported", param="echo")
        if self.suffix:
            raise InvalidRequest("suffix: not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequest("best_of: only best_of == n is supported", param="best_of")
        return self.sampling_params(self.max_tokens, default_max_tokens, top=self.logprobs or 0)


# ---------------------------------------------------------------------- policy
def resolve_policy(model: str, options: dict[str, Any] | None, *, served_name: str, default: Policy) -> Policy:
    """The policy of a request, from its model name and its ``cascade`` field (see the module docstring)."""
    if model == served_name:
        policy = default
    elif model.startswith(served_name + ":"):
        try:
            policy = parse_policy(model[len(served_name) + 1:])
        except ValueError as exc:
            raise InvalidRequest(f"model: {exc}", param="model", status=404, code="model_not_found") from None
    else:
        raise InvalidRequest(f"model: the model {model!r} does not exist; this server serves {served_name!r} and "
                             f"'{served_name}:<policy>' (see /v1/models)", param="model", status=404,
                             code="model_not_found")
    if options:
        params = dict(options)
        name = params.pop("policy", None)
        try:
            if name is not None:
                policy = parse_policy(name) if not params else make_policy(str(name), **params)
            elif params:
                known = {f.name for f in dataclasses.fields(policy)}
                unknown = sorted(set(params) - known)
                if unknown:
                    raise ValueError(f"policy {policy.name!r} has no parameter(s) {unknown}; it takes {sorted(known)}")
                policy = dataclasses.replace(policy, **params)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"cascade: {exc}", param="cascade") from None
    if policy.benchmark_only:
        raise InvalidRequest(f"cascade: policy {policy.name!r} is benchmark-only; the server cannot run it",
                             param="cascade")
    return policy


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(engine_reason: str | None) -> str | None:
    """The engine's finish reason in OpenAI's words ("stop" | "length")."""
    if engine_reason is None:
        return None
    return "length" if engine_reason == "length" else "stop"


def usage(prompt_tokens: int, stats: list[RequestStats], policy: Policy) -> dict:
    """OpenAI's usage fields plus the cascade stats of the request (summed over its choices)."""
    total = RequestStats()
    for s in stats:
        total.add(s)
    completion = total.emitted_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "cascade": {
            "policy": policy.describe(),
            "draft_tokens": total.draft_tokens,
            "target_tokens": total.target_tokens,
            "target_scored_tokens": total.target_scored_tokens,
            "escalations": total.escalations,
            "accepted_tokens": total.accepted_tokens,
            "rejected_tokens": total.rejected_tokens,
            "bonus_tokens": total.bonus_tokens,
            "mean_acceptance_length": total.mean_acceptance_length,
            "acceptance_rate": (total.accepted_tokens / (total.accepted_tokens + total.rejected_tokens)
                                if total.accepted_tokens + total.rejected_tokens else None),
            "target_token_fraction": total.target_token_fraction,
            "routed_to_target": total.routed_to_target,
            "target_errors": total.target_errors,  # target passes that failed; the draft's tokens stood in
        },
    }


def _finite(logprob: float) -> float:
    """-inf (a token the request's filtering removed) as vLLM writes it: JSON has no infinity."""
    return max(float(logprob), -9999.0)


Piece = tuple[str, bytes]  # a token's text and its own bytes


def chat_logprobs(tokens: list[Piece], logprobs: list[float], tops: list[list[tuple[Piece, float]]] | None = None) -> dict:
    """tokens: (text, the token's own bytes) per token; ``bytes`` are the token's, so a token holding part
    of a character has its raw bytes (its text shows U+FFFD). tops: per token, the deciding model's most
    likely tokens with their log-probs (``top_logprobs``), or None."""
    return {"content": [
        {"token": t, "logprob": _finite(lp), "bytes": list(b),
         "top_logprobs": [{"token": tt, "logprob": _finite(tl), "bytes": list(tb)} for (tt, tb), tl in (tops[i] if tops else [])]}
        for i, ((t, b), lp) in enumerate(zip(tokens, logprobs))]}


def completion_logprobs(tokens: list[Piece], logprobs: list[float], offset: int = 0,
                        tops: list[list[tuple[Piece, float]]] | None = None) -> dict:
    offsets, pos = [], offset
    for t, _ in tokens:
        offsets.append(pos)
        pos += len(t)
    top = [{tt: _finite(tl) for (tt, _), tl in alts} for alts in tops] if tops else None
    return {"tokens": [t for t, _ in tokens], "token_logprobs": [_finite(lp) for lp in logprobs], "top_logprobs": top,
            "text_offset": offsets}


def chat_response(rid: str, model: str, choices: list[dict], usage_body: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_body}


def completion_response(rid: str, model: str, choices: list[dict], usage_body: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_body}


def chat_chunk(rid: str, model: str, created: int, choices: list[dict], usage_body: dict | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_body is not None:
        body["usage"] = usage_body
    return body


def completion_chunk(rid: str, model: str, created: int, choices: list[dict], usage_body: dict | None = None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_body is not None:
        body["usage"] = usage_body
    return body


class TextDelta:
    """The part of a growing output text that is safe to stream.

    Held back until the request finishes or the text moves past them: a trailing U+FFFD (an unfinished
    multi-byte character: the next token completes it) and a suffix that could begin a stop string (the
    engine would cut it). So the concatenated stream equals the non-streamed text."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.sent = stops, ""

    def __call__(self, text: str, finished: bool) -> str:
        if not text.startswith(self.sent):  # never expected; resend nothing already sent
            return ""
        safe = len(text)
        if not finished:
            while safe > len(self.sent) and text[safe - 1] == "\ufffd":
                safe -= 1
            end, hold = safe, 0
            for stop in self.stops:
                hold = max([hold] + [n for n in range(1, min(len(stop) - 1, end) + 1) if text[end - n:end] == stop[:n]])
            safe = end - hold
        safe = max(safe, len(self.sent))
        delta, self.sent = text[len(self.sent):safe], text[:safe]
        return delta
