"""The OpenAI-compatible server, for real: uvicorn on 127.0.0.1 with a random free port, tiny random-weight
models with a character tokenizer, and the real ``openai`` client (raw ``httpx2`` (the HTTP client openai itself uses) where a test needs to send
what the client would refuse to, or to drop a stream half way)."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time
from dataclasses import dataclass

import httpx2
import openai
import pytest
import uvicorn

from cascade import Cascade, SamplingParams
from cascade.policies import parse_policy
from cascade.policies.base import _REGISTRY, register
from cascade.policies.speculative_cascades import Chow
from cascade.server import create_app
from cascade.speculation import BlockLengthController
from cascade.server.protocol import TextDelta
from test_engine import make_cascade
from tiny_tokenizer import CharTokenizer


def tiny_cascade(dirs, max_rows: int = 4) -> Cascade:
    """The tiny random pair with the character tokenizer (text and chat prompts work as with a real pair)."""
    plain = make_cascade(dirs, max_rows=max_rows, max_len=256)
    return Cascade(plain.draft, plain.target, CharTokenizer(), eos_token_ids=[], config=plain.engine.config)


@dataclass
class Server:
    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics(self, model_name: str = "cascade") -> dict[str, float]:
        """The /metrics samples by name and labels, the ``model_name`` label (which every series must carry)
        left out: ``cascade_tokens_total{source="draft"}``."""
        text = httpx2.get(self.url + "/metrics").text
        out = {}
        label = f'model_name="{model_name}"'
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                assert label in name, f"a series without the model_name label: {line}"
                name = name.replace(label + ",", "").replace("," + label, "").replace("{" + label + "}", "")
                out[name] = float(value)
        return out

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def start_server(cascade, **kwargs) -> Server:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    app = create_app(cascade, **kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return Server(f"http://127.0.0.1:{port}", app, server, thread)


@pytest.fixture(scope="module")
def server(tiny_pair_dirs):
    s = start_server(tiny_cascade(tiny_pair_dirs), default_policy="chow(alpha=0.3)", default_max_tokens=16)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alone(tiny_pair_dirs):
    """A second cascade on the same weights, for running requests alone through the library."""
    return tiny_cascade(tiny_pair_dirs)


def wait_idle(server: Server, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["cascade_active_rows"] == 0 and m["cascade_queue_depth"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"rows still held: {m['cascade_active_rows']}")
        time.sleep(0.1)


MESSAGES = [{"role": "user", "content": "write a function that adds two numbers."}]


# ---------------------------------------------------------------------- basics
def test_models_health_and_metrics(server):
    health = httpx2.get(server.url + "/health").json()
    assert health["status"] == "ok"
    ids = [m.id for m in server.client().models.list().data]
    assert ids[0] == "cascade" and "cascade:chow" in ids and "cascade:oracle" not in ids
    text = httpx2.get(server.url + "/metrics").text
    for name in ("cascade_requests_total", "cascade_tokens_total", "cascade_escalations_total",
                 "cascade_acceptance_length", "cascade_target_token_fraction", "cascade_round_seconds",
                 "cascade_queue_depth", "cascade_active_rows", "cascade_kv_rows_free"):
        assert name in text, name


def test_the_occupancy_gauges_are_right_before_the_first_request(tiny_pair_dirs):
    """The fuzz found ``cascade_kv_rows_free`` at 0 right after start-up (it was first set by a round)."""
    fresh = start_server(tiny_cascade(tiny_pair_dirs, max_rows=3))
    try:
        m = fresh.metrics()
        assert m["cascade_kv_rows_free"] == 3.0 and m["cascade_active_rows"] == 0.0 and m["cascade_queue_depth"] == 0.0
    finally:
        fresh.stop()


def test_metrics_count_dynamic_speculation_block_lengths(tiny_pair_dirs):
    """A server whose engine chooses block lengths exports how many rounds ran at each k."""
    from cascade.config import EngineConfig

    cascade = tiny_cascade(tiny_pair_dirs)
    cascade.engine.config = EngineConfig(max_rows=4, max_len=256, adaptive_k=True)
    cascade.engine.block_controller = BlockLengthController()
    cascade.engine.profile_speculation()
    s = start_server(cascade, default_policy="speculative", default_max_tokens=12)
    try:
        s.client().chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=12, temperature=0)
        m = wait_idle(s)
        counted = {k: m[f'cascade_block_length_rounds_total{{k="{k}"}}'] for k in range(6)
                   if f'cascade_block_length_rounds_total{{k="{k}"}}' in m}
        assert counted == {k: float(n) for k, n in cascade.engine.stats.block_length_rounds.items()}
        assert sum(counted.values()) >= 1
    finally:
        s.stop()


def test_chat_streamed_equals_not_streamed(server):
    client = server.client()
    r = client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24
    assert len(text) == 24  # one character per token
    extra = r.usage.model_extra["cascade"]
    assert extra["policy"].startswith("chow(") and extra["draft_tokens"] > 0
    chunks = list(client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.model_extra["cascade"] == extra


def test_completions_streamed_equals_not_streamed_and_library(server, alone):
    client = server.client()
    for policy in ("target-only", "speculative", "bild"):
        r = client.completions.create(model=f"cascade:{policy}", prompt="def add(a, b):", max_tokens=20, temperature=0)
        chunks = list(client.completions.create(model=f"cascade:{policy}", prompt="def add(a, b):", max_tokens=20,
                                                temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
        [lib] = alone.generate("def add(a, b):", SamplingParams(max_tokens=20), policy=policy)
        assert r.choices[0].text == lib.text, policy


def test_a_takeover_streams_from_its_first_round_and_a_router_holds_its_answer(server, alone):
    """takeover hands over mid-answer (tau = 1: at its first chance) and streams throughout: several content chunks,
    adding up to the non-streamed answer and the library's; quantile's draft answer arrives in one piece at its end."""
    client = server.client()

    def content_chunks(policy):
        chunks = client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=24, temperature=0,
                                                stream=True, extra_body={"cascade": {"policy": policy}})
        return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]

    for policy in ("takeover(tau=1.0, after=6)", "takeover-spec(tau=1.0, after=6)"):
        pieces = content_chunks(policy)
        r = client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=24, temperature=0,
                                           extra_body={"cascade": {"policy": policy}})
        [lib] = alone.generate(MESSAGES, SamplingParams(max_tokens=24), policy=policy)
        assert "".join(pieces) == r.choices[0].message.content == lib.text, policy
        assert len(pieces) >= 3 and lib.stats.target_tokens > 0, policy  # streamed round by round; the target ran
    assert len(content_chunks("quantile(tau=-1e9)")) == 1  # kept: the whole draft answer at once, at its end


def test_stop_strings_streamed_equals_not_streamed(server, alone):
    client = server.client()
    [lib] = alone.generate(MESSAGES, SamplingParams(max_tokens=40), policy="chow(alpha=0.3)")
    stop = lib.text[10:12]  # a two-character stop string that occurs in the answer
    r = client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=40, temperature=0, stop=[stop])
    text = r.choices[0].message.content
    assert stop not in text and text == lib.text[:lib.text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=40, temperature=0,
                                            stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_more_than_four_stop_strings_work(server, alone):
    """lm-evaluation-harness's HumanEval task sends five stop strings; OpenAI's cap of four is not ours."""
    client = server.client()
    [lib] = alone.generate(MESSAGES, SamplingParams(max_tokens=40), policy="chow(alpha=0.3)")
    stop = lib.text[10:12]
    stops = ["\x00never-1", "\x00never-2", "\x00never-3", "\x00never-4", stop, "\x00never-5"]
    r = client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=40, temperature=0, stop=stops)
    assert r.choices[0].message.content == lib.text[:lib.text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_text_delta_holds_back_stop_prefixes_and_partial_characters():
    d = TextDelta(("END",))
    assert d("abc E", False) == "abc "
    assert d("abc EN", False) == ""
    assert d("abc ENx", False) == "ENx"
    assert d("abc ENx\ufffd", False) == ""
    assert d("abc ENx\u00e9", True) == "\u00e9"


def test_policy_per_request_body_field_and_model_name(server, alone):
    client = server.client()
    a = client.chat.completions.create(model="cascade:chow:0.8", messages=MESSAGES, max_tokens=16, temperature=0)
    b = client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=16, temperature=0,
                                       extra_body={"cascade": {"policy": "chow", "alpha": 0.8}})
    c = client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=16, temperature=0,
                                       extra_body={"cascade": {"alpha": 0.8}})
    policies = {x.usage.model_extra["cascade"]["policy"] for x in (a, b, c)}
    assert policies == {parse_policy("chow:0.8").describe()}
    [lib] = alone.generate(MESSAGES, SamplingParams(max_tokens=16), policy="chow:0.8")
    for x in (a, b, c):
        assert x.choices[0].message.content == lib.text
        assert x.usage.model_extra["cascade"]["target_tokens"] == lib.stats.target_tokens


def test_n_choices_seeded_sampling_and_logprobs(server):
    client = server.client()
    kwargs = dict(model="cascade", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=7, n=3, logprobs=True)
    r1 = client.chat.completions.create(**kwargs)
    r2 = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in r1.choices]
    assert texts == [c.message.content for c in r2.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # choice i uses seed + i
    assert r1.usage.completion_tokens == sum(len(c.logprobs.content) for c in r1.choices)
    for choice in r1.choices:
        assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
        assert all(t.logprob <= 0.0 for t in choice.logprobs.content)
    comp = client.completions.create(model="cascade", prompt="x = ", max_tokens=8, temperature=0, logprobs=0)
    assert len(comp.choices[0].logprobs.token_logprobs) == 8


# ---------------------------------------------------------------------- continuous batching
def test_sixteen_concurrent_requests_equal_each_request_alone(server, alone):
    """Different prompts, lengths and policies at once (4 rows, so most of them queue and join the running
    batch between rounds): each answer and its usage equal the same request run alone."""
    policies = ["chow(alpha=0.3)", "speculative", "target-only", "bild", "chow-cut(alpha=0.5)", "draft-only",
                "quantile(tau=-1.0)", "token-v2(alpha=0.2)", "takeover(tau=1.0, after=4)", "takeover-spec(tau=1.0, after=3)"]
    jobs = [(f"question {i}: what is {i} + {2 * i}?", 6 + 3 * (i % 5), policies[i % len(policies)]) for i in range(16)]
    client = server.client()

    def ask(job):
        prompt, max_tokens, policy = job
        return client.chat.completions.create(model="cascade", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=max_tokens, temperature=0,
                                              extra_body={"cascade": {"policy": policy}})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, max_tokens, policy), r in zip(jobs, answers):
        [lib] = alone.generate([{"role": "user", "content": prompt}], SamplingParams(max_tokens=max_tokens), policy=policy)
        assert r.choices[0].message.content == lib.text, policy
        extra = r.usage.model_extra["cascade"]
        assert r.usage.completion_tokens == lib.stats.emitted_tokens
        assert (extra["draft_tokens"], extra["target_tokens"], extra["escalations"]) == \
            (lib.stats.draft_tokens, lib.stats.target_tokens, lib.stats.escalations), policy
    m = wait_idle(server)
    assert m["cascade_kv_rows_free"] == 4
    assert m['cascade_requests_total{status="ok"}'] >= 16
    assert m['cascade_tokens_total{source="bonus"}'] > 0 and m['cascade_tokens_total{source="draft"}'] > 0


# ---------------------------------------------------------------------- bad input
def _post(server, path, body, raw: bytes | None = None) -> httpx2.Response:
    """POST ``body`` as JSON (ASCII-escaped, so a lone surrogate travels as ``\\ud800``, as a client in another
    language may send it) or ``raw`` bytes."""
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx2.post(server.url + path, content=content, headers={"content-type": "application/json"})


CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-4", "messages": MESSAGES}, 404, "model"),
    ({"model": "cascade:nonsense", "messages": MESSAGES}, 404, "model"),
    ({"model": "cascade", "messages": MESSAGES, "cascade": {"policy": "nonsense"}}, 400, "cascade"),
    ({"model": "cascade", "messages": MESSAGES, "cascade": {"policy": "chow", "alpha": 7}}, 400, "cascade"),
    ({"model": "cascade", "messages": MESSAGES, "cascade": {"beta": 1}}, 400, "cascade"),
    ({"model": "cascade:oracle", "messages": MESSAGES}, 400, "cascade"),
    ({"model": "cascade", "messages": MESSAGES, "temperature": 5}, 400, "temperature"),
    ({"model": "cascade", "messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ({"model": "cascade", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "cascade", "messages": MESSAGES, "n": 99}, 400, "n"),
    ({"model": "cascade", "messages": MESSAGES, "seed": -1}, 400, "seed"),
    ({"model": "cascade", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": "cascade", "messages": MESSAGES, "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "cascade", "messages": MESSAGES, "max_completion_tokens": 100000}, 400, "max_completion_tokens"),
    ({"model": "cascade", "messages": MESSAGES, "top_logprobs": 3}, 400, "top_logprobs"),
    ({"model": "cascade", "messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"model": "cascade", "messages": MESSAGES, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": "cascade", "messages": []}, 400, "messages"),
    ({"model": "cascade", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "cascade"}, 400, "messages"),
    ({"model": "cascade", "messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages"),
    # issue 32's fuzz: seeds past a 64-bit generator's, lone surrogates, and types OpenAI does not coerce
    ({"model": "cascade", "messages": MESSAGES, "seed": 2**64, "temperature": 1.0}, 400, "seed"),
    ({"model": "cascade", "messages": MESSAGES, "seed": 2**64 - 1, "n": 2, "temperature": 1.0}, 400, "seed"),
    ({"model": "cascade", "messages": [{"role": "user", "content": "a\ud800b"}]}, 400, "messages.0.content"),
    ({"model": "cascade", "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, 400,
     "messages.0.content.0.text"),
    ({"model": "cascade", "messages": MESSAGES, "logprobs": "yes"}, 400, "logprobs"),
    ({"model": "cascade", "messages": MESSAGES, "max_tokens": "3"}, 400, "max_tokens"),
    ({"model": "cascade", "messages": MESSAGES, "temperature": "0"}, 400, "temperature"),
    ({"model": "cascade", "messages": MESSAGES, "stream": "false"}, 400, "stream"),
])
def test_bad_chat_requests_get_4xx_naming_the_field(server, body, status, param):
    r = _post(server, CHAT, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert err["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": "cascade", "prompt": ""}, "prompt"),
    ({"model": "cascade", "prompt": [[1, 2], []]}, "prompt"),
    ({"model": "cascade", "prompt": [1, 2, 999]}, "prompt"),
    ({"model": "cascade", "prompt": "hi", "echo": True}, "echo"),
    ({"model": "cascade", "prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"model": "cascade", "prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ({"model": "cascade", "prompt": "a\ud800b"}, "prompt"),
    ({"model": "cascade", "prompt": ["ok", "\udbff"]}, "prompt.1"),
    ({"model": "cascade", "prompt": "hi", "echo": "false"}, "echo"),
])
def test_bad_completion_requests_get_400_naming_the_field(server, body, param):
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_json_and_non_object_bodies(server):
    bad_utf8 = b'{"model": "cascade", "messages": [{"role": "user", "content": "a\xff\xfeb"}]}'
    deep = b"[" * 2000 + b"]" * 2000
    for raw in (b"{not json", b"[1, 2]", b"", bad_utf8, deep, b'{"model": ' * 1500 + b"1" + b"}" * 1500):
        r = _post(server, CHAT, None, raw=raw)
        assert r.status_code == 400, raw[:40]
        assert set(r.json()) == {"error"} and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_unknown_routes_and_methods_answer_in_openais_error_shape(server):
    r = httpx2.get(server.url + "/v1/nope")
    assert r.status_code == 404 and set(r.json()) == {"error"} and r.json()["error"]["message"]
    r = httpx2.get(server.url + CHAT)
    assert r.status_code == 405 and set(r.json()) == {"error"}


def test_a_bad_request_does_not_drop_the_connection_for_the_next_one(server):
    """The fuzz found a lone surrogate answered with a plain-text 500 and the connection dropped; on one kept-alive
    connection, the refusal and then a normal request both get their answers."""
    with httpx2.Client(base_url=server.url) as client:
        for body in ({"model": "cascade", "messages": [{"role": "user", "content": "a\ud800b"}]},
                     {"model": "cascade", "messages": MESSAGES, "seed": 2**70, "temperature": 0.5, "stream": True}):
            r = client.post(CHAT, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] in ("messages.0.content", "seed"), r.text
        r = client.post(CHAT, json={"model": "cascade", "messages": MESSAGES, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_openai_client_raises_on_4xx(server):
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client().chat.completions.create(model="cascade", messages=MESSAGES, temperature=3)


# ---------------------------------------------------------------------- disconnects, failures, capacity
def test_client_disconnect_mid_stream_frees_rows(server):
    body = {"model": "cascade:target-only", "messages": MESSAGES, "max_tokens": 180, "stream": True, "temperature": 0}
    with httpx2.Client(timeout=60) as http:
        with http.stream("POST", server.url + CHAT, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
        # leaving the block closes the connection half way through the answer
    m = wait_idle(server)
    assert m["cascade_kv_rows_free"] == 4
    assert m['cascade_requests_total{status="aborted"}'] >= 1
    r = server.client().chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5


class _Slow(Chow):
    """A policy whose every round takes 50 ms more: a request that is still running when its client leaves,
    however fast the machine."""

    def trigger(self, conf):
        time.sleep(0.05)
        return super().trigger(conf)


@pytest.fixture
def slow_policy():
    register("test-slow")(_Slow)
    yield "test-slow"
    _REGISTRY.pop("test-slow", None)


def test_non_streaming_client_disconnect_frees_rows(server, slow_policy):
    body = {"model": "cascade", "messages": MESSAGES, "max_tokens": 180, "temperature": 0,
            "cascade": {"policy": slow_policy, "k": 1}}
    with pytest.raises(httpx2.TimeoutException):  # 200 rounds of >= 50 ms: the client leaves long before
        httpx2.post(server.url + CHAT, json=body, timeout=0.5)
    m = wait_idle(server)
    assert m["cascade_kv_rows_free"] == 4
    assert m['cascade_requests_total{status="aborted"}'] >= 1


class _Explodes(Chow):
    """A policy whose trigger raises: a stand-in for a bug that hits one request inside a round."""

    def trigger(self, conf):
        raise RuntimeError("boom")


@pytest.fixture
def exploding_policy():
    register("test-explodes")(_Explodes)
    yield "test-explodes"
    _REGISTRY.pop("test-explodes", None)


def test_an_exception_in_one_request_fails_only_that_request(server, alone, exploding_policy):
    client = server.client()

    def ask(policy):
        return client.chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=20, temperature=0,
                                              extra_body={"cascade": {"policy": policy}})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(ask, p) for p in ("chow(alpha=0.3)", exploding_policy, "speculative")]
        with pytest.raises(openai.InternalServerError, match="boom"):
            futures[1].result()
        good = [futures[0].result(), futures[2].result()]
    for policy, r in zip(("chow(alpha=0.3)", "speculative"), good):
        [lib] = alone.generate(MESSAGES, SamplingParams(max_tokens=20), policy=policy)
        assert r.choices[0].message.content == lib.text
    m = wait_idle(server)
    assert m["cascade_kv_rows_free"] == 4 and m['cascade_requests_total{status="error"}'] >= 1
    assert ask("speculative").usage.completion_tokens == 20


def test_full_queue_answers_429_with_retry_after(tiny_pair_dirs):
    s = start_server(tiny_cascade(tiny_pair_dirs, max_rows=1), max_queue=1)
    try:
        body = {"model": "cascade:target-only", "messages": MESSAGES, "max_tokens": 180, "stream": True}
        with httpx2.Client(timeout=60) as http:
            with http.stream("POST", s.url + CHAT, json=body) as r1, http.stream("POST", s.url + CHAT, json=body) as r2:
                assert r1.status_code == r2.status_code == 200  # one running, one queued
                r3 = http.post(s.url + CHAT, json=body)
                assert r3.status_code == 429 and int(r3.headers["retry-after"]) >= 1
                assert r3.json()["error"]["type"] == "rate_limit_error"
        m = wait_idle(s)
        assert m["cascade_kv_rows_free"] == 1
        assert m['cascade_requests_total{status="429"}'] == 1
    finally:
        s.stop()


def test_shutdown_drains_requests_in_flight(tiny_pair_dirs):
    s = start_server(tiny_cascade(tiny_pair_dirs, max_rows=2), drain_timeout_s=60)
    client = s.client()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.completions.create, model="cascade:target-only", prompt="count: ",
                             max_tokens=60, temperature=0)
        deadline = time.monotonic() + 30
        while s.metrics()["cascade_active_rows"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s.stop()  # uvicorn waits for the open request; the engine finishes it before stopping
        r = future.result(timeout=60)
    assert r.usage.completion_tokens == 60 and r.choices[0].finish_reason == "length"
    assert not s.app.state.engine_loop.alive


def test_max_tokens_past_the_context_is_refused_and_a_default_is_cut_to_fit(server):
    """vLLM's answer to a request that cannot fit: a 400 that says the context length; a request that gives
    no max_tokens gets the default cut to the room its prompt leaves (the test server: max_len 256)."""
    r = _post(server, CHAT, {"model": "cascade", "messages": MESSAGES, "max_tokens": 100000})
    assert "maximum context length is 256 tokens" in r.json()["error"]["message"]
    prompt = list(range(1, 50)) * 5  # 245 tokens: 10 fit after it
    r = _post(server, "/v1/completions", {"model": "cascade", "prompt": prompt, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 10


class _LockCheckedDict(dict):
    """``EngineLoop._handles`` that records every change made without the loop's lock held."""

    def __init__(self, lock, *args):
        super().__init__(*args)
        self.lock, self.unlocked = lock, []

    def _check(self, what):
        if not self.lock._is_owned():
            self.unlocked.append(what)

    def pop(self, *args):
        self._check("pop")
        return super().pop(*args)

    def __setitem__(self, key, value):
        self._check("set")
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._check("del")
        super().__delitem__(key)


def test_request_bookkeeping_changes_only_under_the_lock(tiny_pair_dirs):
    s = start_server(tiny_cascade(tiny_pair_dirs, max_rows=2), default_max_tokens=4)
    try:
        loop = s.app.state.engine_loop
        checked = _LockCheckedDict(loop._lock, loop._handles)
        loop._handles = checked
        client = s.client()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: client.completions.create(model="cascade", prompt=f"def f{i}():", max_tokens=6,
                                                              temperature=0), range(8)))
        wait_idle(s)
        assert checked.unlocked == []
    finally:
        s.stop()
