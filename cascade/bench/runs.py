"""Real runs: one policy over a list of problems with a real model pair, scored, cached on disk.

A run admits every problem into the engine at once (continuous batching up to the engine's rows), with
greedy sampling and each problem's own ``max_tokens`` and stop strings, and scores each answer as soon as
it finishes. Every finished request becomes one ``RunRecord`` written to the cache at once, so an
interrupted sweep resumes where it stopped and a repeated one costs nothing.

The cache key holds everything that determines a generation: both models' fingerprints (config + weight
files), the problem (messages, stop strings, max_tokens, reference), the policy with all its parameters,
the sampling parameters and ``CACHE_VERSION`` (bump it when the engine's semantics change). Batch size is
not part of the key: greedy output does not depend on the batch (tests/test_engine.py checks it).

Time: each round's wall time is shared equally among the sequences that ran in it, so a record's
``time_share_s`` summed over a run is the run's wall time and ``sum(emitted) / sum(time_share_s)`` is the
run's throughput at that batch size. Latency, as a streaming client sees it: ``ttft_s`` runs from the start
of the request's first round (admission into the running batch; the harness queues every problem at once,
so queueing is left out) to the end of the round that first reported tokens to it (for a request-level
policy: once its answer is decided), and ``latency_s`` from the same start to the end of its last round.
``first_token`` keeps the request's counters at that first report, so the modelled-time axis can price its
time to first token (``costs.PassCosts.ttft_ms``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from cascade.config import MAX_TOP_LOGPROBS, SamplingParams
from cascade.policies import Policy, parse_policy
from cascade.trace import Trace

if TYPE_CHECKING:
    from cascade.bench.datasets import Problem
    from cascade.library import Cascade

TRACED = {"draft-only": "draft", "target-only": "target"}  # the baselines whose answers can be traced
TRANSIENT_EXTRA = ("trace",)  # record fields that live in the local cache only, never exported (large, and
#   only needed until the answer's path is recorded)
CACHE_VERSION = 2  # 2: blocks end at a drafted EOS / stop string, tokens past a stop trimmed, BiLD hand-over. Bump when a change in the engine changes what a cached generation would be


@dataclass
class RunRecord:
    """One problem answered by one policy (a real run) or simulated from recorded statistics (replay)."""

    dataset: str
    problem_id: str
    policy: str  # Policy.describe(), parameters included
    correct: float  # 1.0 / 0.0 for real runs; replay estimates may be fractional
    emitted_tokens: int
    prompt_tokens: int
    draft_tokens: int  # generated-region positions the draft processed
    draft_prefill_tokens: int
    target_tokens: int  # generated-region positions a target pass processed (catch-up included)
    target_prefill_tokens: int
    escalations: int
    target_scored_tokens: int | None = None  # None in records of runs without catch-up (see ``scored``)
    target_passes: int | None = None  # sequential target forward calls: escalations + target-only steps
    mode: str = "real"  # "real" | "replay-exact" | "replay-target-path" | "replay-estimate" | "derived"
    text: str = ""
    finish_reason: str | None = None
    score_detail: str = ""
    time_share_s: float = 0.0  # this request's share of the run's wall time (real runs only)
    wall_time_s: float = 0.0  # arrival to finish, queueing included (real runs only)
    extra: dict = field(default_factory=dict)
    ttft_s: float | None = None  # measured time to first reported token from admission (real runs; see above)
    latency_s: float | None = None  # measured admission to finish (real runs)
    first_token: dict | None = None  # the cost counters (``COUNTERS``) when the first token was reported
    target_stateless_tokens: int | None = None  # RequestStats.target_stateless_tokens (None: written before it)

    def counters(self) -> dict:
        """The record's cost counters (``COUNTERS``) over the whole answer."""
        return {name: getattr(self, name) if name != "target_passes" else self.passes for name in COUNTERS}

    @property
    def scored(self) -> int:
        """Target positions that scored a token (metrics.RequestStats.target_scored_tokens). Records written
        without the counter come from draft-only / target-only runs (or combinations of them), where every
        target position scored one."""
        return self.target_tokens if self.target_scored_tokens is None else self.target_scored_tokens

    @property
    def passes(self) -> int:
        """Sequential target forward calls (records without the counter: escalations; a target-only run's
        records always carry it)."""
        return self.escalations if self.target_passes is None else self.target_passes

    @property
    def stateless(self) -> int | None:
        """Target positions over a route without prefix reuse (``target_stateless_tokens``); for records written
        before the counter, derived where the passes say it exactly (none; or target-alone steps from the
        answer's start, pass i ending at prompt + i), else None."""
        if self.target_stateless_tokens is not None:
            return self.target_stateless_tokens
        passes = self.passes
        if passes == 0:
            return 0
        if self.escalations == 0:
            return passes * self.prompt_tokens + passes * (passes - 1) // 2
        return None

    def flops(self, draft_params: int, target_params: int) -> float:
        return 2.0 * (draft_params * (self.draft_tokens + self.draft_prefill_tokens)
                      + target_params * (self.target_tokens + self.target_prefill_tokens))

    def target_only_flops(self, target_params: int) -> float:
        """What the target alone spends on this prompt and this many emitted tokens."""
        return 2.0 * target_params * (self.prompt_tokens + self.emitted_tokens)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "RunRecord":
        return cls(**d)


COUNTERS = ("draft_tokens", "draft_prefill_tokens", "target_tokens", "target_prefill_tokens", "target_passes")


def stats_counters(stats) -> dict:
    """``COUNTERS`` of a ``metrics.RequestStats`` (target passes = escalations + target-only steps)."""
    return {"draft_tokens": stats.draft_tokens, "draft_prefill_tokens": stats.draft_prefill_tokens,
            "target_tokens": stats.target_tokens, "target_prefill_tokens": stats.target_prefill_tokens,
            "target_passes": stats.escalations + stats.target_only_steps}


def add_counters(a: dict, b: dict) -> dict:
    return {name: a[name] + b[name] for name in COUNTERS}


def first_token_counters(r: RunRecord) -> dict:
    """The record's counters at its first reported token. Records written before the harness kept them
    are baseline runs, whose first round is fixed by the policy: draft-only feeds the prompt and drafts one
    block of k (k - 1 decode steps after the prompt pass), target-only prefills the prompt in one pass."""
    if r.first_token is not None:
        return r.first_token
    policy = parse_policy(r.policy)
    zero = dict.fromkeys(COUNTERS, 0)
    if policy.name == "draft-only":
        return {**zero, "draft_tokens": max(0, policy.k - 1), "draft_prefill_tokens": r.prompt_tokens}
    if policy.name == "target-only":
        return {**zero, "target_prefill_tokens": r.prompt_tokens, "target_passes": 1}
    raise ValueError(f"record of {r.dataset}/{r.problem_id} ({r.policy}) has no first_token counters")


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of a checkpoint directory: its config and the names and sizes of its weight files."""
    path = Path(model_dir)
    h = hashlib.sha256()
    for name in ("config.json", ".cascade-source.json"):
        f = path / name
        if f.exists():
            h.update(name.encode() + f.read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def sampling_for(problem: "Problem") -> SamplingParams:
    """Greedy decoding with the problem's own length and stop strings (the same for every policy)."""
    return SamplingParams(max_tokens=problem.max_tokens, temperature=0.0, stop=tuple(problem.stop))


def run_key(pair_fingerprint: str, problem: "Problem", policy: Policy, params: SamplingParams) -> str:
    blob = json.dumps({
        "v": CACHE_VERSION, "pair": pair_fingerprint, "problem": problem.key(), "policy": policy.describe(),
        "params": [params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed,
                   list(params.stop), params.ignore_eos],
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def machine_label(info: dict) -> str:
    """A short name of a machine from ``cascade.machine.machine_info()``: CPU (capability, threads), GPU."""
    cpu = f"{info.get('cpu', 'unknown CPU')} ({info.get('cpu_capability', '?')}, {info.get('threads', '?')} threads)"
    return f"{cpu}, {info['gpu']}" if info.get("gpu") else cpu


_CACHE_KEY = re.compile(r"(replay-)?[0-9a-f]{64}")  # run_key / replay.path_key


class RunCache:
    """One JSON file per key under ``root``; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def at(cls, root: str | Path | None) -> "RunCache":
        """The cache at ``root``, default ``$CASCADE_HOME/bench-cache`` (the bench's and ``bench-cache``'s)."""
        from cascade.weights import cascade_home

        return cls(root if root is not None else cascade_home() / "bench-cache")

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a torn file from a killed writer: recompute

    def put(self, key: str, value: dict) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(value))
        tmp.replace(p)

    def keys(self) -> list[str]:
        """Every stored key, sorted (torn temp files left out)."""
        return sorted(f.stem for f in self.root.glob("*/*.json")) if self.root.exists() else []

    def export(self, path: str | Path, runs_only: bool = False, keys: Iterable[str] | None = None) -> int:
        """Write every entry (``runs_only``: real-run records, not the teacher-forced paths; ``keys``: only
        these, those present) to one gzipped JSON-lines file of ``{"key", "value"}``; returns the count.
        The keys hold both models' fingerprints (config + weight file names and sizes, not the machine), so
        the file resumes or reproduces a bench on any machine holding the same converted pair. The gzip
        header carries no time stamp and entries are sorted, so the same entries on the same machine give
        the same bytes."""
        import gzip

        from cascade.machine import machine_info

        wanted = self.keys() if keys is None else sorted(set(keys))
        n = 0
        with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz, \
                io.TextIOWrapper(gz, encoding="utf-8") as out:
            out.write(json.dumps({"meta": {"format": 1, "machine": machine_info()}}) + "\n")
            for key in wanted:
                if runs_only and key.startswith("replay-"):
                    continue
                value = self.get(key)
                if value is not None:
                    if isinstance(value.get("extra"), dict):
                        value["extra"] = {k: v for k, v in value["extra"].items() if k not in TRANSIENT_EXTRA}
                    out.write(json.dumps({"key": key, "value": value}, sort_keys=True) + "\n")
                    n += 1
        return n

    def import_file(self, path: str | Path) -> tuple[int, int]:
        """Add the entries of a file ``export`` wrote; an entry already here is kept. Returns (added,
        already here). A malformed line raises ValueError naming it, before anything is written. Each
        imported run record is tagged ``extra["timed_on"]`` with the exporting machine (from the file's
        first line), so a bench that reads it can say its timings are not this machine's."""
        import gzip

        entries, timed_on = [], "unknown machine"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {number} is not JSON ({e})") from None
                if number == 1 and isinstance(entry, dict) and "meta" in entry:
                    timed_on = machine_label(entry["meta"].get("machine") or {})
                    continue
                key = entry.get("key") if isinstance(entry, dict) else None
                if not isinstance(key, str) or not _CACHE_KEY.fullmatch(key) or not isinstance(entry.get("value"), dict):
                    raise ValueError(f"{path}: line {number} is not a cache entry (needs a \"key\" of cascade's "
                                     f"form and a \"value\" object)")
                value = entry["value"]
                if "policy" in value and isinstance(value.get("extra", {}), dict):
                    value.setdefault("extra", {}).setdefault("timed_on", timed_on)
                entries.append((key, value))
        added = 0
        for key, value in entries:
            if not self._path(key).exists():
                self.put(key, value)
                added += 1
        return added, len(entries) - added


@dataclass
class RunStats:
    """How a run went: cached vs generated requests and the generated part's throughput."""

    cached: int = 0
    generated: int = 0
    generated_tokens: int = 0
    generated_time_s: float = 0.0


class PolicyRunner:
    """Runs policies over problems on a loaded ``Cascade``, scoring and caching every answer."""

    def __init__(self, cascade: "Cascade | Callable[[], Cascade]", cache: RunCache, pair_fingerprint: str,
                 router_fingerprint: str = "none") -> None:
        self._cascade = cascade  # or a zero-argument function that loads it: called only on a cache miss
        self.cache = cache
        self.pair_fingerprint = pair_fingerprint
        self.router_fingerprint = router_fingerprint  # part of the key of policies that read the router

    @property
    def cascade(self) -> "Cascade":
        return self._cascade() if callable(self._cascade) else self._cascade

    def keys(self, policy: "str | Policy", problems: Sequence["Problem"], tag: str = "") -> list[str]:
        """The cache key of each problem's answer under ``policy`` (``tag``: a separate set of answers, e.g.
        baselines re-timed beside a real run)."""
        pol = parse_policy(policy)
        fp = self.pair_fingerprint + (f"-router-{self.router_fingerprint}" if pol.uses_router else "")
        fp += f"-{tag}" if tag else ""
        return [run_key(fp, p, pol, sampling_for(p)) for p in problems]

    def is_cached(self, policy: "str | Policy", problems: Sequence["Problem"], tag: str = "") -> bool:
        """Every problem's answer under ``policy`` is in the cache."""
        return all(self.cache.get(k) is not None for k in self.keys(policy, problems, tag))

    def run(self, policy: "str | Policy", problems: Sequence["Problem"], *, progress: bool = True,
            label: str | None = None, fresh: bool = False, trace: bool = False, tag: str = "") -> tuple[list[RunRecord], RunStats]:
        """Answer every problem with ``policy``; returns records in problem order (cached ones included).
        ``fresh``: generate even where the cache has an answer (to time a baseline in the same conditions
        as the runs it is compared with); the new records replace the cached ones. ``tag``: keep these answers
        apart from the untagged ones (``keys``). ``trace`` (draft-only and
        target-only only): keep each generated answer's own per-position statistics in the record's
        ``extra["trace"]`` (``cascade.trace``; target-only then asks for 20 top log-probs per token, which
        changes nothing it answers), so that recording its path needs one teacher-forced pass, not two."""
        from cascade.bench.scoring import score

        pol = parse_policy(policy)
        traced = TRACED.get(pol.name) if trace else None
        keys = self.keys(pol, problems, tag)
        if pol.benchmark_only:
            raise ValueError(f"policy: {pol.name} is derived by the harness from the baseline runs, not run")
        records: dict[int, RunRecord] = {}
        stats = RunStats()
        for i, key in enumerate(keys):
            hit = None if fresh else self.cache.get(key)
            if hit is not None:
                records[i] = RunRecord.from_json(hit)
                stats.cached += 1
        todo = [i for i in range(len(problems)) if i not in records]
        if todo:
            engine = self.cascade.engine
            prompts = {i: self.cascade.encode(problems[i].as_prompt()) for i in todo}
            for i, ids in prompts.items():  # an answer cut short by the cache would be cached as if complete
                if len(ids) + problems[i].max_tokens + 1 > engine.max_len:
                    raise ValueError(f"max_len: {problems[i].dataset}/{problems[i].problem_id} needs {len(ids)} prompt "
                                     f"+ {problems[i].max_tokens} answer + 1 positions, the engine holds {engine.max_len}")
            ids = {f"bench-{os.getpid()}-{time.monotonic_ns()}-{i}": i for i in todo}
            own_trace = traced is not None and engine.trace is None
            if own_trace:
                engine.trace = Trace()
            for rid, i in ids.items():
                params = sampling_for(problems[i])
                if traced == "target":
                    params = dataclasses.replace(params, logprobs=MAX_TOP_LOGPROBS)
                engine.add_request(rid, prompts[i], params, pol)
                if traced is not None:
                    engine.trace.watch(rid, traced)
            shares = {rid: 0.0 for rid in ids}
            tokens: dict[str, list[int]] = {rid: [] for rid in ids}
            timing = {rid: _Timing() for rid in ids}
            bar = _bar(progress, len(todo), label or pol.describe())
            t_run = time.perf_counter()
            try:
                while engine.has_work():
                    t0 = time.perf_counter()
                    outputs = [o for o in engine.step() if o.request_id in ids]
                    t1 = time.perf_counter()
                    dt = t1 - t0
                    for o in outputs:
                        shares[o.request_id] += dt / max(1, len(outputs))
                        tokens[o.request_id] += o.new_token_ids
                        timing[o.request_id].observe(o, t0, t1)
                    for o in outputs:
                        if not o.finished:
                            continue
                        i = ids[o.request_id]
                        s = score(problems[i], o.text)
                        rec = _record(problems[i], pol, o, s, shares[o.request_id], tokens[o.request_id],
                                      timing[o.request_id])
                        if traced is not None:
                            rec.extra["trace"] = engine.trace.pop(o.request_id)
                        self.cache.put(keys[i], rec.to_json())
                        records[i] = rec
                        stats.generated += 1
                        stats.generated_tokens += rec.emitted_tokens
                        if bar is not None:
                            bar.update(1)
                            elapsed = time.perf_counter() - t_run
                            bar.set_postfix_str(f"{stats.generated_tokens / max(elapsed, 1e-9):.1f} tok/s")
            except BaseException:
                for rid in ids:
                    engine.abort(rid)
                raise
            finally:
                if own_trace:
                    engine.trace = None
                stats.generated_time_s = time.perf_counter() - t_run
                if bar is not None:
                    bar.close()
        return [records[i] for i in range(len(problems))], stats


@dataclass
class _Timing:
    """One request's round times in a real run: admission, first reported token, finish (perf_counter)."""

    admitted: float | None = None
    first: float | None = None
    first_counters: dict | None = None
    finished: float | None = None

    def observe(self, out, round_start: float, round_end: float) -> None:
        """After each round the request was in (the engine reports every running request every round)."""
        if self.admitted is None:
            self.admitted = round_start
        if self.first is None and (out.new_token_ids or out.finished):
            self.first, self.first_counters = round_end, stats_counters(out.stats)
        if out.finished:
            self.finished = round_end


def _record(problem: "Problem", policy: Policy, out, s, share: float, token_ids: list[int],
            timing: _Timing | None = None) -> RunRecord:
    st = out.stats
    timing = timing or _Timing()
    return RunRecord(
        dataset=problem.dataset, problem_id=problem.problem_id, policy=policy.describe(),
        correct=1.0 if s.correct else 0.0, emitted_tokens=st.emitted_tokens, prompt_tokens=st.prompt_tokens,
        draft_tokens=st.draft_tokens, draft_prefill_tokens=st.draft_prefill_tokens,
        target_tokens=st.target_tokens, target_prefill_tokens=st.target_prefill_tokens,
        escalations=st.escalations, target_scored_tokens=st.target_scored_tokens,
        target_passes=st.escalations + st.target_only_steps, target_stateless_tokens=st.target_stateless_tokens,
        mode="real", text=out.text, finish_reason=out.finish_reason,
        score_detail=s.detail, time_share_s=share, wall_time_s=st.wall_time_s,
        extra={"accepted_tokens": st.accepted_tokens, "bonus_tokens": st.bonus_tokens,
               "replaced_tokens": st.replaced_tokens, "token_ids": list(token_ids)},
        ttft_s=None if timing.first is None else timing.first - timing.admitted,
        latency_s=None if timing.finished is None else timing.finished - timing.admitted,
        first_token=timing.first_counters,
    )


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True)
