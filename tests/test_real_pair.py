"""Integration tests on the real default pair (Qwen2.5-Coder 0.5B draft / 1.5B target), converted by
`cascade fetch-models` (scripts/test.sh runs it first). Skipped, with the reason, when the pair is absent."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cascade import SamplingParams

pytestmark = pytest.mark.real_pair

PROMPTS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "What is 12 * 7? Answer with the number."}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three sorting algorithms."}],
]


def _pair_dirs():
    from cascade.models.resolve import resolve_model
    from cascade.weights import DEFAULT_PAIR

    try:
        return resolve_model(DEFAULT_PAIR[0].name), resolve_model(DEFAULT_PAIR[1].name)
    except (ValueError, FileNotFoundError) as exc:
        pytest.skip(f"default pair not fetched ({exc}); run `cascade fetch-models`")


def test_fetch_models_is_idempotent_and_fast():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cascade.cli", "fetch-models"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "qwen2.5-coder-0.5b-instruct" in out.stdout and "qwen2.5-coder-1.5b-instruct" in out.stdout
    assert time.perf_counter() - t0 < 60  # a bound on "no download, no conversion", not a speed goal


def test_cli_generate_prints_answer_and_stats():
    _pair_dirs()
    out = subprocess.run([sys.executable, "-m", "cascade.cli", "generate", "What is 2 + 2? Answer with the number.",
                          "--policy", "chow", "--alpha", "0.2", "--max-tokens", "8", "--no-color"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "4" in out.stdout and "escalations" in out.stdout and "tok/s" in out.stdout
    # no policy: the shipped default, said so, with its routing decision on the stats line
    out = subprocess.run([sys.executable, "-m", "cascade.cli", "generate", "What is 2 + 2? Answer with the number.",
                          "--max-tokens", "8", "--no-color"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "COLUMNS": "300"})
    assert out.returncode == 0, out.stderr
    from cascade.defaults import default_calibration
    from cascade.policies import parse_policy

    cal = default_calibration()
    if cal is not None:
        assert "shipped calibrated default" in out.stdout
        if parse_policy(cal["policy"]).request_level:
            assert "answer kept" in out.stdout or "routed to the target" in out.stdout


TASKS = [
    {"task_id": "t/add", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
     "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"},
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "#### 7"},
    {"task_id": "t/neg", "prompt": "def neg(x):\n    \"\"\"Return -x.\"\"\"\n",
     "test": "def check(f):\n    assert f(2) == -2\n", "entry_point": "neg"},
    {"question": "A box holds 5 pens. How many pens are in 2 boxes?", "answer": "#### 10"},
]


def _task_file(tmp_path):
    import json

    path = tmp_path / "tiny_tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    return path


def test_cli_bench_end_to_end_on_a_task_file(tmp_path):
    """`cascade bench` on the real pair: real baselines, recording, replayed sweeps, a real run at the
    calibrated budget, and the CSV / Markdown / PNG outputs."""
    _pair_dirs()
    out_dir = tmp_path / "out"
    out = subprocess.run([sys.executable, "-m", "cascade.cli", "bench", "--dataset", str(_task_file(tmp_path)),
                          "--limit", "0", "--policies", "chow,quantile", "--real-check", "target:0.5", "--real-limit", "2",
                          "--out", str(out_dir), "--tag", "t", "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    md = (out_dir / "t.md").read_text()
    assert "jsonl:tiny_tasks" in md and "chow" in md and "draft-only" in md and "oracle" in md
    assert "test split (n = 2" in md and "passes_per_token" in md and "modelled_time" in md and "`ttft`" in md
    assert "## The regime" in md and "terciles of target-only answer length" in md and "What this split can detect" in md
    assert "## Replay vs real runs" in md and "TTFT s (measured / modelled)" in md
    csv_text = (out_dir / "t.csv").read_text()
    assert csv_text.count("\n") > 10 and ",replay-dev," in csv_text and ",replay-test," in csv_text
    assert ",derived-test," in csv_text and ",real," in csv_text
    assert (out_dir / "t.png").stat().st_size > 10_000


def test_cli_calibrate_prints_a_usable_policy(tmp_path):
    _pair_dirs()
    summary = tmp_path / "cal.json"
    out = subprocess.run([sys.executable, "-m", "cascade.cli", "calibrate", "--policy", "chow", "--budget", "0.3",
                          "--dataset", str(_task_file(tmp_path)), "--limit", "0", "--out", str(summary),
                          "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    from cascade.policies import parse_policy

    result = json.loads(summary.read_text())
    policy = parse_policy(result["policy"])  # the chosen value goes straight back into --policy
    assert policy.name == "chow" and result["dev"]["target_fraction"] <= 0.3 + 1e-9
    assert result["test"]["n"] == 2 and "chosen: chow(" in out.stdout
    assert result["machine"]["cpu_count"] >= 1 and "imported_timings" not in result  # a fresh cache: timed here


def test_cli_serve_answers_the_openai_client(tmp_path):
    """`cascade serve` on the default pair, started from a calibration file, answers the real openai client;
    SIGTERM drains and exits cleanly."""
    import json
    import signal
    import socket

    import httpx2
    import openai

    _pair_dirs()
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"policy": "chow(alpha=0.3)", "budget": 0.2}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", "serve", "--port", str(port), "--calibration",
                             str(cal), "--max-rows", "2", "--max-len", "512", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx2.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        messages = [{"role": "user", "content": "What is 2 + 2? Answer with the number."}]
        r = client.chat.completions.create(model="cascade", messages=messages, max_tokens=8, temperature=0)
        assert "4" in r.choices[0].message.content
        assert r.usage.model_extra["cascade"]["policy"].startswith("chow(") and r.usage.prompt_tokens > 10
        chunks = client.chat.completions.create(model="cascade", messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        comp = client.completions.create(model="cascade:speculative", prompt="def add(a, b):\n    return",
                                         max_tokens=6, temperature=0)
        assert "a + b" in comp.choices[0].text
        assert "cascade_tokens_total" in httpx2.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, proc.stdout.read()[-3000:]


# The tests below share one loaded pair; they come after the subprocess tests above so that two copies of
# the pair (about 10 GB each in fp32) are never in memory at once.
@pytest.fixture(scope="module")
def cascade():
    from cascade import Cascade

    draft, target = _pair_dirs()
    return Cascade.from_pretrained(draft, target, max_rows=3, max_len=512)


def test_the_default_pair_gets_the_shipped_default_and_another_pair_does_not(cascade, tiny_pair_dirs):
    """The shipped calibration's thresholds are the default pair's (its draft's log-probs, its costs)."""
    from cascade import Cascade
    from cascade.defaults import default_calibration

    assert cascade.default_pair
    cal = default_calibration()
    assert cascade.default_policy() == (cal["policy"] if cal is not None else "speculative")
    other = Cascade.from_pretrained(*tiny_pair_dirs, max_rows=1, max_len=64)
    assert not other.default_pair and other.default_policy() == "speculative"


def test_speculative_greedy_equals_target_only_on_the_real_pair(cascade):
    params = SamplingParams(max_tokens=12)
    target = cascade.generate(PROMPTS, params, policy="target-only")
    spec = cascade.generate(PROMPTS, params, policy="speculative")
    assert [r.token_ids for r in spec] == [r.token_ids for r in target]
    assert all(len(r.token_ids) > 0 for r in target)
    assert sum(r.stats.accepted_tokens for r in spec) > 0  # the draft is good enough to be accepted sometimes


def test_real_pair_answers_sensibly_and_chow_escalates_less(cascade):
    [r] = cascade.generate([PROMPTS[1]], SamplingParams(max_tokens=16), policy="chow(alpha=0.2)")
    assert "84" in r.text
    params = SamplingParams(max_tokens=24)
    [spec] = cascade.generate([PROMPTS[0]], params, policy="speculative")
    [chow] = cascade.generate([PROMPTS[0]], params, policy="chow(alpha=0.5)")
    [never] = cascade.generate([PROMPTS[0]], params, policy="chow(alpha=1.0)")
    assert chow.stats.target_token_fraction < spec.stats.target_token_fraction
    assert never.stats.target_tokens == 0 and never.stats.emitted_tokens == 24
