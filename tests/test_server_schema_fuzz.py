"""A fuzz of ``cascade serve`` driven by its own OpenAPI schema (Schemathesis, over Hypothesis): every operation
the schema declares (the generation routes, /v1/models, /health, /metrics) gets requests that fit the schema and
requests that break it (Schemathesis's positive and negative modes: wrong types, missing fields, out-of-range
values, extra properties), sent to the real server on 127.0.0.1 (tiny pair). Seeded and bounded, so it stays
within CI's time.

Properties (issue 32): no input gives a 5xx or drops the connection; every 4xx is in OpenAI's error shape; and
afterwards every cache row is free and a normal request still succeeds. ``test_server_fuzz.py`` fuzzes the
bodies from the field names with nastier values (lone surrogates, past-64-bit integers, NaN).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra (bash scripts/setup.sh dev)")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from test_server import MESSAGES, start_server, tiny_cascade, wait_idle  # noqa: E402

EXAMPLES = 100  # per operation and generation mode (~40 s on 2 CPU cores)


@pytest.fixture(scope="module")
def fuzz_server(tiny_pair_dirs):
    server = start_server(tiny_cascade(tiny_pair_dirs), default_policy="chow(alpha=0.3)", default_max_tokens=8)
    yield server
    server.stop()


def operations(url: str):
    """(label, APIOperation) of every operation the served OpenAPI schema declares."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [(op.label, op) for op in (result.ok() for result in schema.get_all_operations())]


def test_no_input_from_the_schema_breaks_the_server(fuzz_server):
    """Each operation x {positive, negative}: EXAMPLES seeded cases (the pytest plugin's lazy schema does
    not load under this pytest, so the strategies are driven directly)."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    ops = operations(fuzz_server.url)
    labels = [label for label, _ in ops]
    assert "POST /v1/chat/completions" in labels and "POST /v1/completions" in labels, labels
    sent = {}
    for label, op in ops:
        for mode in GenerationMode:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                response = case.call(base_url=fuzz_server.url, timeout=120)
                sent[(label, mode.value)] = sent.get((label, mode.value), 0) + 1
                case.validate_response(response, checks=[not_a_server_error])
                if 400 <= response.status_code < 500:
                    body = response.json()
                    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
                    assert isinstance(body["error"]["message"], str) and body["error"]["message"]

            try:
                run()
            except Unsatisfiable:  # an operation without inputs (GET /health) has no invalid request to make
                assert mode is GenerationMode.NEGATIVE, label
    print("schema fuzz: requests per operation and mode", sent)
    assert all(sent.get((label, "positive"), 0) >= 1 for label in labels)
    for label in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert sent[(label, "positive")] >= EXAMPLES // 2 and sent[(label, "negative")] >= EXAMPLES // 2, sent


def test_the_server_is_whole_after_the_schema_fuzz(fuzz_server):
    """Runs after the fuzz (file order): no row leaked, and a normal request still gets its answer."""
    metrics = wait_idle(fuzz_server)
    assert metrics["cascade_active_rows"] == 0
    r = fuzz_server.client().chat.completions.create(model="cascade", messages=MESSAGES, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
