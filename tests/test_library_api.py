"""The library's vLLM-shaped surface: ``generate(prompts, sampling_params=...)`` with ``n`` choices in
``outputs``, vLLM's prompt dicts, ``chat``, and vLLM's conventions in ``SamplingParams`` (``top_k=-1``)."""

from __future__ import annotations

import pytest

from cascade import SamplingParams
from test_engine import PROMPTS, make_cascade
from test_server import tiny_cascade


@pytest.fixture(scope="module")
def cascade(tiny_pair_dirs):
    return make_cascade(tiny_pair_dirs, max_rows=4)


def test_n_choices_come_back_in_outputs_seeded_per_choice(cascade):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=4, n=3)
    results = cascade.generate(PROMPTS[:2], sampling_params=params, policy="speculative")
    assert len(results) == 2
    for prompt, r in zip(PROMPTS[:2], results):
        assert len(r.outputs) == 3 and r.outputs[0] is r and [o.index for o in r.outputs] == [0, 1, 2]
        for j, o in enumerate(r.outputs):
            [alone] = cascade.generate([prompt], SamplingParams(max_tokens=10, temperature=1.0, seed=4 + j), policy="speculative")
            assert o.token_ids == alone.token_ids and o.prompt_token_ids == prompt
        assert len({tuple(o.token_ids) for o in r.outputs}) > 1  # different draws
        assert r.cumulative_logprob == pytest.approx(sum(r.token_logprobs))


def test_greedy_choices_are_equal_and_n_1_is_the_plain_call(cascade):
    [r] = cascade.generate([PROMPTS[0]], sampling_params=SamplingParams(max_tokens=8, n=2), policy="chow(alpha=0.3)")
    assert r.outputs[0].token_ids == r.outputs[1].token_ids
    [plain] = cascade.generate([PROMPTS[0]], SamplingParams(max_tokens=8), policy="chow(alpha=0.3)")
    assert plain.outputs == [plain] and plain.token_ids == r.token_ids


def test_vllm_prompt_dicts(cascade):
    a = cascade.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=6), policy="speculative")
    b = cascade.generate(PROMPTS, SamplingParams(max_tokens=6), policy="speculative")
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    [one] = cascade.generate({"prompt_token_ids": PROMPTS[1]}, SamplingParams(max_tokens=6), policy="speculative")
    assert one.token_ids == b[1].token_ids
    with pytest.raises(ValueError, match="prompt"):
        cascade.generate({"text": "x"}, SamplingParams(max_tokens=2))


def test_chat_takes_one_conversation_or_many(tiny_pair_dirs):
    c = tiny_cascade(tiny_pair_dirs)
    conv = [{"role": "user", "content": "add two numbers"}]
    [r] = c.chat(conv, SamplingParams(max_tokens=6), policy="speculative")
    [g] = c.generate(conv, SamplingParams(max_tokens=6), policy="speculative")
    assert r.text == g.text
    assert [x.text for x in c.chat([conv, conv], SamplingParams(max_tokens=6), policy="speculative")] == [g.text, g.text]
    [d] = c.generate({"prompt": "def f():"}, SamplingParams(max_tokens=4), policy="speculative")
    [e] = c.generate("def f():", SamplingParams(max_tokens=4), policy="speculative")
    assert d.text == e.text


def test_vllm_conventions_and_errors(cascade):
    assert SamplingParams(top_k=-1).top_k == 0
    with pytest.raises(ValueError, match="n must"):
        SamplingParams(n=0)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1  # the largest seed a torch.Generator takes
    assert SamplingParams(seed=2**64 - 3, n=3).choice(2).seed == 2**64 - 1
    for bad in (dict(seed=2**64), dict(seed=2**64 - 2, n=3), dict(seed=-1), dict(seed=True), dict(seed=1.5)):
        with pytest.raises(ValueError, match="seed must"):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="sampling_params"):
        cascade.generate(PROMPTS[:1], SamplingParams(), sampling_params=SamplingParams())
