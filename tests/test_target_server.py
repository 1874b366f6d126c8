"""``cascade target-serve`` on the project's runner, for real: the verify endpoint's wire format, the runner
scorer's prefix reuse (logits equal a from-scratch pass, asked-for positions never read from the cache),
the app on 127.0.0.1 through the real client (``RemoteVLLM``), greedy cascades through it equal to the
in-process target, prefix reuse on its /metrics, refusals in OpenAI's shape, and a mixed replica set
(a stock vLLM-like server beside a verify server). ``test_vllm_engine.py`` runs the vLLM middleware."""

from __future__ import annotations

import math
import socket
import threading
import time

import httpx2
import pytest
import torch
import uvicorn

from cascade import Cascade, SamplingParams
from cascade.config import EngineConfig
from cascade.models.llama import LlamaRunner
from cascade.models.scoring import FULL_ROWS, ScoredPositions, scored_from_logits, topk_to_logits
from cascade.models.vllm import RemotePolicy, RemoteVLLM, VLLMRunner
from cascade.target_server import wire
from cascade.target_server.app import create_target_app
from cascade.target_server.runner_scorer import RunnerScorer, common_prefix

PROMPTS = [[3, 17, 42, 9], [10, 5, 6, 7, 8, 20, 31], list(range(1, 40)), [1]]


def tiny_target(dirs, max_rows: int = 4, max_len: int = 256) -> LlamaRunner:
    return LlamaRunner.from_pretrained(dirs[1], max_rows=max_rows, max_len=max_len, dtype="float32")


def reference_logits(runner: LlamaRunner, prompt: list[int], n: int) -> torch.Tensor:
    """The last n positions' logits of ``prompt`` computed from scratch on row 0: [n, V]."""
    runner.free([0])
    out = runner.forward_span([0], [prompt], num_logits=[n])
    runner.free([0])
    return out


class Served:
    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the target server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx2.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = float(value)
        return out

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def target_server(tiny_pair_dirs):
    served = Served(create_target_app(RunnerScorer(tiny_target(tiny_pair_dirs, max_rows=8), max_top_k=64),
                                      served_name="tiny-target"))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def keyed_server(tiny_pair_dirs):
    served = Served(create_target_app(RunnerScorer(tiny_target(tiny_pair_dirs, max_rows=2), full_rows=False),
                                      api_key="sekret"))
    yield served
    served.stop()


# ------------------------------------------------------------------------------- wire format
def test_the_wire_format_round_trips_sparse_and_dense_answers():
    dense = torch.log_softmax(torch.randn(3, 64), dim=-1)
    scored = [ScoredPositions(ids=[[3, 7], [1]], logprobs=[[-0.1, float("-inf")], [-0.01]], cached_tokens=5),
              ScoredPositions(ids=[], logprobs=[], cached_tokens=2, dense=dense)]
    import json

    answer = json.loads(json.dumps(wire.encode_results("m", scored)))  # through real JSON: no -inf there
    back = wire.decode_results(answer, [2, 3])
    assert back[0].ids == [[3, 7], [1]] and back[0].logprobs == [[-0.1, float("-inf")], [-0.01]]
    assert back[0].cached_tokens == 5 and back[1].cached_tokens == 2
    assert torch.equal(back[1].dense, dense)
    with pytest.raises(ValueError, match="expected 1 results"):
        wire.decode_results(answer, [2])
    with pytest.raises(ValueError, match="3 rows for 4 positions"):
        wire.decode_results(answer, [2, 4])


@pytest.mark.parametrize("body, field", [
    ([], "body"), ({"prompts": []}, "prompts"), ({"prompts": [[1, 2]], "last_n": [1, 1]}, "last_n"),
    ({"prompts": [[1, 2]], "last_n": [3]}, "last_n.0"), ({"prompts": [[1, 2]], "last_n": [0]}, "last_n.0"),
    ({"prompts": [[1, 99]], "last_n": [1]}, "prompts.0"), ({"prompts": [[1, "2"]], "last_n": [1]}, "prompts.0"),
    ({"prompts": [[1, True]], "last_n": [1]}, "prompts.0"), ({"prompts": [[]], "last_n": [1]}, "prompts.0"),
    ({"prompts": [list(range(1, 40))], "last_n": [1]}, "prompts.0"), ({"prompts": [[1]], "last_n": [1], "top_k": 0}, "top_k"),
    ({"prompts": [[1]], "last_n": [1], "top_k": -1}, "top_k"), ({"prompts": [[1]], "last_n": [1], "top_k": 65}, "top_k"),
    ({"prompts": [[1]], "last_n": [1], "extra": 1}, "extra"), ({"prompts": [[1]], "last_n": [1], "model": 3}, "model")])
def test_a_bad_verify_request_names_its_field(body, field):
    with pytest.raises(ValueError) as info:
        wire.parse_request(body, vocab_size=64, max_len=32, max_top_k=64, full_rows=False)
    assert str(info.value).startswith(field + ":")


def test_scored_from_logits_keeps_the_topk_and_the_token_there():
    logits = torch.randn(3, 64)
    s = scored_from_logits(logits, [5, 60], 2)
    logp = torch.log_softmax(logits, dim=-1)
    for j, there in enumerate([5, 60, None]):
        want = set(logp[j].topk(2).indices.tolist()) | ({there} if there is not None else set())
        assert set(s.ids[j]) == want
        assert s.logprobs[j] == [pytest.approx(logp[j, t].item()) for t in s.ids[j]]
    full = scored_from_logits(logits, [5, 60], FULL_ROWS)
    assert torch.allclose(topk_to_logits([full], 64), logp)


# ------------------------------------------------------------------------------- runner scorer
def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0 and common_prefix([1, 2], [1, 2]) == 2
    assert common_prefix([5], [6]) == 0 and common_prefix([1, 2, 3], [1, 2]) == 2
    import random

    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(3) for _ in range(rng.randrange(12))]
        b = a[:rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(5))]
        want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == want


def test_the_scorer_reuses_prefixes_and_matches_a_fresh_pass(tiny_pair_dirs):
    runner, ref = tiny_target(tiny_pair_dirs, max_rows=2), tiny_target(tiny_pair_dirs, max_rows=1)
    scorer = RunnerScorer(runner, max_top_k=64)
    seq = list(range(1, 30))
    steps = [(seq[:20], 20), (seq[:24], 5), (seq[:29], 6), (seq[:27], 2), (seq[:27], 2)]  # grow, grow, roll back
    for prompt, n in steps:
        [s] = scorer.score([prompt], [n], FULL_ROWS)
        assert torch.allclose(s.dense, torch.log_softmax(reference_logits(ref, prompt, n), -1), atol=1e-5)
    assert scorer.stats.hits == 0 + 19 + 23 + 25 + 25  # reuse stops short of the positions asked
    assert scorer.stats.queries == sum(len(p) for p, _ in steps) and scorer.stats.positions_scored == 35


def test_the_scorer_sends_sequences_to_their_rows_and_evicts_the_least_recently_used(tiny_pair_dirs):
    scorer = RunnerScorer(tiny_target(tiny_pair_dirs, max_rows=2), max_top_k=64)
    a, b, c = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]
    scorer.score([a, b], [1, 1], 3)
    [sb, sa] = scorer.score([b + [20], a + [21]], [2, 2], 3)  # each finds its own row, in either order
    assert (sa.cached_tokens, sb.cached_tokens) == (5, 5)
    scorer.score([a + [21, 22]], [1], 3)  # a used last: b is now the least recently used
    [sc] = scorer.score([c], [1], 3)
    assert sc.cached_tokens == 0
    [sa] = scorer.score([a + [21, 22, 23]], [1], 3)
    assert sa.cached_tokens == 8  # a survived; b's row went to c
    [sb] = scorer.score([b + [20, 24]], [1], 3)
    assert sb.cached_tokens == 0


def test_a_call_larger_than_the_rows_is_scored_in_pieces(tiny_pair_dirs):
    scorer, ref = RunnerScorer(tiny_target(tiny_pair_dirs, max_rows=2)), tiny_target(tiny_pair_dirs, max_rows=1)
    out = scorer.score(PROMPTS, [1, 3, 5, 1], FULL_ROWS)
    for s, p, n in zip(out, PROMPTS, [1, 3, 5, 1]):
        assert torch.allclose(s.dense, torch.log_softmax(reference_logits(ref, p, n), -1), atol=1e-5)


def test_a_failed_call_leaves_no_row_claiming_tokens(tiny_pair_dirs):
    runner = tiny_target(tiny_pair_dirs, max_rows=2, max_len=32)
    scorer = RunnerScorer(runner)
    scorer.score([[1, 2, 3]], [1], 3)
    with pytest.raises(ValueError, match="max_len"):
        scorer.score([[1, 2, 3, 4], list(range(1, 40))], [1, 1], 3)
    [s] = scorer.score([[1, 2, 3, 4]], [1], 3)
    assert s.cached_tokens in (0, 3)  # whatever the rows hold is what they claim
    assert runner.lengths([0, 1]) == [len(h) for h in scorer._held]


# ------------------------------------------------------------------------------- over HTTP
def test_the_client_finds_the_verify_endpoint(target_server):
    backend = RemoteVLLM(target_server.url)
    assert backend.model == "tiny-target" and backend.max_len == 256
    assert backend.verify_capabilities(0)["engine"] == "cascade-runner"
    [s] = backend.score([[1, 2, 3, 4, 5]], [2], 5)
    assert len(s.ids) == 2 and all(len(row) in (5, 6) for row in s.ids)


def remote_cascade(dirs, urls, *, logprobs: int = 20, max_rows: int = 4, on_target_error: str = "fail",
                   policy: RemotePolicy = RemotePolicy()) -> Cascade:
    draft = LlamaRunner.from_pretrained(dirs[0], max_rows=max_rows, max_len=256, dtype="float32")
    backend = RemoteVLLM(urls, policy=policy)
    target = VLLMRunner(backend, vocab_size=draft.vocab_size, num_params=1, max_rows=max_rows, max_len=256,
                        logprobs=logprobs)
    return Cascade(draft, target, None, eos_token_ids=[],
                   config=EngineConfig(max_rows=max_rows, max_len=256, on_target_error=on_target_error))


def local_cascade(dirs, max_rows: int = 4) -> Cascade:
    d, t = (LlamaRunner.from_pretrained(p, max_rows=max_rows, max_len=256, dtype="float32") for p in dirs)
    return Cascade(d, t, None, eos_token_ids=[], config=EngineConfig(max_rows=max_rows, max_len=256))


@pytest.mark.parametrize("policy, logprobs", [("target-only", 20), ("speculative", 20), ("chow(alpha=0.3)", 20),
                                              ("bild", FULL_ROWS), ("token-v1(alpha=0.3)", FULL_ROWS)])
def test_greedy_through_the_verify_endpoint_equals_the_in_process_target(tiny_pair_dirs, target_server, policy,
                                                                         logprobs):
    """Top-k is exact for argmax-only policies; whole rows make every policy exact (bild reads p(x), token-v1
    the whole of p)."""
    params = SamplingParams(max_tokens=30)
    want = local_cascade(tiny_pair_dirs).generate(PROMPTS, params, policy=policy)
    c = remote_cascade(tiny_pair_dirs, target_server.url, logprobs=logprobs)
    got = c.generate(PROMPTS, params, policy=policy)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert g.stats.escalations == w.stats.escalations and g.stats.target_tokens == w.stats.target_tokens


def test_verifications_read_the_servers_prefix_cache(tiny_pair_dirs, target_server):
    before = target_server.metrics()
    c = remote_cascade(tiny_pair_dirs, target_server.url)
    out = c.generate(PROMPTS, SamplingParams(max_tokens=30), policy="speculative")
    after = target_server.metrics()
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    scored = after["cascade_target_positions_scored_total"] - before["cascade_target_positions_scored_total"]
    backend = c.target.backend
    assert queries == backend.prompt_tokens and hits == backend.cached_tokens
    computed = queries - hits
    prompts = sum(len(p) for p in PROMPTS)
    # each pass recomputes only what it scores (plus the prompt once): nowhere near the whole sequence per pass
    assert computed <= prompts + scored + 1
    assert hits > 0.5 * queries, (hits, queries)
    assert sum(len(o.token_ids) for o in out) == 120


def test_refusals_are_in_openais_shape(target_server, keyed_server):
    url = target_server.url + wire.VERIFY_PATH
    r = httpx2.post(url, json={"prompts": [[1, 2]], "last_n": [5]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "last_n.0"
    r = httpx2.post(url, content=b'{"prompts": [[1, 2]', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed" in r.json()["error"]["message"]
    r = httpx2.post(url, json={"prompts": [[1, 2]], "last_n": [1], "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx2.post(keyed_server.url + wire.VERIFY_PATH, json={"prompts": [[1, 2]], "last_n": [1], "top_k": -1},
                    headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"  # whole rows not enabled there
    r = httpx2.delete(url)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx2.get(target_server.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx2.post(keyed_server.url + wire.VERIFY_PATH, json={"prompts": [[1]], "last_n": [1]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx2.get(keyed_server.url + "/health").status_code == 200
    backend = RemoteVLLM(keyed_server.url, api_key="sekret")
    [s] = backend.score([[1, 2, 3]], [1], 3)
    assert len(s.ids) == 1
    r = httpx2.post(target_server.url + wire.VERIFY_PATH, json={"prompts": [[1, 2]], "last_n": [1]})
    assert r.status_code == 200  # the server still serves after every refusal


def test_a_stock_server_and_a_verify_server_serve_one_cascade(tiny_pair_dirs, target_server):
    """Replicas of both kinds: each pass goes where round-robin sends it, in that replica's protocol."""
    from test_vllm_target import _start_fake

    fake, fake_url, handler = _start_fake()
    try:
        backend = RemoteVLLM([fake_url, target_server.url], model=None)
        assert backend.model == "m"  # the first replica's name; the verify server is asked without a name check
        backend.model = None
        before = list(backend.passes_per_replica)  # the /v1/models call counted there
        for _ in range(4):
            backend.score([[1, 2, 3]], [2], 2)
        assert handler.posts == 2 and [a - b for a, b in zip(backend.passes_per_replica, before)] == [2, 2]
        assert backend.verify_capabilities(0) is None and backend.verify_capabilities(1) is not None
    finally:
        fake.shutdown()


def test_full_rows_are_refused_by_a_stock_server():
    from test_vllm_target import _start_fake

    fake, url, _ = _start_fake()
    try:
        with pytest.raises(ValueError, match="target_logprobs"):
            RemoteVLLM(url).score([[1, 2]], [1], FULL_ROWS)
    finally:
        fake.shutdown()


def test_json_has_no_infinities():
    assert wire.encode_results("m", [ScoredPositions(ids=[[1]], logprobs=[[-math.inf]])])["results"][0]["logprobs"] == [[None]]
