"""LlamaRunner (cascade.models.llama) against transformers on tiny random models, plus the cache
bookkeeping (rollback, free, batching) and argument validation of the runner contract (``tests/runner_contract.py``,
shared with the llama.cpp runner's tests), and the real draft model when present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade.models.base import ModelRunner
from cascade.models.llama import LlamaRunner, default_dtype
from cascade.models.loading import DecoderConfig

import runner_contract  # noqa: E402  (tests/ is on sys.path)

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
IMPLS = ["torch"] + (["onednn"] if ONEDNN else [])

VOCAB = 300
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5)

# name -> (transformers class, config kwargs)
MODELS = {
    "qwen2-bias-untied": ("Qwen2", dict(tie_word_embeddings=False, rope_theta=1e6)),
    "qwen2-tied-mha": ("Qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama-gqa-untied-headdim": ("Llama", dict(tie_word_embeddings=False, head_dim=32, num_key_value_heads=1)),
    "llama-tied-attnbias-llama3": ("Llama", dict(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True, rope_theta=5e5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "mistral": ("Mistral", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen3-qknorm-tied-headdim": ("Qwen3", dict(tie_word_embeddings=True, head_dim=32, rope_theta=1e6)),
    "qwen3-attnbias-untied": ("Qwen3", dict(tie_word_embeddings=False, attention_bias=True)),
    # Phi-3 stores q / k / v and gate / up fused (its family record's weight names); window wider than max_len
    "phi3-fused-untied": ("Phi3", dict(tie_word_embeddings=False, sliding_window=64, pad_token_id=0)),
}


def make_hf(kind: str, **overrides):
    cls_name, kw = MODELS[kind]
    cfg_cls = getattr(transformers, f"{cls_name}Config")
    model_cls = getattr(transformers, f"{cls_name}ForCausalLM")
    cfg = cfg_cls(**{**BASE, **kw, **overrides})
    torch.manual_seed(1)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # default init leaves biases 0 and norms 1: randomize so both paths are exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (hf model, checkpoint dir), built lazily once per module."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            model = make_hf(kind)
            d = tmp_path_factory.mktemp(kind)
            model.save_pretrained(d)
            cache[kind] = (model, d)
        return cache[kind]

    return get


def hf_logits(model, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].float()  # [len, V]


def rand_tokens(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=gen).tolist()


maxdiff = runner_contract.maxdiff


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_parity_with_transformers(saved, kind, impl):
    model, path = saved(kind)
    runner = LlamaRunner.from_pretrained(path, max_rows=4, max_len=48, linear_impl=impl, dtype="float32")
    assert isinstance(runner, ModelRunner)
    assert runner.num_params == sum(p.numel() for p in model.parameters())
    assert runner.dtype == torch.float32 and runner.vocab_size == VOCAB
    gen = torch.Generator().manual_seed(0)
    rows = [2, 0, 3]
    seqs = [rand_tokens(n, gen) for n in (5, 9, 3)]

    # ragged prefill, every position's logits
    out = runner.forward_span(rows, seqs)
    ref = torch.cat([hf_logits(model, s) for s in seqs])
    assert out.dtype == torch.float32 and out.shape == (17, VOCAB)
    assert maxdiff(out, ref) < TOL
    assert runner.lengths(rows) == [5, 9, 3]

    # decode steps (rows in a different order than they were filled)
    order = [3, 2, 0]
    idx = {r: i for i, r in enumerate(rows)}
    for _ in range(3):
        ids = [rand_tokens(1, gen)[0] for _ in order]
        out = runner.decode(torch.tensor(order), torch.tensor(ids))
        for r, t in zip(order, ids):
            seqs[idx[r]].append(t)
        ref = torch.stack([hf_logits(model, seqs[idx[r]])[-1] for r in order])
        assert out.shape == (3, VOCAB) and maxdiff(out, ref) < TOL

    # ragged multi-token span with partial logits
    spans = [rand_tokens(n, gen) for n in (2, 4, 1)]
    out = runner.forward_span(rows, spans, num_logits=[2, 3, 1])
    ref = []
    for i, (s, k) in enumerate(zip(spans, (2, 3, 1))):
        seqs[i] += s
        ref.append(hf_logits(model, seqs[i])[-k:])
    assert maxdiff(out, torch.cat(ref)) < TOL
    assert runner.lengths(rows) == [len(s) for s in seqs]

    # one row alone (one-row GEMV shapes)
    out = runner.decode(torch.tensor([0]), torch.tensor([7]))
    seqs[1].append(7)
    assert maxdiff(out, hf_logits(model, seqs[1])[-1:]) < TOL


def test_config_from_hf_matches_file(saved):
    model, path = saved("llama-tied-attnbias-llama3")
    a = DecoderConfig.from_hf(model.config)
    b = DecoderConfig.from_dict(json.loads((path / "config.json").read_text()))
    assert a == b
    assert a.rope_scaling["rope_type"] == "llama3" and a.tie_word_embeddings and a.o_bias and a.mlp_bias


def test_legacy_rope_fields():
    """transformers 4.x config.json layout (rope_theta + rope_scaling at top level)."""
    cfg = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
               intermediate_size=32, vocab_size=10, rope_theta=123.0,
               rope_scaling={"type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                             "original_max_position_embeddings": 64})
    c = DecoderConfig.from_dict(cfg)
    assert c.rope_theta == 123.0 and c.rope_scaling["rope_type"] == "llama3" and c.num_kv_heads == 4


def test_sharded_checkpoint(saved, tmp_path):
    model, _ = saved("qwen2-bias-untied")
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    runner = LlamaRunner.from_pretrained(tmp_path, max_rows=1, max_len=16, dtype="float32")
    seq = [1, 5, 7, 11]
    assert maxdiff(runner.forward_span([0], [seq]), hf_logits(model, seq)) < TOL


# ---------------------------------------------------------------------------------------------- cache
@pytest.fixture(scope="module")
def qwen(saved):
    return saved("qwen2-bias-untied")


def fresh(path, **kw) -> LlamaRunner:
    """An fp32 runner (the default dtype is bf16 on CPUs with fast bf16; these tests compare against fp32)."""
    kw.setdefault("dtype", "float32")
    return LlamaRunner.from_pretrained(path, max_rows=kw.pop("max_rows", 4), max_len=kw.pop("max_len", 40), **kw)


def make_fresh(path):
    """The contract's runner factory (``tests/runner_contract.py``): fresh fp32 runners over ``path``."""
    return lambda **kw: fresh(path, **kw)


def test_rollback_equals_fresh_runner(qwen):
    runner_contract.check_rollback_equals_fresh(make_fresh(qwen[1]))


def test_free_then_reuse_is_clean(qwen):
    model, path = qwen
    runner_contract.check_free_then_reuse(make_fresh(path), lambda seq: hf_logits(model, seq), TOL)


def test_ragged_batch_equals_each_sequence_alone(qwen):
    model, path = qwen
    runner_contract.check_ragged_batch(make_fresh(path), lambda seq: hf_logits(model, seq), TOL, VOCAB)


def test_batched_prefill_equals_alone(qwen):
    """``prefill`` (the torch runner's batched prompt pass) row by row against each prompt alone."""
    _, path = qwen
    gen = torch.Generator().manual_seed(3)
    prompts = [rand_tokens(n, gen) for n in (7, 1, 12, 4)]
    rows = [3, 1, 0, 2]
    pre = fresh(path).prefill(rows, prompts)
    for i, r in enumerate(rows):
        assert maxdiff(pre[i : i + 1], fresh(path).prefill([r], [prompts[i]])) < 1e-5


def test_decode_equals_single_token_spans(qwen):
    runner_contract.check_decode_equals_single_token_spans(make_fresh(qwen[1]))


def test_partial_logits_and_integer_types(qwen):
    """num_logits=0 gives no rows for that span (but still appends it); numpy / 0-d tensor ints work."""
    np = pytest.importorskip("numpy")
    model, path = qwen
    r = fresh(path)
    out = r.forward_span([np.int64(1), torch.tensor(2)], [[1, 2, 3], np.array([4, 5])], num_logits=[0, np.int64(1)])
    assert out.shape == (1, VOCAB) and maxdiff(out, hf_logits(model, [4, 5])[-1:]) < TOL
    assert r.forward_span([3], [[6]], num_logits=[0]).shape == (0, VOCAB)
    assert r.lengths([1, 2, 3]) == [3, 2, 1]
    r.truncate([1], [np.int64(2)])
    out = r.decode(torch.tensor([1], dtype=torch.int32), torch.tensor([9], dtype=torch.int32))
    assert maxdiff(out, hf_logits(model, [1, 2, 9])[-1:]) < TOL


def test_static_steps_match_eager(qwen, monkeypatch):
    """The CUDA-graph path run uncaptured on CPU: padded (batch bucket, token bucket) static steps, the cache
    attention over each row's own length, device lengths and the scratch row, against the eager runner on
    the same calls: ragged verify-sized spans, decodes, rollbacks, a span longer than the largest bucket
    (eager fallback), and a prompt that ends at max_len."""
    _, path = qwen
    a, b = fresh(path, cuda_graphs="uncaptured", graph_tokens=(2, 4)), fresh(path)
    assert a.describe()["decode"] == "static" and b.describe()["decode"] == "eager"
    calls = []
    real = a._static_step
    monkeypatch.setattr(a._graphs, "step", lambda *args: calls.append(tuple(args[1].shape)) or real(*args))
    for r in (a, b):
        r.forward_span([1, 3], [[1, 2, 3, 4, 5, 6], [4, 5, 6, 7, 8]])  # longer than 4: eager on both
    assert calls == []
    steps = [
        ("span", [3, 1], [[10, 11, 12], [13]], [2, 1]),   # ragged, bucket (2 rows, 4 tokens)
        ("decode", [3, 1], [14, 15], None),                  # (2, 1)
        ("span", [1], [[16, 17]], [2]),                      # (1, 2)
        ("decode", [0, 1, 3], [1, 2, 3], None),              # a third row, empty so far: (4, 1)
    ]
    for kind, rows, ids, k in steps:
        if kind == "span":
            got, want = a.forward_span(rows, ids, num_logits=k), b.forward_span(rows, ids, num_logits=k)
        else:
            got, want = a.decode(torch.tensor(rows), torch.tensor(ids)), b.decode(torch.tensor(rows), torch.tensor(ids))
        assert got.shape == want.shape and maxdiff(got, want) < 1e-5, kind
        assert a.lengths(rows) == b.lengths(rows)
    assert calls == [(2, 4), (2, 1), (1, 2), (4, 1)]
    for r in (a, b):
        r.truncate([3], [4])
    assert maxdiff(a.decode(torch.tensor([3]), torch.tensor([7])), b.decode(torch.tensor([3]), torch.tensor([7]))) < 1e-5
    assert a._len_dev.tolist() == [1, 11, 0, 5, 0]  # device mirror in step with the host lengths, scratch row 0
    assert a.lengths([0, 1, 2, 3]) == [1, 11, 0, 5]
    for r in (a, b):  # fill row 2 up to max_len: the last static span ends exactly at the cache's end
        r.forward_span([2], [list(range(1, 38))], num_logits=[0])
    assert maxdiff(a.forward_span([2], [[5, 6, 7]]), b.forward_span([2], [[5, 6, 7]])) < 1e-5
    assert a.lengths([2]) == [40]


@pytest.mark.parametrize("mode", ["eager", "uncaptured"])
def test_greedy_decode_loop_equals_decodes_fed_their_argmax(qwen, mode):
    """``decode_loop`` (the draft's greedy block; one CUDA graph per batch bucket and step count) against
    ``decode`` calls fed their own argmax, on a padded batch bucket (3 rows of 4) in the static path; the
    argmax stays inside ``vocab`` even where a padding column would win."""
    _, path = qwen
    kw = {"cuda_graphs": "uncaptured", "graph_loops": (3,)} if mode == "uncaptured" else {}
    runner_contract.check_greedy_loop(make_fresh(path), **kw)
    a = fresh(path, **kw)
    a.forward_span([3], [[6, 7, 8, 9, 1, 2, 3]])
    # a vocab limit: the argmax is taken over ids < vocab only
    vocab = 7
    logits, tokens = a.decode_loop([1], torch.tensor([3]), 2, vocab=vocab)
    assert int(tokens.max()) < vocab and tokens[0].item() == logits[0, 0, :vocab].argmax().item()
    with pytest.raises(ValueError, match="steps"):
        a.decode_loop([1], torch.tensor([3]), 0)
    with pytest.raises(ValueError, match="vocab"):
        a.decode_loop([1], torch.tensor([3]), 1, vocab=a.vocab_size + 1)
    with pytest.raises(ValueError, match="max_len"):
        a.decode_loop([3], torch.tensor([3]), 40)


def test_greedy_decode_loop_vocab_limit_changes_between_calls(qwen):
    """One loop graph serves any vocab: the argmax mask is reset before each call (uncaptured static path)."""
    _, path = qwen
    a, b = fresh(path, cuda_graphs="uncaptured"), fresh(path)
    for r in (a, b):
        r.forward_span([0, 1], [[1, 2, 3], [4, 5]])

    def manual(rows, ids, steps, vocab):
        out, cur = [], ids
        for _ in range(steps):
            cur = b.decode(torch.tensor(rows), cur)[:, :vocab].argmax(dim=-1)
            out.append(cur.tolist())
        return out

    cur = torch.tensor([5, 6])
    for vocab in (7, a.vocab_size, 5, a.vocab_size):
        _, tokens = a.decode_loop([0, 1], cur, 2, vocab=vocab)
        assert tokens.tolist() == manual([0, 1], cur, 2, vocab)
        cur = tokens[-1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_static_steps_match_eager_with_either_attention_backend(qwen, monkeypatch, backend):
    """The same through the Triton cache attention kernel (interpreter) as on CUDA, and its reference."""
    import cascade.kernels.attention as attention

    real = attention.cache_attention
    monkeypatch.setattr(attention, "cache_attention", lambda *args, **kw: real(*args, backend=backend))
    _, path = qwen
    a, b = fresh(path, cuda_graphs="uncaptured"), fresh(path)
    for r in (a, b):
        r.forward_span([0, 2], [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]])
    for rows, spans in (([2, 0], [[11, 12, 13, 14, 15, 16], [17]]), ([0], [[18, 19]])):
        assert maxdiff(a.forward_span(rows, spans), b.forward_span(rows, spans)) < 1e-5


def test_bad_graph_options_are_named(qwen):
    _, path = qwen
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        fresh(path, cuda_graphs="yes")
    with pytest.raises(ValueError, match="token_buckets must be positive"):
        fresh(path, cuda_graphs="uncaptured", graph_tokens=(0,))


def test_bfloat16_runs_close(qwen):
    model, path = qwen
    r = fresh(path, dtype="bfloat16")
    assert r.dtype == torch.bfloat16
    seq = [1, 2, 3, 4, 5, 6]
    out = r.forward_span([0], [seq])
    assert out.dtype == torch.float32
    assert maxdiff(out, hf_logits(model, seq)) < 0.1


def test_default_dtype_follows_cpu():
    bf16 = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and torch.cpu._is_avx512_bf16_supported()
    assert default_dtype("cpu") == (torch.bfloat16 if bf16 else torch.float32)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, field", runner_contract.BAD_ARGUMENTS)
def test_bad_arguments(qwen, call, field):
    runner_contract.check_bad_argument(make_fresh(qwen[1]), call, field)


def test_full_row_rejected(qwen):
    runner_contract.check_full_row_rejected(make_fresh(qwen[1]))


@pytest.mark.parametrize("kw, field", [(dict(dtype="int8"), "dtype"), (dict(dtype=torch.int32), "dtype"),
                                       (dict(max_rows=0), "max_rows"), (dict(max_len=0), "max_len"),
                                       (dict(linear_impl="magic"), "linear_impl")])
def test_bad_constructor_arguments(qwen, kw, field):
    _, path = qwen
    with pytest.raises(ValueError, match=field):
        LlamaRunner.from_pretrained(path, **{"max_rows": 2, "max_len": 16, **kw})


def test_bad_checkpoints(qwen, tmp_path):
    _, path = qwen
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        LlamaRunner.from_pretrained(tmp_path / "nope", 1, 16)
    with pytest.raises(ValueError, match="config.json"):
        LlamaRunner.from_pretrained(tmp_path, 1, 16)
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="safetensors"):
        LlamaRunner.from_pretrained(tmp_path, 1, 16)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LlamaRunner.from_pretrained(tmp_path, 1, 16)
    for rope in ({"rope_type": "yarn", "factor": 4.0}, {"type": "linear", "factor": 2.0}):
        bad = {**cfg, "rope_parameters": {"rope_theta": 1e4, **rope}}
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="rope_scaling"):
            LlamaRunner.from_pretrained(tmp_path, 1, 16)


def test_sliding_window_limits_max_len():
    model = make_hf("mistral", sliding_window=16)
    c = DecoderConfig.from_hf(model.config)
    assert c.sliding_window == 16
    LlamaRunner(c, model.state_dict(), 1, 16)
    with pytest.raises(ValueError, match="max_len"):
        LlamaRunner(c, model.state_dict(), 1, 17)


def test_parameter_shapes_are_the_checkpoints(saved):
    """The family's names and shapes (``parameter_shapes``) are exactly what transformers saves, for split
    and fused projections, tied and untied heads, biases and q / k norms."""
    from cascade.models.decoder_weights import parameter_shapes

    for kind in MODELS:
        model, _ = saved(kind)
        c = DecoderConfig.from_hf(model.config)
        sd = model.state_dict()
        expected = {k: tuple(v.shape) for k, v in sd.items() if not (c.tie_word_embeddings and k == "lm_head.weight")}
        assert parameter_shapes(c) == expected, kind


def test_partial_rotary_rejected():
    model = make_hf("phi3-fused-untied")
    cfg = model.config.to_dict()
    cfg["rope_parameters"] = {**cfg["rope_parameters"], "partial_rotary_factor": 0.75}
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        DecoderConfig.from_dict(cfg)


def test_missing_or_misshaped_weight_named(qwen):
    model, _ = qwen
    c = DecoderConfig.from_hf(model.config)
    sd = dict(model.state_dict())
    del sd["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match="down_proj"):
        LlamaRunner(c, sd, 1, 16)
    sd = dict(model.state_dict())
    sd["model.layers.0.self_attn.o_proj.weight"] = sd["model.layers.0.self_attn.o_proj.weight"][:, :-1]
    with pytest.raises(ValueError, match="o_proj"):
        LlamaRunner(c, sd, 1, 16)


# ---------------------------------------------------------------------------------------------- transformers unaffected
_PROBE = r"""
import importlib.util, sys, torch
if sys.argv[2] == "1":
    import cascade, cascade.models, cascade.models.llama, cascade.models.loading
    try:
        import cascade.kernels
    except ImportError:
        pass
from transformers import AutoModelForCausalLM
from transformers.utils import import_utils
spec = importlib.util.find_spec("kernels")
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    out = m(torch.tensor([[1, 2, 3, 4]])).logits
print(import_utils.is_kernels_available(), spec.origin if spec else None, repr(out.sum().item()))
"""


def test_transformers_loading_unaffected(qwen):
    """Our package (cascade.kernels, run from the checkout root) must not look like the PyPI `kernels`
    package to transformers, and loading a model through transformers gives the same result with it."""
    _, path = qwen
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = []
    for with_cascade in ("0", "1"):
        p = subprocess.run([sys.executable, "-c", _PROBE, str(path), with_cascade], cwd=REPO, env=env, check=False,
                           capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stderr[-2000:]
        res.append(p.stdout.strip().splitlines()[-1])
    assert res[0] == res[1]
    available, origin, _ = res[1].split(" ", 2)
    assert available == "False"
    assert origin == "None" or not origin.startswith(str(REPO)), origin


# ---------------------------------------------------------------------------------------------- real draft model
def _draft_dir() -> Path:
    home = Path(os.environ.get("CASCADE_HOME", Path.home() / ".cache" / "cascade"))
    return home / "models" / "qwen2.5-coder-0.5b-instruct"


@pytest.mark.real_pair
def test_real_draft_model_matches_transformers():
    d = _draft_dir()
    if not (d / "config.json").is_file():
        pytest.skip(f"real draft model not found at {d} (run `cascade fetch-models`; set CASCADE_HOME to relocate)")
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    runner = LlamaRunner.from_pretrained(d, max_rows=2, max_len=64, dtype="float32")
    assert runner.num_params == sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    V = runner.vocab_size
    seqs = [torch.randint(0, 5000, (n,), generator=gen).tolist() for n in (23, 11)]
    out = runner.forward_span([0, 1], seqs, num_logits=[3, 1])
    ref = torch.cat([hf_logits(model, seqs[0])[-3:], hf_logits(model, seqs[1])[-1:]])
    assert out.shape == (4, V)
    tol = 2e-3 * ref.abs().max().item()
    assert maxdiff(out, ref) < tol
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    for t in (100, 200):
        out = runner.decode(torch.tensor([0, 1]), torch.tensor([t, t + 1]))
        seqs[0].append(t)
        seqs[1].append(t + 1)
        ref = torch.stack([hf_logits(model, s)[-1] for s in seqs])
        assert maxdiff(out, ref) < tol
    span = [5, 6, 7, 8]
    out = runner.forward_span([1], [span])
    assert maxdiff(out, hf_logits(model, seqs[1] + span)[-4:]) < tol


def test_token_buckets_longer_than_a_row_are_dropped(qwen, monkeypatch):
    """Warming up or capturing a bucket of n tokens writes scratch-row positions 0 .. n - 1, so a bucket
    longer than max_len is not made (on CUDA its warm-up would index past the cache: a device assert);
    a span longer than the largest bucket left runs eagerly, with the eager runner's logits."""
    _, path = qwen
    a = fresh(path, cuda_graphs="uncaptured", max_len=6)  # default buckets 1, 2, 4, 8, 16
    assert a._graphs.token_buckets == [1, 2, 4]
    b = fresh(path, max_len=6)
    calls = []
    real = a._static_step
    monkeypatch.setattr(a._graphs, "step", lambda *args: calls.append(tuple(args[1].shape)) or real(*args))
    got, want = (r.forward_span([0], [[1, 2, 3, 4, 5]]) for r in (a, b))
    assert calls == [] and maxdiff(got, want) < TOL
