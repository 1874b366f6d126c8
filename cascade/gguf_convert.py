"""GGUF → fp32 safetensors conversion: the last step of ``cascade.weights.fetch_model`` (``convert``, checked
against the pinned spec) and ``cascade convert FILE.gguf`` for a user's own file (``convert_file``).

Owns the one-time load of a verified GGUF through ``transformers`` (``gguf_file=``, which needs the
``gguf`` and ``accelerate`` packages), the fixes a GGUF-loaded model needs before ``save_pretrained``
accepts it, and the checks that the saved checkpoint is what the runtime expects: untied LM head, the
pinned parameter count, the end-of-turn token ids in ``generation_config.json`` and a chat template
(the GGUF's own, else Qwen2.5's ChatML). Imported lazily, only when a conversion runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from cascade.model_spec import ModelFetchError, ModelSpec
from cascade.progress import status as _status

# Used only when a GGUF carries no chat template. Renders exactly like Qwen2.5's own template for
# conversations without tools (the default system prompt is Qwen's).
QWEN25_CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@contextlib.contextmanager
def offline_env() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 for the duration (restored afterwards)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _hf_bars_off() -> Iterator[None]:
    """Silence transformers' hub/shard tqdm bars (our spinner reports the step) and restore them after.
    The GGUF dequantization loop uses plain tqdm and keeps its bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def ensure_chat_template(tokenizer) -> str:
    """Give the tokenizer Qwen2.5's ChatML template if the GGUF carried none; returns the origin."""
    if getattr(tokenizer, "chat_template", None):
        return "gguf"
    tokenizer.chat_template = QWEN25_CHATML_TEMPLATE
    return "fallback"


def check_eos(spec: ModelSpec, tokenizer) -> None:
    """The tokenizer must map the spec's end tokens to the pinned ids."""
    for tok, want in zip(spec.eos_tokens, spec.eos_token_ids):
        got = tokenizer.convert_tokens_to_ids(tok)
        if got != want:
            raise ModelFetchError(f"{spec.name}: tokenizer maps {tok!r} to id {got}, expected {want}")


def _drop_json_keys(path: Path, keys: tuple[str, ...]) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    if any(k in data for k in keys):
        for k in keys:
            data.pop(k, None)
        path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def convert(spec: ModelSpec, gguf_path: Path, out_dir: Path, progress: bool = True) -> dict:
    """Load ``gguf_path`` dequantized to fp32, check it against ``spec`` and save it into ``out_dir``."""

    def check(model, tokenizer) -> None:
        cfg = model.config
        if bool(getattr(cfg, "tie_word_embeddings", False)) != spec.tie_word_embeddings:
            raise ModelFetchError(f"{spec.name}: tie_word_embeddings is {cfg.tie_word_embeddings}, expected "
                                  f"{spec.tie_word_embeddings}")
        n_params = sum(p.numel() for p in model.parameters())
        if spec.num_parameters is not None and n_params != spec.num_parameters:
            raise ModelFetchError(f"{spec.name}: converted model has {n_params:,} parameters, expected "
                                  f"{spec.num_parameters:,}")
        check_eos(spec, tokenizer)

    return _convert(gguf_path, out_dir, spec.name, check, lambda tokenizer: list(spec.eos_token_ids), progress,
                    keep_bos=False)


def convert_file(gguf_path: Path, out_dir: Path, progress: bool = True) -> dict:
    """A user's own GGUF (``cascade convert FILE.gguf``): any architecture the runner supports (Llama 2 / 3,
    Mistral, Qwen2 / 2.5 / 3), dequantized to fp32 safetensors with its tokenizer in ``out_dir``. The end
    tokens are the GGUF's EOS plus the chat template's end-of-turn token where the vocabulary has one."""
    from cascade.models.loading import DecoderConfig

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")

    def check(model, tokenizer) -> None:
        DecoderConfig.from_hf(model.config)  # an architecture the runner cannot run fails here, named

    return _convert(gguf_path, Path(out_dir), gguf_path.stem, check, file_eos_ids, progress, keep_bos=True)


def file_eos_ids(tokenizer) -> list[int]:
    """The end tokens of a user's GGUF: its EOS plus the chat template's end-of-turn token where the vocabulary
    has one."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def describe(gguf_path: Path, out_dir: Path, spec: ModelSpec | None = None, progress: bool = True) -> dict:
    """What the runtime reads besides the weights, for a GGUF that llama.cpp runs as it ships: ``config.json``,
    the tokenizer (with a chat template) and ``generation_config.json`` (its end tokens) into ``out_dir``, read
    from the GGUF's metadata; no tensor is loaded or dequantized (seconds, not the fp32 conversion's minutes and
    gigabytes). ``spec``: the known model it must be (end tokens pinned), else a user's file."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from cascade.models.loading import DecoderConfig

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    out_dir.mkdir(parents=True, exist_ok=True)
    src = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    label = f"[{spec.name if spec else gguf_path.stem}]"
    with offline_env(), _hf_bars_off():
        with _status(f"{label} reading the GGUF's config and tokenizer", progress):
            cfg = AutoConfig.from_pretrained(**src)
            tokenizer = AutoTokenizer.from_pretrained(**src)
        DecoderConfig.from_hf(cfg)  # an architecture the engine cannot account for fails here, named
        if spec is not None:
            check_eos(spec, tokenizer)
        gen = GenerationConfig.from_model_config(cfg)
        eos = (lambda _tok: list(spec.eos_token_ids)) if spec is not None else file_eos_ids
        template, ends = _fix_config_and_tokenizer(cfg, tokenizer, gen, eos, keep_bos=spec is None)
        with contextlib.suppress(AttributeError):
            delattr(cfg, "quantization_config")
        cfg.save_pretrained(str(out_dir))
        gen.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    _drop_json_keys(out_dir / "config.json", ("quantization_config",))
    _drop_json_keys(out_dir / "tokenizer_config.json", ("local_files_only",))
    return {"chat_template": template, "eos_token_ids": ends, "transformers": transformers.__version__}


def _convert(gguf_path: Path, out_dir: Path, name: str, check, eos_ids, progress: bool, keep_bos: bool) -> dict:
    """The conversion both entry points share: load dequantized to fp32, ``check(model, tokenizer)``, fix
    what a GGUF-loaded model needs before ``save_pretrained`` accepts it, save model + tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    src = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name,
               local_files_only=True)
    version = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_kw = "dtype" if version >= (4, 56) else "torch_dtype"  # `dtype` replaced `torch_dtype` in 4.56
    label = f"[{name}]"
    with offline_env(), _hf_bars_off():
        with _status(f"{label} loading + dequantizing the GGUF to fp32", progress, spinner=False):  # has a tqdm bar
            model = AutoModelForCausalLM.from_pretrained(**src, **{dtype_kw: torch.float32})
        with _status(f"{label} loading the GGUF tokenizer", progress):
            tokenizer = AutoTokenizer.from_pretrained(**src)

        cfg = model.config
        check(model, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        # A GGUF-loaded model refuses save_pretrained ("quantized with GGUF, not serializable"); its
        # weights are plain fp32 tensors by now, so drop the quantizer and its config entry.
        model.hf_quantizer = None
        with contextlib.suppress(AttributeError):
            delattr(cfg, "quantization_config")
        template, ends = _fix_config_and_tokenizer(cfg, tokenizer, model.generation_config, eos_ids, keep_bos)

        with _status(f"{label} saving fp32 safetensors + tokenizer", progress):
            model.save_pretrained(str(out_dir))
            tokenizer.save_pretrained(str(out_dir))
    del model
    # The saved config must not claim quantization; the tokenizer config must not pin our load flags.
    _drop_json_keys(out_dir / "config.json", ("quantization_config",))
    _drop_json_keys(out_dir / "tokenizer_config.json", ("local_files_only",))
    return {"num_parameters": n_params, "chat_template": template, "eos_token_ids": ends,
            "transformers": transformers.__version__, "torch": torch.__version__}


def _fix_config_and_tokenizer(cfg, tokenizer, gen, eos_ids, keep_bos: bool) -> tuple[str, list[int]]:
    """What a GGUF's config, tokenizer and generation config need before the runtime reads them (shared by the
    fp32 conversion and the llama.cpp description): a chat template on Qwen models, the decimal ``rms_norm_eps``
    the GGUF's float32 stood for, the tokenizer's length, and the end tokens in the generation config.
    Returns (where the chat template came from, the end-token ids)."""
    template = ensure_chat_template(tokenizer) if str(getattr(cfg, "model_type", "")).startswith("qwen") else (
        "gguf" if getattr(tokenizer, "chat_template", None) else "none")
    # GGUF stores floats as float32: 1e-6 arrives as 9.99999997e-07; write the decimal it stood for.
    if isinstance(getattr(cfg, "rms_norm_eps", None), float):
        cfg.rms_norm_eps = float(f"{cfg.rms_norm_eps:.7g}")
    if getattr(cfg, "max_position_embeddings", None):
        tokenizer.model_max_length = cfg.max_position_embeddings
    ends = eos_ids(tokenizer)
    if ends:
        gen.bos_token_id = gen.bos_token_id if keep_bos and gen.bos_token_id is not None else ends[-1]
        gen.eos_token_id = list(ends)
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[-1]
    return template, ends
