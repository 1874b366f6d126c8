"""The server never silently ignores what it is asked (issue 15): every field is honoured or refused with a
400 naming it; vLLM's sampling extras work; an API key guards /v1; /v1/models gives the context length;
/metrics has vLLM's label and speculative-decoding counter names; a stream that is held back gets SSE
keep-alive comments. All through the real ``openai`` client (raw ``httpx2`` where the client would refuse
to send a body) against the real server on 127.0.0.1."""

from __future__ import annotations

import httpx2
import openai
import pytest

from cascade import SamplingParams
from test_server import MESSAGES, slow_policy, start_server, tiny_cascade, wait_idle  # noqa: F401 (a fixture)
from tiny_tokenizer import SYMBOLS

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
Z = SYMBOLS.index("z")


@pytest.fixture(scope="module")
def server(tiny_pair_dirs):
    s = start_server(tiny_cascade(tiny_pair_dirs), default_policy="chow(alpha=0.3)", default_max_tokens=16,
                     keepalive_s=0.02)
    yield s
    s.stop()


def _post(server, path, body, **kw) -> httpx2.Response:
    return httpx2.post(server.url + path, json=body, timeout=60, **kw)


# ---------------------------------------------------------------------- refused, naming the field
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("extra, param", [
    ({"tools": [TOOL]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"response_format": {"type": "json_object"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format.type"),
    ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": -0.5}, "presence_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"3": 500}}, "logit_bias"),
    ({"logit_bias": {"999": 1}}, "logit_bias"),
    ({"min_p": 2}, "min_p"),
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ({"stop_token_ids": [999]}, "stop_token_ids"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
])
def test_chat_fields_that_would_change_the_answer_are_refused(server, extra, param):
    r = _post(server, CHAT, {"model": "cascade", "messages": MESSAGES, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param.split(".")[0] in err["message"]


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
      "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "42"}], "messages[1].tool_calls"),
    ([{"role": "tool", "tool_call_id": "c1", "content": "42"}], "messages[0].role"),
    ([{"role": "function", "name": "f", "content": "42"}], "messages[0].role"),
    ([{"role": "user", "content": "hi", "tool_call_id": "c1"}], "messages[0].tool_call_id"),
    ([{"role": "user", "content": "hi", "images": ["x"]}], "messages[0].images"),
])
def test_tool_calls_in_the_history_are_refused(server, messages, param):
    r = _post(server, CHAT, {"model": "cascade", "messages": messages})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": 21}, "logprobs"),
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"guided_regex": "a+"}, "guided_regex"),
    ({"repetition_penalty": 0.8}, "repetition_penalty"),
])
def test_completion_fields_that_would_change_the_answer_are_refused(server, extra, param):
    r = _post(server, COMPLETIONS, {"model": "cascade", "prompt": "def f():", **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_fields_that_ask_nothing_are_accepted(server):
    client = server.client()
    plain = client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=8, temperature=0)
    r = client.chat.completions.create(
        model="cascade", messages=[{"role": "user", "content": MESSAGES[0]["content"], "name": "ann"}], max_tokens=8,
        temperature=0, user="u1", metadata={"k": "v"}, response_format={"type": "text"}, tool_choice="none",
        parallel_tool_calls=True, store=False, extra_body={"tools": [], "functions": None, "top_k": -1})
    assert r.choices[0].message.content == plain.choices[0].message.content


# ---------------------------------------------------------------------- honoured
def test_logit_bias_forces_a_token_through_the_openai_client(server):
    client = server.client()
    for policy in ("cascade", "cascade:speculative", "cascade:draft-only", "cascade:target-only"):
        r = client.chat.completions.create(model=policy, messages=MESSAGES, max_tokens=6, temperature=0,
                                           logit_bias={str(Z): 100})
        assert r.choices[0].message.content == "z" * 6, policy
        c = client.completions.create(model=policy, prompt="def f():", max_tokens=6, temperature=0.8, seed=1,
                                      logit_bias={str(Z): 100})
        assert c.choices[0].text == "z" * 6, policy


def test_vllm_extras_stop_token_ids_min_tokens_ignore_eos(server):
    client = server.client()
    r = client.chat.completions.create(model="cascade:speculative", messages=MESSAGES, max_tokens=6, temperature=0,
                                       logit_bias={str(Z): 100}, extra_body={"stop_token_ids": [Z]})
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="cascade:speculative", messages=MESSAGES, max_tokens=6, temperature=0,
                                       logit_bias={str(Z): 100}, extra_body={"stop_token_ids": [Z], "min_tokens": 4})
    # the stop id cannot come before 4 tokens: the next most likely tokens stand in, then z ends the answer
    assert len(r.choices[0].message.content) == 4 and "z" not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True, "min_p": 0.2})
    assert r.usage.completion_tokens == 7


def test_greedy_answer_under_the_new_fields_is_the_target_onlys(server, tiny_pair_dirs):
    client = server.client()
    body = dict(messages=MESSAGES, max_tokens=12, temperature=0, logit_bias={"5": 4.0, "9": -3.0})
    target = client.chat.completions.create(model="cascade:target-only", **body)
    spec = client.chat.completions.create(model="cascade:speculative", **body)
    assert spec.choices[0].message.content == target.choices[0].message.content


def test_logprob_bytes_are_the_tokens_own(server):
    r = server.client().chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=5, temperature=0,
                                                logprobs=True)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(bytes(t.bytes) == t.token.encode() for t in content)


def test_top_logprobs_on_both_routes_streamed_or_not(server, tiny_pair_dirs):
    client = server.client()
    lib = tiny_cascade(tiny_pair_dirs, max_rows=1)
    [want] = lib.generate(MESSAGES, SamplingParams(max_tokens=6, logprobs=3), policy="speculative")
    r = client.chat.completions.create(model="cascade:speculative", messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 3 for t in content)
    for t, top in zip(content, want.top_logprobs):
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the most likely
        assert [a.logprob for a in t.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-5)
        assert [a.token for a in t.top_logprobs] == [SYMBOLS[i] for i, _ in top]
    chunks = list(client.chat.completions.create(model="cascade:speculative", messages=MESSAGES, max_tokens=6,
                                                 temperature=0, logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, [a.token for a in t.top_logprobs]) for t in streamed] == \
        [(t.token, [a.token for a in t.top_logprobs]) for t in content]
    c = client.completions.create(model="cascade:speculative", prompt="def f():", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.top_logprobs) == 5 and all(len(d) <= 2 for d in lp.top_logprobs)
    assert all(next(iter(d)) == tok for d, tok in zip(lp.top_logprobs, lp.tokens))
    # a token a filter removed is written as vLLM writes it (JSON has no infinity)
    r = client.chat.completions.create(model="cascade:target-only", messages=MESSAGES, max_tokens=3, temperature=1,
                                       seed=1, top_p=0.01, logprobs=True, top_logprobs=2)
    assert all(t.top_logprobs[1].logprob == -9999.0 for t in r.choices[0].logprobs.content)


# ---------------------------------------------------------------------- models, metrics, keep-alive
def test_models_give_the_context_length(server):
    data = server.client().models.list().data
    assert all(m.model_extra["max_model_len"] == 256 for m in data)


def test_metrics_carry_the_model_name_and_vllms_spec_decode_counters(server):
    wait_idle(server)
    before = server.metrics()
    client = server.client()
    prompt_tokens = 0
    for policy in ("cascade:speculative", "cascade:chow(alpha=0.3)"):
        r = client.chat.completions.create(model=policy, messages=MESSAGES, max_tokens=12, temperature=0)
        prompt_tokens += r.usage.prompt_tokens
    after = wait_idle(server)

    def grew(name):
        return after[name] - before.get(name, 0.0)

    assert grew("cascade_prompt_tokens_total") == prompt_tokens
    drafts = grew("vllm:spec_decode_num_drafts_total")
    assert drafts == grew("cascade_escalations_total") > 0
    assert grew("cascade_acceptance_length_count") == drafts  # one observation per escalation
    drafted, accepted = grew("vllm:spec_decode_num_draft_tokens_total"), grew("vllm:spec_decode_num_accepted_tokens_total")
    assert 0 <= accepted <= drafted and drafted > 0
    # each escalation emitted its accepted tokens plus one (replacement or bonus), unless the answer ended there
    assert accepted <= grew("cascade_acceptance_length_sum") <= accepted + drafts


def test_a_quiet_stream_gets_keepalive_comments_and_the_same_text(server, slow_policy):
    body = {"model": "cascade", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True,
            "cascade": {"policy": slow_policy, "k": 2}}
    with httpx2.stream("POST", server.url + CHAT, json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert ": keep-alive" in lines
    client = server.client()
    chunks = list(client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, extra_body={"cascade": {"policy": slow_policy, "k": 2}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=6, temperature=0,
                                           extra_body={"cascade": {"policy": slow_policy, "k": 2}})
    assert text == plain.choices[0].message.content


# ---------------------------------------------------------------------- API key
def test_an_api_key_guards_the_v1_routes(tiny_pair_dirs):
    s = start_server(tiny_cascade(tiny_pair_dirs, max_rows=2), default_max_tokens=4, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        r = httpx2.post(s.url + CHAT, json={"model": "cascade", "messages": MESSAGES})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        out = good.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3
        assert httpx2.get(s.url + "/health").status_code == 200  # probes and scrapers carry no key
        assert "cascade_requests_total" in httpx2.get(s.url + "/metrics").text
        assert s.metrics()['cascade_requests_total{status="401"}'] == 2
    finally:
        s.stop()


def test_library_and_server_agree_under_min_tokens(server, tiny_pair_dirs):
    lib = tiny_cascade(tiny_pair_dirs, max_rows=1)
    [want] = lib.generate(MESSAGES, SamplingParams(max_tokens=9, min_tokens=9, stop_token_ids=(Z,)), policy="speculative")
    r = server.client().chat.completions.create(model="cascade:speculative", messages=MESSAGES, max_tokens=9,
                                                temperature=0, extra_body={"min_tokens": 9, "stop_token_ids": [Z]})
    assert r.choices[0].message.content == want.text
