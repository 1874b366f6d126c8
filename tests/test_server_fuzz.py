"""A property-based fuzz of ``cascade serve`` (Hypothesis, seeded and bounded so it stays within CI's time): request
bodies built from the API's own field names with arbitrary JSON values (wrong types, huge integers, NaN, lone
surrogates, nested junk), half of them around a valid request so that they get past the first checks, sent as
raw JSON to both generation routes, streamed or not, of the real server on 127.0.0.1 (tiny pair).

The properties (issue 32): no input gives a 5xx; every refusal is a 4xx in OpenAI's error shape; a stream that
starts ends with ``[DONE]`` and no error event; afterwards every cache row is free and a normal request still
succeeds. The examples are printed with ``-s`` (``hypothesis`` shows the failing body when one breaks a property).
"""

from __future__ import annotations

import json
import math

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiny_tokenizer import is_utf8
from test_server import MESSAGES, start_server, tiny_cascade, wait_idle

FIELDS = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "seed", "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs", "logit_bias",
          "ignore_eos", "min_tokens", "stop_token_ids", "cascade", "response_format", "tools", "echo", "best_of",
          "user", "presence_penalty", "repetition_penalty")
EXAMPLES = 200  # bounded: ~2 min on 2 CPU cores with the tiny pair

# text with the characters parsers and tokenizers trip on over-represented: lone surrogates (valid JSON escapes,
# invalid Unicode), NUL, control and combining characters, astral-plane ones
any_text = st.text(alphabet=st.one_of(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                                      st.sampled_from(["\x00", "\n", "\u0301", "\U0001f600", "\ufeff"]),
                                      st.characters(min_codepoint=0, max_codepoint=0x10FFFF)), max_size=12)
# values that were (or could be) mishandled: past 64 bits, coercible strings, NaN / inf, empty containers
nasty = st.sampled_from([2**64, 2**64 - 1, 2**70, 2**63, -1, -2**63, 0, 10**6, "3", "false", "yes", "0", "",
                         1e308, -0.0, math.nan, math.inf, True, [], {}, [[]], {"a": {"b": [None]}}, "cascade:nonsense"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), any_text, nasty)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.one_of(st.sampled_from(FIELDS), any_text),
                                                                            inner, max_size=4)), max_leaves=12)
contents = st.one_of(any_text, st.just("add two numbers"), json_values)
messages = st.one_of(
    st.just(MESSAGES),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "wizard"]),
                                    "content": contents}), min_size=1, max_size=3),
    json_values)
junk = st.dictionaries(st.one_of(st.sampled_from(FIELDS), any_text), json_values, max_size=6)
# a valid request (sampled or greedy) with one to three fields replaced: most bodies get past the first checks,
# so the later ones (sampling, the tokenizer, the engine) are reached
valid = st.fixed_dictionaries({"model": st.just("cascade"), "messages": messages,
                               "prompt": st.one_of(any_text, st.lists(st.integers(min_value=-5, max_value=300), max_size=6)),
                               "max_tokens": st.sampled_from([1, 4, 8]), "temperature": st.sampled_from([0.0, 0.7, 1.0]),
                               "stream": st.booleans()})
SAMPLING = ("seed", "n", "temperature", "max_tokens", "top_k", "top_p", "min_p", "logit_bias", "stop",
            "stop_token_ids", "min_tokens", "logprobs", "top_logprobs")
boundary = st.builds(lambda k, d: 2**k + d, st.sampled_from([31, 32, 53, 63, 64, 70]), st.sampled_from([-1, 0, 1]))
sampled = st.builds(lambda change: {"model": "cascade", "messages": MESSAGES, "max_tokens": 4, "temperature": 1.0,
                                    **change},
                    st.dictionaries(st.sampled_from(SAMPLING), st.one_of(boundary, nasty), min_size=1, max_size=2))
changes = st.one_of(st.dictionaries(st.sampled_from(FIELDS), st.one_of(nasty, json_values), min_size=1, max_size=3),
                    st.dictionaries(st.sampled_from(SAMPLING), nasty, min_size=1, max_size=2))
mutated = st.builds(lambda base, change: {**base, **change}, valid, changes)
bodies = st.one_of(junk, valid, mutated, sampled)  # sampled: a sampled request with an integer field at a boundary
# bodies that are not JSON a parser takes: nested past its depth, invalid UTF-8 inside a string, cut short
raw_bodies = st.one_of(
    st.integers(min_value=500, max_value=5000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(min_value=500, max_value=3000).map(lambda depth: b'{"model": ' * depth + b"1" + b"}" * depth),
    st.binary(min_size=1, max_size=4).filter(lambda b: not is_utf8(b)).map(
        lambda junk_bytes: b'{"model": "cascade", "messages": [{"role": "user", "content": "a' + junk_bytes + b'"}]}'),
    st.builds(lambda body, cut: _encode(body)[:cut], valid, st.integers(min_value=0, max_value=40)))


@pytest.fixture(scope="module")
def fuzzed_server(tiny_pair_dirs):
    s = start_server(tiny_cascade(tiny_pair_dirs, max_rows=4), default_policy="chow(alpha=0.3)", default_max_tokens=8)
    yield s
    s.stop()




def _encode(body) -> bytes:
    """JSON as a client in any language may send it: ASCII-escaped (lone surrogates as \\ud800), NaN as NaN."""
    return json.dumps(body, allow_nan=True).encode()


def _check(response: httpx2.Response, streamed: bool) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        err = response.json()
        assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}, err
        assert err["error"]["message"], err
        assert err["error"]["type"] == ("rate_limit_error" if response.status_code == 429 else "invalid_request_error"), err
        return
    assert response.status_code == 200
    if streamed:
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines and lines[-1] == "data: [DONE]", response.text[-300:]
        assert not any('"error"' in line for line in lines), response.text[-500:]
    else:
        assert response.json()["choices"]


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=bodies, route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_no_input_gives_a_5xx_or_a_foreign_error_shape(fuzzed_server, body, route):
    if isinstance(body, dict) and "messages" in body and route == "/v1/completions":
        body = {k: v for k, v in body.items() if k != "messages"}
    elif isinstance(body, dict) and "prompt" in body and route == "/v1/chat/completions":
        body = {k: v for k, v in body.items() if k != "prompt"}
    streamed = isinstance(body, dict) and body.get("stream") is True
    response = httpx2.post(fuzzed_server.url + route, content=_encode(body), headers={"content-type": "application/json"},
                           timeout=60)
    _check(response, streamed)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(raw=raw_bodies, route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_no_unparseable_body_gives_a_5xx_or_a_foreign_error_shape(fuzzed_server, raw, route):
    response = httpx2.post(fuzzed_server.url + route, content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text[:300]
    _check(response, streamed=False)


def test_after_the_fuzz_every_row_is_free_and_a_normal_request_succeeds(fuzzed_server):
    # (runs after the fuzz in file order; on its own it checks a fresh server)
    metrics = wait_idle(fuzzed_server)
    assert metrics["cascade_kv_rows_free"] == 4.0
    out = fuzzed_server.client().chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length") and not math.isnan(out.usage.completion_tokens)
