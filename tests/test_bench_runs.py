"""Real runs through the harness on the tiny random pair: cache hits, cache keys, resume after an
interruption, and rows released when a run is interrupted."""

from __future__ import annotations

import json

import pytest

from cascade.bench import scoring
from cascade.bench.datasets import math_problem
from cascade.bench.runs import PolicyRunner, RunCache

from test_engine import make_cascade


def _problems(n=5):
    return [math_problem("tiny", str(i), f"question {i} " + "x" * i, str(i), max_tokens=48) for i in range(n)]


@pytest.fixture()
def runner(tiny_pair_dirs, tmp_path):
    c = make_cascade(tiny_pair_dirs, max_rows=3)
    c.encode = lambda prompt: [1 + (ord(ch) % 60) for ch in str(prompt)][-40:]  # a stand-in tokenizer for the tiny vocab
    c.engine.detokenize = lambda ids: " ".join(str(i) for i in ids)  # numbers, so the math scorer has work
    return PolicyRunner(c, RunCache(tmp_path / "cache"), "tiny-pair")


def test_second_run_is_all_cache_hits(runner):
    problems = _problems()
    first, s1 = runner.run("chow(alpha=0.2)", problems, progress=False)
    assert (s1.generated, s1.cached) == (5, 0)
    again, s2 = runner.run("chow:0.2", problems, progress=False)  # same policy, other spelling
    assert (s2.generated, s2.cached) == (0, 5)
    assert [r.to_json() for r in again] == [r.to_json() for r in first]
    assert all(r.extra["token_ids"] and r.emitted_tokens == len(r.extra["token_ids"]) for r in first)
    # the answer's score is the real scorer's verdict on the real text
    assert [r.correct for r in first] == [float(scoring.score(p, r.text).correct) for p, r in zip(problems, first)]


def test_cache_key_tracks_policy_and_problem(runner):
    problems = _problems(2)
    runner.run("chow(alpha=0.2)", problems, progress=False)
    _, other_policy = runner.run("chow(alpha=0.3)", problems, progress=False)
    assert other_policy.generated == 2
    changed = [math_problem("tiny", "0", "question 0", "1", max_tokens=48)]  # same id, other reference answer
    _, other_problem = runner.run("chow(alpha=0.2)", changed, progress=False)
    assert other_problem.generated == 1


def test_interrupted_run_resumes_and_frees_rows(runner, monkeypatch):
    problems = _problems()
    calls = {"n": 0}
    real_score = scoring.score

    def flaky(problem, text):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_score(problem, text)

    monkeypatch.setattr(scoring, "score", flaky)
    with pytest.raises(KeyboardInterrupt):
        runner.run("speculative", problems, progress=False)
    engine = runner.cascade.engine
    assert not engine.has_work() and engine.scheduler.num_free_rows == engine.max_rows
    monkeypatch.setattr(scoring, "score", real_score)
    records, stats = runner.run("speculative", problems, progress=False)
    assert stats.cached == 2 and stats.generated == 3 and len(records) == 5


def test_torn_cache_file_is_recomputed(runner):
    problems = _problems(1)
    runner.run("draft-only", problems, progress=False)
    for f in runner.cache.root.rglob("*.json"):
        f.write_text("{not json")
    _, stats = runner.run("draft-only", problems, progress=False)
    assert stats.generated == 1


def test_exported_cache_resumes_a_run_elsewhere(runner, tmp_path):
    """export -> import into an empty cache: the same run there is all cache hits with identical records."""
    problems = _problems(4)
    first, _ = runner.run("chow(alpha=0.2)", problems, progress=False)
    runner.cache.put("replay-" + "0" * 64, {"tokens": [1, 2]})  # a teacher-forced path entry
    full, runs = tmp_path / "all.jsonl.gz", tmp_path / "runs.jsonl.gz"
    assert runner.cache.export(full) == 5
    assert runner.cache.export(runs, runs_only=True) == 4
    elsewhere = RunCache(tmp_path / "elsewhere")
    assert elsewhere.import_file(runs) == (4, 0)
    assert elsewhere.import_file(full) == (1, 4)  # entries already there are kept, only the path is new
    assert elsewhere.keys() == runner.cache.keys()
    moved = PolicyRunner(runner.cascade, elsewhere, "tiny-pair")
    again, stats = moved.run("chow(alpha=0.2)", problems, progress=False)
    assert (stats.generated, stats.cached) == (0, 4)
    from cascade.bench.runs import machine_label
    from cascade.machine import machine_info

    assert all(r.extra.pop("timed_on") == machine_label(machine_info()) for r in again)  # the exporter's machine
    assert [r.to_json() for r in again] == [r.to_json() for r in first]


def test_import_rejects_a_malformed_file_before_writing(tmp_path):
    import gzip

    bad = tmp_path / "bad.jsonl.gz"
    good = {"key": "a" * 64, "value": {"x": 1}}
    with gzip.open(bad, "wt") as f:
        f.write(json.dumps(good) + "\n" + json.dumps({"key": "../../etc", "value": {}}) + "\n")
    cache = RunCache(tmp_path / "c")
    with pytest.raises(ValueError, match="line 2 is not a cache entry"):
        cache.import_file(bad)
    assert cache.keys() == []  # nothing written: the good first line waits for the whole file
    with gzip.open(bad, "wt") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        cache.import_file(bad)


def test_bench_cache_cli_round_trip(tmp_path, capsys):
    from cascade.cli import main

    src = RunCache(tmp_path / "src")
    src.put("b" * 64, {"policy": "draft-only(k=5)"})
    out = tmp_path / "x.jsonl.gz"
    assert main(["bench-cache", "export", str(out), "--cache-dir", str(src.root)]) == 0
    assert main(["bench-cache", "import", str(out), "--cache-dir", str(tmp_path / "dst")]) == 0
    assert "1 entries added" in capsys.readouterr().out
    got = RunCache(tmp_path / "dst").get("b" * 64)
    assert got["policy"] == "draft-only(k=5)" and got["extra"]["timed_on"]  # tagged with the exporter's machine
    assert main(["bench-cache", "import", str(tmp_path / "missing.jsonl.gz")]) == 2  # a clear error, no traceback
    assert "does not exist" in capsys.readouterr().err


def test_report_names_the_machine_of_imported_timings(tmp_path):
    from cascade.bench.harness import BenchConfig, write_outputs

    cfg = BenchConfig(out_dir=tmp_path, tag="t", datasets=())
    md = write_outputs(cfg, {}, 1.0, "0" * 40, imported_timings=["Some CPU (AVX2, 2 threads)"])
    assert "measured on Some CPU (AVX2, 2 threads), not on this machine" in md.read_text()
    assert json.loads((tmp_path / "t_config.json").read_text())["imported_timings"] == ["Some CPU (AVX2, 2 threads)"]
    plain = write_outputs(BenchConfig(out_dir=tmp_path, tag="u", datasets=()), {}, 1.0, "0" * 40)
    assert "imported" not in plain.read_text()


def test_traced_baselines_keep_their_trace_locally_and_export_without_it(runner, tmp_path):
    """run(trace=True) keeps a baseline answer's own statistics in the record (its path then costs one
    teacher-forced pass); the export leaves them out (large, and needed only until the path exists), and
    exports only the keys asked for, byte for byte the same when nothing changed."""
    problems = _problems(3)
    draft, _ = runner.run("draft-only", problems, progress=False, trace=True)
    target, _ = runner.run("target-only", problems, progress=False, trace=True)
    for r in draft:
        t = r.extra["trace"]
        assert t["model"] == "draft" and t["tokens"][: r.emitted_tokens] == r.extra["token_ids"]
        assert len(t["max_prob"]) == len(t["margin"]) == len(t["entropy"]) == len(t["tokens"])
    for r in target:
        t = r.extra["trace"]
        assert t["model"] == "target" and t["tokens"][: r.emitted_tokens] == r.extra["token_ids"]
        assert all(len(ids) == 20 and ids[0] == tok for ids, tok in zip(t["top_ids"], t["tokens"]))  # greedy: top-1
    assert runner.cascade.engine.trace is None  # the run's own trace is gone with it
    plain, _ = runner.run("chow(alpha=0.2)", problems, progress=False, trace=True)
    assert all("trace" not in r.extra for r in plain)  # only the baselines are traced
    keys = runner.cache.keys()
    out, again = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    assert runner.cache.export(out, keys=keys[:2] + ["f" * 64]) == 2  # a missing key is skipped
    assert out.read_bytes() == (runner.cache.export(again, keys=keys[:2]) and again.read_bytes())
    elsewhere = RunCache(tmp_path / "elsewhere")
    elsewhere.import_file(out)
    assert all("trace" not in elsewhere.get(k)["extra"] for k in keys[:2])
    assert any("trace" in runner.cache.get(k)["extra"] for k in keys)  # the local cache keeps it


def test_a_problem_the_cache_cannot_hold_is_refused(runner):
    """An answer cut short by the KV cache would be cached as if it were the model's whole answer."""
    from cascade.bench.datasets import math_problem

    too_long = [math_problem("tiny", "big", "question", "1", max_tokens=200)]  # the tiny engine holds 128 positions
    with pytest.raises(ValueError, match="max_len: tiny/big needs .* the engine holds 128"):
        runner.run("draft-only", too_long, progress=False)
    assert not runner.cascade.engine.has_work()
