"""The vLLM target runner's logic without vLLM: row bookkeeping, the top-k logits it builds, the remote
client's timeouts / retries / circuit breaker against real local HTTP servers, and what the engine and the
server do when the target is down. The scoring seam (``ReferenceBackend``) computes exactly what vLLM
returns (top-k log-probs of each position, plus the log-prob of the token that is there) with the
in-process runner on the same checkpoint; ``test_vllm_engine.py`` runs the real vLLM engine."""

from __future__ import annotations

import http.server
import json
import threading
import time

import httpx2
import pytest
import torch

from cascade import Cascade, SamplingParams
from cascade.config import EngineConfig
from cascade.models.base import TargetUnavailable
from cascade.policies import parse_policy
from cascade.models.llama import LlamaRunner
from cascade.models.vllm import (RemotePolicy, RemoteVLLM, ScoredPositions, VLLMRunner, count_params,
                                 topk_to_logits, truncate_to_topk)
from test_server import start_server
from tiny_tokenizer import CharTokenizer


class ReferenceBackend:
    """Scores each prompt from scratch with an in-process runner (its row 0) and keeps the top-k, as vLLM
    does. ``down_after`` calls, it raises TargetUnavailable (None: never)."""

    def __init__(self, runner: LlamaRunner, down_after: int | None = None) -> None:
        self.runner, self.down_after, self.calls = runner, down_after, 0
        self.max_len = runner.max_len

    def score(self, prompts, last_n, k):
        if self.down_after is not None and self.calls >= self.down_after:
            raise TargetUnavailable("the reference target is down")
        self.calls += 1
        out = []
        for p, n in zip(prompts, last_n):
            self.runner.free([0])
            logits = self.runner.forward_span([0], [list(p)], num_logits=[n])  # [n, V]
            there = torch.tensor(list(p[len(p) - n + 1:]) + [0])  # the token at each next position (last: none)
            trunc = truncate_to_topk(logits, k, there)
            trunc[-1] = truncate_to_topk(logits[-1:], k)[0]
            ids = [torch.isfinite(row).nonzero().squeeze(1).tolist() for row in trunc]
            out.append(ScoredPositions(ids=ids, logprobs=[trunc[i, ids[i]].tolist() for i in range(n)]))
        self.runner.free([0])
        return out

    def close(self) -> None:
        pass


def vllm_like_cascade(dirs, *, k: int = 20, down_after: int | None = None, on_target_error: str = "fail",
                      tokenizer=None, max_rows: int = 4, max_len: int = 256) -> Cascade:
    draft_dir, target_dir = dirs
    draft = LlamaRunner.from_pretrained(draft_dir, max_rows=max_rows, max_len=max_len, dtype="float32")
    scorer = LlamaRunner.from_pretrained(target_dir, max_rows=1, max_len=max_len, dtype="float32")
    target = VLLMRunner(ReferenceBackend(scorer, down_after), vocab_size=scorer.vocab_size, num_params=scorer.num_params,
                        max_rows=max_rows, max_len=max_len, logprobs=k)
    config = EngineConfig(max_rows=max_rows, max_len=max_len, on_target_error=on_target_error)
    return Cascade(draft, target, tokenizer, eos_token_ids=[], config=config)


def local_cascade(dirs, *, max_rows: int = 4, max_len: int = 256) -> Cascade:
    d, t = (LlamaRunner.from_pretrained(p, max_rows=max_rows, max_len=max_len, dtype="float32") for p in dirs)
    return Cascade(d, t, None, eos_token_ids=[], config=EngineConfig(max_rows=max_rows, max_len=max_len))


PROMPTS = [[3, 17, 42, 9], [10, 5, 6, 7, 8, 20, 31], list(range(1, 40)), [1]]


# ------------------------------------------------------------------------------- top-k logits
def test_in_process_vllm_on_a_gpu_leaves_the_draft_its_memory():
    """vLLM claims gpu_memory_utilization x the GPU's total and refuses to start with less than that free;
    the draft is on the GPU already, so the default is what is free less the draft's reserve, <= 0.9."""
    from cascade.models.vllm import shared_gpu_memory_fraction as share

    GiB = 2**30
    assert share(139 * GiB, 141 * GiB) == 0.9  # an H200 with a small draft: vLLM's own default fits
    # a 24 GiB GPU with 2.5 GiB taken by the draft: 0.9 would refuse to start (21.6 GiB > 21.5 free)
    assert share(int(21.5 * GiB), 24 * GiB) == pytest.approx((21.5 - 1.2) / 24, abs=1e-4)
    assert share(10 * GiB, 16 * GiB, reserve_bytes=2 * GiB) == 0.5
    with pytest.raises(ValueError, match="vllm_memory_fraction: only 1.5 of 16.0 GiB is free"):
        share(int(1.5 * GiB), 16 * GiB)
    with pytest.raises(ValueError, match="not a valid reading"):
        share(5, 4)


def test_truncate_to_topk_keeps_the_topk_and_the_token():
    logits = torch.randn(5, 64) * 3
    tokens = torch.tensor([0, 1, 2, 3, 4])
    trunc = truncate_to_topk(logits, 4, tokens)
    kept = torch.isfinite(trunc)
    assert kept.sum(1).tolist() == [4 + int(t not in logits[i].topk(4).indices) for i, t in enumerate(tokens.tolist())]
    assert torch.equal(trunc.argmax(1), logits.argmax(1))
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(trunc[kept], full[kept])  # the kept values are the exact log-probs


def test_topk_to_logits_places_every_entry():
    scored = [ScoredPositions(ids=[[3, 7], [1]], logprobs=[[-0.1, -2.5], [-0.01]]),
              ScoredPositions(ids=[[63]], logprobs=[[-0.3]])]
    logits = topk_to_logits(scored, 64)
    assert logits.shape == (3, 64) and logits.dtype == torch.float32
    assert logits[0, 3] == pytest.approx(-0.1) and logits[0, 7] == pytest.approx(-2.5)
    assert logits[1, 1] == pytest.approx(-0.01) and logits[2, 63] == pytest.approx(-0.3)
    assert torch.isfinite(logits).sum().item() == 4


def test_count_params_matches_the_loaded_runner(tiny_pair_dirs):
    target = LlamaRunner.from_pretrained(tiny_pair_dirs[1], max_rows=1, max_len=32, dtype="float32")
    config = json.loads((tiny_pair_dirs[1] / "config.json").read_text())
    assert count_params(config) == target.num_params


# ------------------------------------------------------------------------------- runner bookkeeping
@pytest.mark.parametrize("policy", ["target-only", "speculative", "chow(alpha=0.3)", "chow-cut(alpha=0.3)",
                                    "quantile(tau=-1.0)", "bild"])
def test_greedy_output_equals_the_in_process_target(tiny_pair_dirs, policy):
    params = SamplingParams(max_tokens=30)
    want = local_cascade(tiny_pair_dirs).generate(PROMPTS, params, policy=policy)
    got = vllm_like_cascade(tiny_pair_dirs).generate(PROMPTS, params, policy=policy)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert g.stats.escalations == w.stats.escalations and g.stats.target_tokens == w.stats.target_tokens


def test_runner_rows_roll_back_and_refuse_bad_spans(tiny_pair_dirs):
    c = vllm_like_cascade(tiny_pair_dirs)
    runner = c.target
    logits = runner.forward_span([0, 2], [[1, 2, 3], [4]], num_logits=[2, 1])
    assert logits.shape == (3, runner.vocab_size) and runner.lengths([0, 1, 2]) == [3, 0, 1]
    runner.truncate([0], [1])
    assert runner.lengths([0]) == [1]
    with pytest.raises(ValueError, match="empty span"):
        runner.forward_span([0], [[]])
    with pytest.raises(ValueError, match="max_len"):
        runner.forward_span([1], [[1] * (runner.max_len + 1)])
    with pytest.raises(ValueError, match="cannot truncate"):
        runner.truncate([0], [5])
    runner.free([0, 2])
    assert runner.lengths([0, 2]) == [0, 0]


def test_runner_decode_loop_is_its_decodes_fed_their_argmax(tiny_pair_dirs):
    """A served target has no fused greedy loop: ``decode_loop`` (the runner contract) is its decodes."""
    runner = vllm_like_cascade(tiny_pair_dirs).target
    runner.forward_span([0, 1], [[1, 2, 3], [4, 5]], num_logits=[1, 1])
    logits, tokens = runner.decode_loop([0, 1], torch.tensor([7, 8]), 3, vocab=runner.vocab_size - 5)
    assert logits.shape == (3, 2, runner.vocab_size) and runner.lengths([0, 1]) == [6, 5]
    runner.truncate([0, 1], [3, 2])
    cur = torch.tensor([7, 8])
    for j in range(3):
        step = runner.decode(torch.tensor([0, 1]), cur)
        torch.testing.assert_close(step, logits[j])
        cur = step[:, : runner.vocab_size - 5].argmax(dim=-1)
        assert cur.tolist() == tokens[j].tolist()


# ------------------------------------------------------------------------------- target down
def test_target_down_fails_the_request_when_asked_to(tiny_pair_dirs):
    c = vllm_like_cascade(tiny_pair_dirs, down_after=0, on_target_error="fail")
    with pytest.raises(TargetUnavailable):
        c.generate(PROMPTS[:1], SamplingParams(max_tokens=10), policy="speculative")


@pytest.mark.parametrize("policy", ["speculative", "chow(alpha=0.3)", "target-only"])
def test_target_down_from_the_start_degrades_to_the_draft(tiny_pair_dirs, policy):
    params = SamplingParams(max_tokens=24)
    want = local_cascade(tiny_pair_dirs).generate(PROMPTS, params, policy="draft-only")
    got = vllm_like_cascade(tiny_pair_dirs, down_after=0, on_target_error="draft-only").generate(PROMPTS, params, policy=policy)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert g.stats.target_errors >= 1 and g.stats.escalations == 0 and g.stats.target_tokens == 0


def test_target_going_down_midway_finishes_every_request(tiny_pair_dirs):
    params = SamplingParams(max_tokens=30)
    full = local_cascade(tiny_pair_dirs).generate(PROMPTS, params, policy="speculative")
    c = vllm_like_cascade(tiny_pair_dirs, down_after=3, on_target_error="draft-only")
    got = c.generate(PROMPTS, params, policy="speculative")
    for f, g in zip(full, got):
        assert len(g.token_ids) == 30 and g.stats.target_errors >= 1
        assert g.stats.escalations == 3  # verified rounds before the target went down
        n_verified = g.stats.accepted_tokens + g.stats.bonus_tokens + g.stats.replaced_tokens
        assert g.token_ids[:n_verified] == f.token_ids[:n_verified]  # lossless up to the outage


# ------------------------------------------------------------------------------- the remote client
class _Handler(http.server.BaseHTTPRequestHandler):
    mode = "ok"  # ok | slow | error500 | error400
    posts = 0

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"data": [{"id": "m", "max_model_len": 128}]})

    def do_POST(self):
        type(self).posts += 1
        type(self).auth = self.headers.get("Authorization")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.mode == "slow":
            time.sleep(1.5)
        if self.mode == "error500":
            return self._send(500, {"error": {"message": "boom"}})
        if self.mode == "error400":
            return self._send(400, {"error": {"message": "bad prompt_logprobs"}})
        choices = []
        for i, p in enumerate(body["prompt"]):
            prompt_lps = [None] + [{str(t): {"logprob": -0.5, "rank": 1}} for t in p[1:]]
            choices.append({"index": i, "prompt_logprobs": prompt_lps,
                            "logprobs": {"top_logprobs": [{"token_id:7": -0.1, "token_id:9": -2.4}]}})
        self._send(200, {"choices": choices})


def _start_fake():
    handler = type("H", (_Handler,), {"mode": "ok", "posts": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", handler


@pytest.fixture()
def fake_vllm():
    server, url, handler = _start_fake()
    yield url, handler
    server.shutdown()


@pytest.fixture()
def two_replicas():
    servers = [_start_fake() for _ in range(2)]
    yield [(url, handler) for _, url, handler in servers]
    for server, _, _ in servers:
        server.shutdown()


def test_replicas_share_passes_and_fail_over(two_replicas):
    (url_a, a), (url_b, b) = two_replicas
    backend = RemoteVLLM([url_a, url_b], policy=RemotePolicy(timeout_s=5, retries=2, backoff_s=0.0, cooldown_s=60))
    for _ in range(4):
        backend.score([[1, 2]], [1], 2)
    assert (a.posts, b.posts) == (2, 2)  # round-robin
    a.mode = "error500"
    for _ in range(4):  # every pass still succeeds: a fails once, then is skipped during its cooldown
        [scored] = backend.score([[1, 2, 3]], [2], 2)
        assert scored.ids[-1] == [7, 9]
    assert a.posts == 3 and b.posts == 6
    b.mode = "error500"
    with pytest.raises(TargetUnavailable):
        backend.score([[1, 2]], [1], 2)
    with pytest.raises(TargetUnavailable, match="marked down"):
        backend.score([[1, 2]], [1], 2)


def test_remote_client_parses_the_openai_answer(fake_vllm):
    url, _ = fake_vllm
    backend = RemoteVLLM(url + "/v1")
    assert backend.model == "m" and backend.max_len == 128
    [scored] = backend.score([[5, 6, 8]], [3], 2)
    assert scored.ids == [[6], [8], [7, 9]] and scored.logprobs[2] == [-0.1, -2.4]


def test_the_target_api_key_goes_on_every_call(fake_vllm):
    from cascade.models.vllm import VLLMTargetOptions, remote_target

    url, handler = fake_vllm
    runner = remote_target(url, vocab_size=64, options=VLLMTargetOptions(api_key="sekret"))
    runner.backend.score([[5, 6, 8]], [3], 2)
    assert handler.auth == "Bearer sekret"


def test_remote_client_times_out_retries_then_cools_down(fake_vllm):
    url, handler = fake_vllm
    backend = RemoteVLLM(url, policy=RemotePolicy(timeout_s=0.3, retries=1, backoff_s=0.0, cooldown_s=60))
    handler.mode = "slow"
    t0 = time.monotonic()
    with pytest.raises(TargetUnavailable, match="after 2 tries"):
        backend.score([[1, 2]], [1], 2)
    assert time.monotonic() - t0 < 1.5  # bounded by the timeouts, not by the slow server
    assert handler.posts == 2
    with pytest.raises(TargetUnavailable, match="marked down"):  # inside the cooldown: no call at all
        backend.score([[1, 2]], [1], 2)
    assert handler.posts == 2


def test_remote_client_retries_5xx_and_not_4xx(fake_vllm):
    url, handler = fake_vllm
    backend = RemoteVLLM(url, policy=RemotePolicy(timeout_s=5, retries=2, backoff_s=0.0, cooldown_s=0))
    handler.mode = "error500"
    with pytest.raises(TargetUnavailable):
        backend.score([[1, 2]], [1], 2)
    assert handler.posts == 3
    handler.mode = "error400"
    with pytest.raises(ValueError, match="HTTP 400"):
        backend.score([[1, 2]], [1], 2)
    assert handler.posts == 4


def test_remote_client_refuses_a_dead_url_and_an_unknown_model(fake_vllm):
    with pytest.raises(TargetUnavailable):
        RemoteVLLM("http://127.0.0.1:9", policy=RemotePolicy(timeout_s=1, retries=0))
    with pytest.raises(ValueError, match="target_url"):
        RemoteVLLM("ftp://x")
    with pytest.raises(ValueError, match="target_model"):
        RemoteVLLM(fake_vllm[0], model="other")


# ------------------------------------------------------------------------------- the server, target down
@pytest.mark.parametrize("mode", ["fail", "draft-only"])
def test_server_with_the_target_down(tiny_pair_dirs, mode):
    c = vllm_like_cascade(tiny_pair_dirs, down_after=0, on_target_error=mode, tokenizer=CharTokenizer(), max_rows=2)
    server = start_server(c, default_policy="speculative", default_max_tokens=8)
    try:
        body = {"model": "cascade", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
        r = httpx2.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        if mode == "fail":
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "target_unavailable"
        else:
            assert r.status_code == 200
            usage = r.json()["usage"]
            assert usage["completion_tokens"] == 8 and usage["cascade"]["target_errors"] >= 1
        m = server.metrics()
        assert m["cascade_active_rows"] == 0  # nothing held after a failed or degraded request
        assert m["cascade_target_errors_total"] >= 1
        assert httpx2.get(server.url + "/health").json()["status"] == "ok"
    finally:
        server.stop()


@pytest.mark.parametrize("policy", ["bild(fallback=0.99)", "chow-cut(alpha=0.6)"])
def test_target_down_with_a_block_cut_to_nothing_still_progresses_on_the_draft(tiny_pair_dirs, policy):
    """A block its policy cuts to 0 tokens waits for the target's token; with the target down and
    draft-only fallback, the drafted block stands instead (before: the same first token was drafted and cut
    again every round, and the request never moved)."""
    c = vllm_like_cascade(tiny_pair_dirs, down_after=0, on_target_error="draft-only")
    for i, p in enumerate(PROMPTS):
        c.engine.add_request(f"r{i}", p, SamplingParams(max_tokens=20), parse_policy(policy))
    for _ in range(60):  # 20 tokens need at most 20 rounds; a stuck request would spin here
        c.engine.step()
        if not c.engine.has_work():
            break
    assert not c.engine.has_work(), "a request made no progress while the target was down"


def test_a_cut_block_with_the_target_down_emits_the_drafts_tokens(tiny_pair_dirs):
    params = SamplingParams(max_tokens=20)
    want = local_cascade(tiny_pair_dirs).generate(PROMPTS, params, policy="draft-only")
    got = vllm_like_cascade(tiny_pair_dirs, down_after=0, on_target_error="draft-only").generate(
        PROMPTS, params, policy="chow-cut(alpha=0.6)")
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(g.stats.target_errors >= 1 for g in got)
