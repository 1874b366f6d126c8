"""Faults under load: a cascade front end over two target replicas, one killed with SIGKILL mid-load and
restarted, and what became of every request.

The replicas are ``cascade target-serve`` processes on 127.0.0.1 (the project's runner, or vLLM with
``--vllm``); the front end is ``cascade serve --target-url A --target-url B`` (started here, or ``--url``).
Concurrent streamed greedy chat requests of mixed policies go through the real ``openai`` client. Once a
every request is streaming (``--kill-fraction``), replica A gets SIGKILL; it is restarted on the same port
``--restart-after`` seconds later. After the load, and after the front end's cool-down, a second wave shows
whether A is used again (its fresh process counts the verify calls it served).

Per request: whether it finished, failed, or finished degraded (with ``--on-target-error draft-only``, the
passes that found no target counted in its usage), its text against a fault-free run of the same request,
its latency and time to first token. Summary: requests, failed, degraded, equal to fault-free, max latency,
the front end's cache rows in use afterwards (``/metrics``), A's verify calls after its restart.

    .venv/bin/python benchmarks/fault_soak.py                    # default pair, 16 requests, both replicas on the runner
    .venv/bin/python benchmarks/fault_soak.py --kill-both --on-target-error draft-only

The test suite runs the same driver on the tiny pair (``tests/test_fault_soak.py``), front end in-process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

POLICIES = ["speculative", "target-only", "chow(alpha=0.3)", "takeover"]
LOSSLESS = ("speculative", "target-only")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None, timeout_s: float, path: str = "/health") -> None:
    import httpx2

    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with code {proc.returncode}")
        try:
            if httpx2.get(url + path, timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up in {timeout_s:.0f} s")
        time.sleep(0.25)


class Replica:
    """One ``cascade target-serve`` process on a fixed port, that can be killed and started again."""

    def __init__(self, args: list[str], port: int | None = None, log_dir: Path | None = None, name: str = "replica") -> None:
        self.args, self.port, self.name = list(args), port or free_port(), name
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"fault_soak_{name}_{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 600) -> None:
        cmd = [sys.executable, "-m", "cascade.cli", "target-serve", "--port", str(self.port), "--log-level", "warning",
               *self.args]
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        wait_http(self.url, self.proc, timeout_s, "/v1/models")

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye, connections in flight reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def verify_calls(self) -> float:
        """Verify calls this process has served (its /metrics)."""
        import httpx2

        for line in httpx2.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("cascade_target_verify_calls_total"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@dataclass
class Outcome:
    """One request's fate."""

    index: int
    policy: str
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    target_errors: int = 0
    completion_tokens: int = 0

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def degraded(self) -> bool:
        return not self.failed and self.target_errors > 0


def one_request(client, index: int, prompt: str, policy: str, max_tokens: int, on_chunk) -> Outcome:
    """One streamed greedy chat request through the openai client; ``on_chunk(index)`` after each text chunk."""
    out = Outcome(index=index, policy=policy)
    t0 = time.perf_counter()
    try:
        stream = client.chat.completions.create(
            model="cascade", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"cascade": {"policy": policy}})
        parts = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - t0
                parts.append(chunk.choices[0].delta.content)
                on_chunk(index)
            if chunk.choices and chunk.choices[0].finish_reason:
                out.finish_reason = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                out.completion_tokens = chunk.usage.completion_tokens
                out.target_errors = int((chunk.usage.model_extra.get("cascade") or {}).get("target_errors", 0))
        out.text = "".join(parts)
    except Exception as exc:  # noqa: BLE001 -- a failed request is an outcome, not a crash of the soak
        out.error = f"{type(exc).__name__}: {exc}"
    out.latency_s = time.perf_counter() - t0
    return out


@dataclass
class SoakResult:
    outcomes: list[Outcome]
    killed_at_s: float | None = None
    restarted_at_s: float | None = None
    wall_s: float = 0.0
    rows_in_use_after: float | None = None
    rows_free_after: float | None = None
    restarted_replica_calls_after: float | None = None
    second_wave: list[Outcome] = field(default_factory=list)

    def summary(self, reference: dict[int, str] | None = None) -> dict:
        done = [o for o in self.outcomes if not o.failed]
        equal = [o for o in done if reference is not None and reference.get(o.index) == o.text]
        return {"requests": len(self.outcomes), "failed": sum(o.failed for o in self.outcomes),
                "degraded": sum(o.degraded for o in self.outcomes),
                "equal_to_fault_free": len(equal) if reference is not None else None,
                "lossless_equal_to_fault_free": (sum(o.policy in LOSSLESS for o in equal) if reference is not None
                                                 else None),
                "lossless_requests": sum(o.policy in LOSSLESS for o in self.outcomes),
                "max_latency_s": max((o.latency_s for o in self.outcomes), default=0.0),
                "max_ttft_s": max((o.ttft_s or 0.0 for o in self.outcomes), default=0.0),
                "killed_at_s": self.killed_at_s, "restarted_at_s": self.restarted_at_s, "wall_s": self.wall_s,
                "rows_in_use_after": self.rows_in_use_after, "rows_free_after": self.rows_free_after,
                "restarted_replica_verify_calls_after": self.restarted_replica_calls_after,
                "second_wave_failed": sum(o.failed for o in self.second_wave)}


def front_metrics(url: str) -> dict[str, float]:
    import httpx2

    out = {}
    for line in httpx2.get(url + "/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def wait_idle(url: str, timeout_s: float = 60) -> dict[str, float]:
    """The front end's metrics once no row is in use (or when the timeout passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = front_metrics(url)
        if m.get("cascade_active_rows", 0) == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def run_soak(front_url: str, requests: list[tuple[str, str]], max_tokens: int, victims: list[Replica], *,
             kill_fraction: float = 1.0, restart_after_s: float | None = 2.0, cooldown_s: float = 0.0,
             second_wave: int = 4, request_timeout_s: float = 300, progress=None) -> SoakResult:
    """Send ``requests`` ((prompt, policy) pairs) all at once; once ``kill_fraction`` of them are streaming
    (have their first text; 1.0: all of them, so every request is mid-answer), SIGKILL every replica in
    ``victims``, restart them ``restart_after_s`` later (None: never). After the load, wait out ``cooldown_s``
    and send ``second_wave`` requests."""
    import openai

    client = openai.OpenAI(base_url=front_url + "/v1", api_key="unused", max_retries=0, timeout=request_timeout_s)
    streaming: set[int] = set()
    lock, trigger = threading.Lock(), threading.Event()
    result = SoakResult(outcomes=[])
    t0 = time.perf_counter()

    def on_chunk(index: int) -> None:
        with lock:
            streaming.add(index)
            if len(streaming) >= kill_fraction * len(requests):
                trigger.set()

    def saboteur() -> None:
        trigger.wait()
        for v in victims:
            v.kill()
        result.killed_at_s = time.perf_counter() - t0
        if progress:
            progress(f"killed {', '.join(v.name for v in victims)} at {result.killed_at_s:.1f} s")
        if restart_after_s is None:
            return
        time.sleep(restart_after_s)
        for v in victims:
            v.start()
        result.restarted_at_s = time.perf_counter() - t0
        if progress:
            progress(f"restarted {', '.join(v.name for v in victims)} at {result.restarted_at_s:.1f} s")

    sab = threading.Thread(target=saboteur, daemon=True)
    sab.start()
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(one_request, client, i, p, pol, max_tokens, on_chunk) for i, (p, pol) in enumerate(requests)]
        for fut in concurrent.futures.as_completed(futures, timeout=request_timeout_s * 2):
            result.outcomes.append(fut.result())
    trigger.set()  # a load too short to reach the threshold still kills, so the rest of the run is checked
    sab.join(timeout=900)
    result.wall_s = time.perf_counter() - t0
    result.outcomes.sort(key=lambda o: o.index)
    idle = wait_idle(front_url)
    result.rows_in_use_after = idle.get("cascade_active_rows")
    result.rows_free_after = idle.get("cascade_kv_rows_free")
    if restart_after_s is not None and second_wave:
        time.sleep(cooldown_s)
        with concurrent.futures.ThreadPoolExecutor(second_wave) as pool:
            result.second_wave = list(pool.map(lambda r: one_request(client, -1, r[0], r[1], max_tokens, lambda i: None),
                                               requests[:second_wave]))
        result.restarted_replica_calls_after = sum(v.verify_calls() for v in victims)
    return result


def plot(result: SoakResult, path: Path, title: str) -> None:
    """Each request's latency and time to first token, coloured by its fate, with the kill and the restart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colour = {"ok": "tab:green", "degraded": "tab:orange", "failed": "tab:red"}
    for o in result.outcomes:
        fate = "failed" if o.failed else "degraded" if o.degraded else "ok"
        ax.barh(o.index, o.latency_s, color=colour[fate], alpha=0.8)
        if o.ttft_s is not None:
            ax.plot(o.ttft_s, o.index, "k|", markersize=10)
    for at, label in ((result.killed_at_s, "SIGKILL"), (result.restarted_at_s, "restarted")):
        if at is not None:
            ax.axvline(at, color="k", linestyle="--" if label == "SIGKILL" else ":")
            ax.text(at, len(result.outcomes) - 0.5, f" {label}", va="top")
    ax.set_xlabel("seconds since the load started (bar: latency; tick: first token)")
    ax.set_ylabel("request")
    ax.set_yticks([o.index for o in result.outcomes], [f"{o.index} {o.policy}" for o in result.outcomes], fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colour.values()]
    ax.legend(handles, list(colour), loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mixed_requests(prompts: list[str], n: int, policies: list[str] = POLICIES) -> list[tuple[str, str]]:
    """n (prompt, policy) pairs cycling through both lists."""
    return [(prompts[i % len(prompts)], policies[i % len(policies)]) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    from machine import machine_info
    from prompts import PROMPTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16, help="concurrent streamed requests (default: 16)")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per request (default: 48)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="policies, cycled over the requests")
    ap.add_argument("--target", default=None, help="target checkpoint dir or name (default: the default pair's)")
    ap.add_argument("--draft", default=None, help="draft checkpoint dir or name (default: the default pair's)")
    ap.add_argument("--vllm", action="store_true", help="replicas on vLLM (cascade target-serve --target vllm:DIR)")
    ap.add_argument("--dtype", default="float32", help="dtype of the front end and the replicas (default: float32)")
    ap.add_argument("--max-len", type=int, default=1024, help="positions per sequence (default: 1024)")
    ap.add_argument("--on-target-error", default="fail", choices=["fail", "draft-only"],
                    help="the front end's --on-target-error (default: fail)")
    ap.add_argument("--kill-both", action="store_true", help="kill both replicas, not one (with draft-only: degraded)")
    ap.add_argument("--kill-fraction", type=float, default=1.0,
                    help="kill once this share of the requests are streaming (default: 1.0, all of them)")
    ap.add_argument("--restart-after", type=float, default=5.0, help="seconds between the kill and the restart")
    ap.add_argument("--cooldown", type=float, default=5.0, help="the front end's --target-cooldown (default: 5)")
    ap.add_argument("--timeout", type=float, default=60.0, help="the front end's --target-timeout (default: 60)")
    ap.add_argument("--logprobs", type=int, default=20,
                    help="top-k log-probs per verified position (exact for greedy speculative / target-only / chow / "
                         "takeover); -1: whole rows, exact for every policy, but V floats a position on the wire")
    ap.add_argument("--no-reference", action="store_true", help="skip the fault-free run (no equality column)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    ap.add_argument("--tag", default="fault_soak", help="file name stem for the outputs")
    args = ap.parse_args(argv)

    from cascade.models.factory import resolve_pair
    from cascade.policies import split_policy_specs

    policies = split_policy_specs(args.policies)
    draft_dir, target_dir = resolve_pair(args.draft, args.target)
    target_arg = f"vllm:{target_dir}" if args.vllm else str(target_dir)
    rows = max(16, args.requests)
    replica_args = ["--target", target_arg, "--max-len", str(args.max_len), "--dtype", args.dtype, "--max-rows", str(rows),
                    "--max-logprobs", str(args.logprobs)]
    if args.vllm:
        replica_args += ["--vllm-memory-fraction", "0.15", "--", "--skip-tokenizer-init"]
    log = lambda msg: print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    replicas = [Replica(replica_args, name=n) for n in ("A", "B")]
    front = None
    try:
        for r in replicas:
            log(f"starting replica {r.name} on {r.url}")
            r.start()
        port = free_port()
        front_url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "cascade.cli", "serve", "--port", str(port), "--max-rows", str(args.requests),
               "--max-len", str(args.max_len), "--dtype", args.dtype, "--draft", str(draft_dir), "--target", str(target_dir),
               "--target-logprobs", str(args.logprobs), "--on-target-error", args.on_target_error, "--fixed-k",
               "--target-cooldown", str(args.cooldown), "--target-timeout", str(args.timeout), "--log-level", "warning"]
        for r in replicas:
            cmd += ["--target-url", r.url]
        log("starting the front end: " + " ".join(cmd))
        front = subprocess.Popen(cmd)
        wait_http(front_url, front, 900)
        requests = mixed_requests(PROMPTS, args.requests, policies)
        reference = None
        if not args.no_reference:
            log("fault-free run")
            clean = run_soak(front_url, requests, args.max_tokens, [], restart_after_s=None, second_wave=0)
            reference = {o.index: o.text for o in clean.outcomes if not o.failed}
        log(f"soak: {len(requests)} requests, killing {'both replicas' if args.kill_both else 'replica A'}")
        victims = replicas if args.kill_both else replicas[:1]
        result = run_soak(front_url, requests, args.max_tokens, victims, kill_fraction=args.kill_fraction,
                          restart_after_s=args.restart_after,
                          cooldown_s=args.cooldown, progress=log)
    finally:
        if front is not None:
            front.terminate()
            front.wait(timeout=120)
        for r in replicas:
            r.stop()
    summary = result.summary(reference)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{args.tag}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(asdict(result.outcomes[0])) + ["equal_to_fault_free"])
        w.writeheader()
        for o in result.outcomes:
            w.writerow({**asdict(o), "equal_to_fault_free": None if reference is None else reference.get(o.index) == o.text})
    info = {**machine_info(), "summary": summary, "config": vars(args), "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")}
    plot(result, out / f"{args.tag}.png", f"{info['cpu']} · {len(requests)} streamed requests · "
         f"{'both replicas' if args.kill_both else 'replica A'} SIGKILLed · on_target_error={args.on_target_error}")
    (out / f"{args.tag}_machine.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if summary["failed"] == 0 or args.on_target_error == "fail" and args.kill_both else 1


if __name__ == "__main__":
    raise SystemExit(main())
