"""A client nobody here wrote: lm-evaluation-harness runs a small GSM8K task from a local JSON file against
``cascade serve`` (the real server on 127.0.0.1, the real default pair) through ``local-completions`` and
``local-chat-completions``, and its answers and score equal what ``cascade bench``'s real runs give on the
same problems with the same policy.

The task is the bench's own GSM8K prompt (system + user turn, stop strings, token limit) and its scorer
(``cascade.bench.scoring``), so any difference is a difference in what the server answered: a stop string,
a token limit, a chat template or a field lm-eval sends that the server handled differently."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest

pytestmark = pytest.mark.real_pair

POLICY = "speculative"
N_PROBLEMS, MAX_TOKENS = 3, 96


@pytest.fixture(scope="module")
def problems():
    from cascade.bench.datasets import load_gsm8k, select

    return [dataclasses.replace(p, max_tokens=MAX_TOKENS) for p in select(load_gsm8k(), N_PROBLEMS, seed=0)]


@pytest.fixture(scope="module")
def pair():
    from cascade import Cascade

    try:
        # one row: the server (lm-eval sends one request at a time) and the bench's runs both decode at batch 1
        return Cascade.from_pretrained(max_rows=1, max_len=1024, dtype="float32", device="cpu")
    except FileNotFoundError:
        pytest.skip("the default pair is not fetched (cascade fetch-models)")


def _task_dir(tmp_path, problems, tokenizer) -> str:
    """A task directory lm-eval includes: the problems as JSONL, a YAML per route, the bench's scorer."""
    rows = []
    for p in problems:
        chat = p.as_chat()
        rows.append({"problem_id": p.problem_id, "answer": p.reference_dict()["answer"], "user": chat[-1]["content"],
                     "prompt_text": tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)})
    data = tmp_path / "gsm8k_cascade.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "utils.py").write_text(textwrap.dedent('''
        from cascade.bench.datasets import math_problem
        from cascade.bench.scoring import score

        def process_results(doc, results):
            return {"acc": float(score(math_problem("gsm8k", doc["problem_id"], "", doc["answer"]), results[0]).correct)}
    '''))
    stops = json.dumps(list(problems[0].stop))
    for name, text in (("gsm8k_cascade_text", "{{prompt_text}}"), ("gsm8k_cascade_chat", "{{user}}")):
        (tmp_path / f"{name}.yaml").write_text(textwrap.dedent(f"""
            task: {name}
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data}
            test_split: test
            output_type: generate_until
            doc_to_text: "{text}"
            doc_to_target: "{{{{answer}}}}"
            target_delimiter: ""
            generation_kwargs:
              until: {stops}
              max_gen_toks: {MAX_TOKENS}
              do_sample: false
              temperature: 0
            process_results: !function utils.process_results
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
        """))
    return str(tmp_path)


def test_lm_eval_against_the_server_scores_as_cascade_bench(tmp_path, problems, pair, monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # the task's data is a local file: nothing to fetch
        monkeypatch.setenv(var, "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from cascade.bench.runs import PolicyRunner, RunCache
    from cascade.bench.datasets import SYSTEM_PROMPT
    from test_server import start_server

    include = _task_dir(tmp_path, problems, pair.tokenizer)
    server = start_server(pair, default_policy=POLICY, default_max_tokens=MAX_TOKENS)
    try:
        out = {}
        for model, task, extra in (
            ("local-completions", "gsm8k_cascade_text",
             dict(model_args=f"model=cascade:{POLICY},base_url={server.url}/v1/completions,tokenized_requests=False,tokenizer_backend=None,"
                             "num_concurrent=1,max_retries=1")),
            ("local-chat-completions", "gsm8k_cascade_chat",
             dict(model_args=f"model=cascade:{POLICY},base_url={server.url}/v1/chat/completions,num_concurrent=1,"
                             "max_retries=1", apply_chat_template=True, system_instruction=SYSTEM_PROMPT)),
        ):
            res = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=TaskManager(include_path=include),
                                          log_samples=True, **extra)
            samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
            out[model] = (res["results"][task]["acc,none"], [s["resps"][0][0] for s in samples])
    finally:
        server.stop()

    records, _ = PolicyRunner(pair, RunCache(tmp_path / "bench-cache"), "lm-eval-test").run(POLICY, problems, progress=False)
    bench_score = sum(r.correct for r in records) / len(records)
    assert all(r.text for r in records) and len(records) == N_PROBLEMS
    for model, (score, texts) in out.items():
        assert texts == [r.text for r in records], model  # the very answers cascade bench got
        assert score == pytest.approx(bench_score), model
