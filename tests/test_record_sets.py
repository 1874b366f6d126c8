"""benchmarks/record_sets.py: its chunks are nested seeded samples, and a chunk's export file is rewritten
only when its entries change."""

from __future__ import annotations

import pytest

from benchmark_scripts import import_benchmark
from cascade.bench.datasets import math_problem, select


@pytest.fixture(scope="module")
def record_sets():
    return import_benchmark("record_sets")


def test_chunks_are_the_seeded_samples_in_turn(record_sets):
    problems = [math_problem("d", str(i), f"q{i}", "1") for i in range(50)]
    parts = record_sets.sample_chunks(problems, 16, 50, seed=3)
    assert [len(p) for p in parts] == [16, 16, 16, 2]
    for j in range(1, 4):  # any prefix of chunks is exactly a seeded sample of that size
        prefix = {p.problem_id for part in parts[:j] for p in part}
        assert prefix == {p.problem_id for p in select(problems, 16 * j, seed=3)}
    for part in parts:  # the dataset's order inside a chunk
        assert [int(p.problem_id) for p in part] == sorted(int(p.problem_id) for p in part)
    assert [len(p) for p in record_sets.sample_chunks(problems, 16, 20, seed=3)] == [16, 4]  # --limit 20
    with pytest.raises(ValueError, match="--chunk"):
        record_sets.sample_chunks(problems, 0, 50, seed=3)


def test_a_chunk_file_is_rewritten_only_when_it_gains_entries(record_sets, tmp_path):
    from cascade.bench.runs import RunCache

    cache = RunCache(tmp_path / "cache")
    for k in "abc":
        cache.put(k * 64, {"policy": "draft-only(k=5)", "extra": {"trace": {"tokens": [1]}}})
    name, said = tmp_path / "x.jsonl.gz", []
    record_sets.export(cache, name, ["a" * 64, "b" * 64], said.append)
    first = name.stat().st_mtime_ns
    record_sets.export(cache, name, ["b" * 64, "a" * 64], said.append)  # the same entries: untouched
    assert name.stat().st_mtime_ns == first and len(said) == 1 and record_sets.file_keys(name) == {"a" * 64, "b" * 64}
    record_sets.export(cache, name, ["a" * 64, "b" * 64, "c" * 64], said.append)
    assert len(said) == 2 and record_sets.file_keys(name) == {k * 64 for k in "abc"}
    record_sets.export(cache, name, ["a" * 64], said.append)  # a step's fewer keys: nothing dropped, untouched
    assert len(said) == 2 and record_sets.file_keys(name) == {k * 64 for k in "abc"}


def test_export_only_takes_the_answers_and_paths_recorded_so_far(record_sets, tmp_path):
    """``--export-only`` (before a machine is given up mid-chunk): every cached answer of the chunk and the
    path of each such answer that is cached too; nothing of what is still missing."""
    from types import SimpleNamespace

    from cascade.bench.paths import path_key
    from cascade.bench.runs import RunCache, run_key, sampling_for
    from cascade.policies import parse_policy

    cache, bench = RunCache(tmp_path / "cache"), SimpleNamespace(pair_fp="fp")
    problems = [math_problem("d", str(i), f"q{i}", "1") for i in range(3)]

    def answer_key(policy, p):
        return run_key("fp", p, parse_policy(policy), sampling_for(p))

    for p in problems:  # draft answers of all three; the target answered the first only
        cache.put(answer_key("draft-only", p), {"extra": {"token_ids": [int(p.problem_id), 7]}})
    cache.put(answer_key("target-only", problems[0]), {"extra": {"token_ids": [9]}})
    cache.put(path_key("fp", problems[1].key(), "draft", [1, 7]), {"tokens": [1, 7]})  # one path so far
    keys = record_sets.recorded_keys(bench, cache, problems)
    assert set(keys) == {answer_key("draft-only", p) for p in problems} | {
        answer_key("target-only", problems[0]), path_key("fp", problems[1].key(), "draft", [1, 7])}
