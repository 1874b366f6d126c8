"""LlamaCppRunner (cascade.models.llamacpp) on tiny GGUF files written in the test (tests/gguf_writer.py): the
runner contract's invariants against transformers on the same weights and against the torch runner (logits,
rollback by KV removal, ragged batches, rows freed, the greedy loop, calls split at n_batch, bad arguments), the
engine on a pair of GGUFs (greedy speculative == greedy target-only), names that pick llama.cpp, and the real
pair's GGUFs where ``cascade fetch-models --backend llama.cpp`` put them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from cascade import Cascade, SamplingParams  # noqa: E402
from cascade.engine import EngineConfig  # noqa: E402
from cascade.models.base import ModelRunner  # noqa: E402
from cascade.models.factory import RunnerOptions, local_runner, resolve_member  # noqa: E402
from cascade.models.gguf_dir import GGUF_FILE, is_gguf_dir, names_llamacpp  # noqa: E402
from cascade.models.llamacpp import LlamaCppRunner  # noqa: E402

import runner_contract  # noqa: E402  (tests/ is on sys.path)

VOCAB = 64  # the writer's vocabulary
TOL = 2e-5  # F32 weights, an F32 KV cache, no flash attention: llama.cpp's kernels against transformers' fp32
FA_TOL = 5e-3  # llama.cpp's CPU flash attention takes the query in f16


def make_model(kind: str = "Qwen2", seed: int = 1, **kw):
    """A tiny transformers model of ``kind`` with random weights (biases and norms too)."""
    cfg_cls, model_cls = getattr(transformers, f"{kind}Config"), getattr(transformers, f"{kind}ForCausalLM")
    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=False, rope_theta=10000.0,
                eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**base, **kw})).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.mul_(4.0)  # sharper distributions than the default init: argmax ties are not what is tested
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, its GGUF path, its safetensors checkpoint dir) for seed 1 (draft) and 2 (target)."""
    from gguf_writer import write_gguf

    out = {}
    for seed in (1, 2):
        d = tmp_path_factory.mktemp(f"tiny{seed}")
        model = make_model(seed=seed)
        model.save_pretrained(d / "hf")
        out[seed] = (model, write_gguf(model, d / f"tiny{seed}.gguf"), d / "hf")
    return out


def runner(path, **kw) -> LlamaCppRunner:
    kw.setdefault("kv_dtype", "f32")
    kw.setdefault("flash_attn", False)
    return LlamaCppRunner(path, kw.pop("max_rows", 4), kw.pop("max_len", 64), **kw)


def hf_logits(model, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].float()  # [len, V]


maxdiff = runner_contract.maxdiff


def test_logits_match_transformers_and_the_torch_runner(tiny):
    model, gguf, hf_dir = tiny[1]
    r = runner(gguf)
    assert isinstance(r, ModelRunner)
    assert r.vocab_size == VOCAB and r.num_params == sum(p.numel() for p in model.parameters())
    seq = [3, 7, 11, 2, 40, 41, 5, 9]
    got = r.forward_span([2], [seq])
    assert got.dtype == torch.float32 and got.shape == (len(seq), VOCAB)
    assert maxdiff(got, hf_logits(model, seq)) < TOL
    torch_runner = local_runner(hf_dir, RunnerOptions(max_rows=4, max_len=64, dtype="float32"))
    assert maxdiff(got, torch_runner.forward_span([0], [seq])) < TOL
    # llama.cpp's defaults (an f16 cache, flash attention where it chooses it): close, not exact
    fast = LlamaCppRunner(gguf, 2, 64)
    assert maxdiff(fast.forward_span([0], [seq]), got) < FA_TOL


def make_runner(gguf):
    """The contract's runner factory (``tests/runner_contract.py``): fresh exact-mode runners over ``gguf``."""
    return lambda **kw: runner(gguf, **kw)


def reference_of(model):
    return lambda seq: hf_logits(model, seq)


def test_rollback_is_a_kv_removal_and_equals_a_fresh_runner(tiny):
    _, gguf, _ = tiny[1]
    runner_contract.check_rollback_equals_fresh(make_runner(gguf))
    r = runner(gguf)
    r.forward_span([1], [[3, 1, 4, 1, 5, 9, 2]])
    calls = r.calls
    r.truncate([1], [4])
    assert r.calls == calls and r.lengths([1]) == [4]  # a KV removal: nothing recomputed


def test_free_then_reuse_is_clean(tiny):
    model, gguf, _ = tiny[1]
    runner_contract.check_free_then_reuse(make_runner(gguf), reference_of(model), TOL)


def test_ragged_batch_equals_each_row_alone(tiny):
    model, gguf, _ = tiny[1]
    runner_contract.check_ragged_batch(make_runner(gguf), reference_of(model), TOL, VOCAB)


def test_decode_equals_single_token_spans(tiny):
    runner_contract.check_decode_equals_single_token_spans(make_runner(tiny[1][1]))


def test_full_row_rejected(tiny):
    runner_contract.check_full_row_rejected(make_runner(tiny[1][1]))


def test_partial_logits_and_calls_split_at_n_batch(tiny):
    model, gguf, _ = tiny[1]
    small = runner(gguf, n_batch=8)
    big = runner(gguf, n_batch=512)
    spans = [list(range(1, 20)), list(range(30, 41))]
    a = small.forward_span([0, 3], spans, num_logits=[0, 4])
    b = big.forward_span([0, 3], spans, num_logits=[0, 4])
    assert a.shape == (4, VOCAB) and small.calls == 4 and big.calls == 1  # 30 tokens in calls of 8
    assert maxdiff(a, b) < 1e-5 and maxdiff(a, hf_logits(model, spans[1])[-4:]) < TOL
    assert small.forward_span([1], [[6]], num_logits=[0]).shape == (0, VOCAB)
    assert small.lengths([0, 1, 3]) == [19, 1, 11]


def test_greedy_loop_equals_decodes_fed_their_argmax(tiny):
    runner_contract.check_greedy_loop(make_runner(tiny[1][1]), vocab=60)


@pytest.mark.parametrize("call, field", runner_contract.BAD_ARGUMENTS)
def test_bad_arguments_are_named_and_change_nothing(tiny, call, field):
    runner_contract.check_bad_argument(make_runner(tiny[1][1]), call, field)


def test_bad_constructor_arguments(tiny, tmp_path):
    _, gguf, _ = tiny[1]
    for kw, field in ((dict(max_rows=0), "max_rows"), (dict(max_len=0), "max_len"),
                      (dict(threads=0), "threads"), (dict(kv_dtype="int3"), "kv_dtype"),
                      (dict(flash_attn="yes"), "flash_attn")):
        with pytest.raises(ValueError, match=field):
            runner(gguf, **kw)
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        runner(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="could not load"):
        runner(bad)


def test_a_pair_of_ggufs_is_lossless_through_the_engine(tiny):
    (_, draft, _), (target_model, target, _) = tiny[1], tiny[2]
    runners = [runner(p, max_rows=3, max_len=64) for p in (draft, target)]
    c = Cascade(*runners, None, eos_token_ids=[], config=EngineConfig(max_rows=3, max_len=64))
    prompts = [[3, 4, 5], [10, 11, 12, 13, 14], [7]]
    want = [r.token_ids for r in c.generate(prompts, SamplingParams(max_tokens=12), policy="target-only")]
    for p, w in zip(prompts, want):  # target-only on llama.cpp is the target's own greedy continuation
        seq = list(p)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(target_model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert seq[len(p):] == w
    for policy in ("speculative", "speculative(k=3)"):
        assert [r.token_ids for r in c.generate(prompts, SamplingParams(max_tokens=12), policy=policy)] == want, policy
    assert all(r.lengths([0, 1, 2]) == [0, 0, 0] for r in runners)  # rows freed after the requests


def test_a_llamacpp_draft_beside_a_torch_target_is_lossless(tiny):
    """The mixed deployment: the draft local on llama.cpp, the target on the torch runner (or vLLM, remote: the
    same ModelRunner contract). Greedy lossless output is the target's own greedy continuation."""
    (_, draft, _), (target_model, _, target_dir) = tiny[1], tiny[2]
    target = local_runner(target_dir, RunnerOptions(max_rows=2, max_len=64, dtype="float32"))
    c = Cascade(runner(draft, max_rows=2, max_len=64), target, None, eos_token_ids=[],
                config=EngineConfig(max_rows=2, max_len=64))
    prompts = [[3, 4, 5], [20, 21]]
    want = []
    for p in prompts:
        seq = list(p)
        with torch.no_grad():
            for _ in range(10):
                seq.append(int(target_model(torch.tensor([seq])).logits[0, -1].argmax()))
        want.append(seq[len(p):])
    for policy in ("speculative", "speculative(k=4)", "target-only"):
        assert [r.token_ids for r in c.generate(prompts, SamplingParams(max_tokens=10), policy=policy)] == want, policy


def test_names_pick_llamacpp_and_a_users_gguf_gets_its_directory(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))
    _, gguf, _ = tiny[1]
    assert names_llamacpp(str(gguf)) and names_llamacpp("llama.cpp:") and not names_llamacpp("qwen")
    d = resolve_member(str(gguf), 0)
    assert is_gguf_dir(d) and (d / GGUF_FILE).resolve() == gguf.resolve()
    assert resolve_member(f"llama.cpp:{gguf}", 0) == d  # described once, then reused
    assert resolve_member(f"llama.cpp:{d}", 1) == d
    assert resolve_member(str(d), 1) == d  # a GGUF model directory needs no prefix
    r = local_runner(d, RunnerOptions(max_rows=2, max_len=32))
    assert isinstance(r, LlamaCppRunner)
    from cascade.library import load_tokenizer

    tok = load_tokenizer(d)  # the tokenizer came from the GGUF's metadata, no weights were converted
    assert tok.convert_ids_to_tokens(tok.encode("ab", add_special_tokens=False)) == ["ab"]
    assert not list(d.glob("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="fetch-models --backend llama.cpp"):
        resolve_member("llama.cpp:", 0)  # the default pair's GGUF is not in this empty cache
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        resolve_member(str(tmp_path / "nope.gguf"), 0)


def test_a_gguf_pair_generates_text_through_from_pretrained(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))
    (_, draft, _), (_, target, _) = tiny[1], tiny[2]
    c = Cascade.from_pretrained(str(draft), str(target), max_rows=2, max_len=64, device="cpu")
    assert isinstance(c.engine.draft, LlamaCppRunner) and isinstance(c.engine.target, LlamaCppRunner)
    out = c.generate("ab ab", SamplingParams(max_tokens=6), policy="speculative")[0]
    assert len(out.token_ids) == 6 and isinstance(out.text, str)


@pytest.mark.real_pair
def test_real_pair_ggufs_match_the_fp32_runner_within_quantization():
    """The default pair's draft as it ships (Q4_K_M on llama.cpp) against its dequantized fp32 copy on our
    runner: same weights, so the logits agree up to llama.cpp's 8-bit activations in the quantized products."""
    from cascade.weights import DRAFT_SPEC, cached_gguf_dir, cached_model_dir, is_fetched, is_gguf_fetched

    gdir, fdir = cached_gguf_dir(DRAFT_SPEC), cached_model_dir(DRAFT_SPEC)
    if not (is_gguf_fetched(DRAFT_SPEC, gdir) and is_fetched(DRAFT_SPEC, fdir)):
        pytest.skip("needs `cascade fetch-models --backend both`")
    from cascade.library import load_tokenizer

    tok = load_tokenizer(gdir)
    assert tok.encode("def fib(n):") == load_tokenizer(fdir).encode("def fib(n):")
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that adds two numbers."}],
                                  add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    r = local_runner(gdir, RunnerOptions(max_rows=1, max_len=256))
    ref = local_runner(fdir, RunnerOptions(max_rows=1, max_len=256, dtype="float32"))
    a, b = r.forward_span([0], [ids]), ref.forward_span([0], [ids])
    assert r.vocab_size == ref.vocab_size and r.num_params == DRAFT_SPEC.num_parameters
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item() > 0.99


def test_cascade_generate_runs_a_gguf_pair_from_the_command_line(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))
    from cascade.cli import main

    (_, draft, _), (_, target, _) = tiny[1], tiny[2]
    args = ["generate", "ab ab", "--draft", str(draft), "--target", f"llama.cpp:{target}", "--device", "cpu",
            "--max-tokens", "5", "--policy", "speculative", "--no-color"]
    assert main(args + ["--llamacpp-threads", "1"]) == 0
    assert "tok/s" in capsys.readouterr().out
    assert main(args + ["--llamacpp-threads", "0"]) == 2
    assert "--llamacpp-threads" in capsys.readouterr().err


def test_the_server_on_a_gguf_pair_answers_concurrent_clients_as_each_alone(tiny, tmp_path, monkeypatch):
    """`cascade serve`'s app on llama.cpp, through the real openai client on 127.0.0.1: concurrent requests (4
    rows, 8 clients: some queue and join the running batch) equal each request alone, streamed equals not
    streamed, and every cache row is free afterwards."""
    import concurrent.futures

    from test_server import start_server, wait_idle

    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))
    (_, draft, _), (_, target, _) = tiny[1], tiny[2]
    exact = {"kv_dtype": "f32", "flash_attn": False}
    served = Cascade.from_pretrained(str(draft), str(target), max_rows=4, max_len=128, device="cpu", llamacpp=exact)
    alone = Cascade.from_pretrained(str(draft), str(target), max_rows=1, max_len=128, device="cpu", llamacpp=exact)
    server = start_server(served, default_policy="speculative")
    try:
        client = server.client()
        policies = ["speculative", "chow(alpha=0.3)", "target-only", "draft-only"]
        jobs = [(f"ab {'ab ' * i}", 5 + 2 * (i % 3), policies[i % 4]) for i in range(8)]

        def ask(job):
            prompt, max_tokens, policy = job
            return client.chat.completions.create(model="cascade", messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_tokens, temperature=0,
                                                  extra_body={"cascade": {"policy": policy}})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, jobs))
        for (prompt, max_tokens, policy), r in zip(jobs, answers):
            [lib] = alone.generate([{"role": "user", "content": prompt}], SamplingParams(max_tokens=max_tokens),
                                   policy=policy)
            assert r.choices[0].message.content == lib.text, policy
            assert r.usage.completion_tokens == lib.stats.emitted_tokens
        prompt, max_tokens, policy = jobs[1]
        chunks = client.chat.completions.create(model="cascade", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0, stream=True,
                                                extra_body={"cascade": {"policy": policy}})
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answers[1].choices[0].message.content
        assert wait_idle(server)["cascade_kv_rows_free"] == 4
    finally:
        server.stop()


@pytest.mark.real_pair
def test_real_draft_gguf_rolls_back_by_kv_removal_and_batches_rows():
    from cascade.weights import DRAFT_SPEC, cached_gguf_dir, is_gguf_fetched

    gdir = cached_gguf_dir(DRAFT_SPEC)
    if not is_gguf_fetched(DRAFT_SPEC, gdir):
        pytest.skip("needs `cascade fetch-models --backend llama.cpp`")
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 150_000, (40,), generator=gen).tolist()
    junk, nxt = torch.randint(0, 150_000, (6,), generator=gen).tolist(), [1234]
    r = local_runner(gdir, RunnerOptions(max_rows=3, max_len=128))
    fresh = local_runner(gdir, RunnerOptions(max_rows=3, max_len=128))
    r.forward_span([2], [prompt], num_logits=[0])
    r.forward_span([2], [junk])
    r.truncate([2], [40])
    fresh.forward_span([2], [prompt], num_logits=[0])
    a, b = r.decode(torch.tensor([2]), torch.tensor(nxt)), fresh.decode(torch.tensor([2]), torch.tensor(nxt))
    assert maxdiff(a, b) < 1e-4 and r.lengths([2]) == [41]
    # another row beside it changes nothing of row 2's next logits beyond llama.cpp's batch-shape rounding
    r.forward_span([0], [junk])
    both = r.forward_span([0, 2], [[7], [99]])
    alone = fresh.forward_span([2], [[99]])
    assert torch.nn.functional.cosine_similarity(both[1:], alone, dim=-1).item() > 0.999
    assert both[1].argmax() == alone[0].argmax()


def _install_as_default_pair(tiny, home):
    """Put the tiny GGUFs where ``cascade fetch-models --backend llama.cpp`` puts the default pair's (same marker)."""
    import json
    import shutil

    from cascade.models.gguf_dir import MARKER
    from cascade.weights import DEFAULT_PAIR, cached_gguf_dir

    for seed, spec in zip((1, 2), DEFAULT_PAIR):
        described = resolve_member(str(tiny[seed][1]), 0)
        out = cached_gguf_dir(spec, home)
        shutil.copytree(described, out, symlinks=True)
        (out / MARKER).write_text(json.dumps({"name": spec.name, "source_sha256": spec.sha256}))


def test_on_a_cpu_the_default_pair_runs_on_llamacpp_where_its_ggufs_are(tiny, tmp_path, monkeypatch, capsys):
    """``backend="auto"``: the fetched GGUFs on llama.cpp, with the shipped default (it is the default pair);
    ``backend="torch"`` or a torch dtype asks for the converted pair, which this cache does not hold."""
    home = tmp_path / "home"
    monkeypatch.setenv("CASCADE_HOME", str(home))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    _install_as_default_pair(tiny, home)
    c = Cascade.from_pretrained(max_rows=1, max_len=64)
    assert isinstance(c.engine.draft, LlamaCppRunner) and isinstance(c.engine.target, LlamaCppRunner)
    assert c.default_pair
    out = c.generate("ab ab", SamplingParams(max_tokens=4), policy="speculative")[0]
    assert len(out.token_ids) == 4
    for kwargs in ({"backend": "torch"}, {"dtype": "float32"}):
        with pytest.raises(FileNotFoundError, match="fetch-models --backend torch"):
            Cascade.from_pretrained(max_rows=1, max_len=64, **kwargs)
    from cascade.cli import main

    assert main(["generate", "ab ab", "--max-tokens", "3", "--policy", "speculative", "--no-color"]) == 0
    assert "draft llama.cpp · target llama.cpp" in capsys.readouterr().out


def test_the_dynamic_speculation_profile_runs_on_llamacpp(tiny, tmp_path, monkeypatch):
    """``cascade serve`` profiles the pair at start-up (``adaptive_k``): the profile's synthetic passes on llama.cpp."""
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))
    (_, draft, _), (_, target, _) = tiny[1], tiny[2]
    c = Cascade.from_pretrained(str(draft), str(target), max_rows=2, max_len=128, device="cpu", adaptive_k=True)
    out = c.generate(["ab ab", "ab"], SamplingParams(max_tokens=5), policy="speculative")
    assert [len(r.token_ids) for r in out] == [5, 5]
