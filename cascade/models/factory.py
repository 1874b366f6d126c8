"""Where runners are made: the one factory the library, the CLI and every benchmark use.

A local runner is the family-independent ``LlamaRunner`` over a checkpoint of any family in
``cascade.models.families`` (its config and weight names read through the family's record), or
``LlamaCppRunner`` over a GGUF as it ships (``cascade.models.llamacpp``; a name ``llama.cpp:<...>`` or a
``.gguf`` path picks it); a target can also live in vLLM (``cascade.models.vllm``). This module turns what a user names into runners:

- ``resolve_pair(draft, target)``: the pair's checkpoint directories, the default pair where a name is None;
- ``local_runner(path, options)``: a model directory's runner (a GGUF model directory's on llama.cpp);
- ``random_runner(config, options)``: random weights of a config's shapes (``RandomWeights``), for the
  benchmarks' cost tables and the GPU suite, which carry no weights;
- ``target_runner(...)``: the target where it lives: a local checkpoint, ``vllm:<dir or name>`` in an
  in-process vLLM engine, or running ``vllm serve`` replicas;
- ``load_pair_runners(...)``: both, as ``Cascade.from_pretrained`` loads them.

``RunnerOptions`` holds what both runners of a pair share. Importing this module loads nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from cascade.models.base import ModelRunner
    from cascade.models.llama import LlamaRunner
    from cascade.models.loading import DecoderConfig
    from cascade.models.vllm import VLLMTargetOptions

VLLM_PREFIX = "vllm:"  # a target named "vllm:<dir or name>" is loaded into an in-process vLLM engine


@dataclass(frozen=True)
class RunnerOptions:
    """What both runners of a pair share: cache rows and positions, device and dtype (resolved or None for
    the device's default), and ``LlamaRunner`` keyword options (``linear_impl``, ``cuda_graphs``, ...)."""

    max_rows: int
    max_len: int
    device: str = "cpu"
    dtype: "str | torch.dtype | None" = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    llamacpp: dict[str, Any] = dataclasses.field(default_factory=dict)  # LlamaCppRunner options (threads, n_batch)


@dataclass
class PairRunners:
    """A loaded pair: its runners and where their checkpoints are (``target_dir`` None for a remote target
    given without a local config)."""

    draft: "ModelRunner"
    target: "ModelRunner"
    draft_dir: Path
    target_dir: Path | None


def resolve_pair(draft: str | Path | None = None, target: str | Path | None = None) -> tuple[Path, Path]:
    """The checkpoint directories of a pair (``cascade.models.resolve.resolve_model``), the default pair's
    models where a name is None."""
    return resolve_member(draft, 0), resolve_member(target, 1)


def resolve_member(name: str | Path | None, index: int) -> Path:
    """One model's directory: ``name``'s, or the default pair's draft (index 0) / target (1). A name that picks
    llama.cpp (``llama.cpp:<...>`` or a ``.gguf`` path) gives a GGUF model directory (``cascade.models.gguf_dir``),
    any other a checkpoint directory."""
    from cascade.models.gguf_dir import is_gguf_dir, names_llamacpp, resolve_gguf_model
    from cascade.models.resolve import resolve_model
    from cascade.weights import DEFAULT_PAIR

    if names_llamacpp(name) or (name is not None and is_gguf_dir(Path(name).expanduser())):
        return resolve_gguf_model(name, DEFAULT_PAIR[index].name)
    return resolve_model(name if name is not None else DEFAULT_PAIR[index].name)


def local_runner(path: str | Path, options: RunnerOptions, **extra: Any) -> "ModelRunner":
    """The runner of a model directory: ``LlamaCppRunner`` on a GGUF model directory (``options.llamacpp``),
    else ``LlamaRunner`` on the checkpoint (any supported family; ``options.extra`` and ``extra``)."""
    from cascade.models.gguf_dir import GGUF_FILE, is_gguf_dir

    if is_gguf_dir(path):
        from cascade.models.llamacpp import LlamaCppRunner

        if options.device not in ("cpu", None):
            raise ValueError(f"device: the llama.cpp runner runs on the CPU here, not {options.device!r}")
        return LlamaCppRunner(Path(path) / GGUF_FILE, options.max_rows, options.max_len, **options.llamacpp)
    from cascade.models.llama import LlamaRunner

    return LlamaRunner.from_pretrained(path, options.max_rows, options.max_len, device=options.device,
                                       dtype=options.dtype, **{**options.extra, **extra})


def random_runner(config: "DecoderConfig", options: RunnerOptions, seed: int = 0, **extra: Any) -> "LlamaRunner":
    """A runner of ``config``'s shapes on seeded random weights, made on ``options.device`` in its dtype
    (a GPU makes a 7B model's weights in seconds; the CPU would take minutes)."""
    from cascade.models.llama import LlamaRunner
    from cascade.models.loading import resolve_dtype
    from cascade.models.random_weights import RandomWeights

    dtype = resolve_dtype(options.dtype, options.device)
    weights = RandomWeights(config, seed=seed, device=options.device, dtype=dtype)
    return LlamaRunner(config, weights, options.max_rows, options.max_len, device=options.device, dtype=dtype,
                       **{**options.extra, **extra})


def target_runner(target: str | Path | None, options: RunnerOptions, *, target_url: str | Sequence[str] | None = None,
                  vllm_options: "VLLMTargetOptions | None" = None,
                  vocab_size: int | None = None) -> tuple["ModelRunner", Path | None]:
    """The target runner and its checkpoint directory (None where a remote target has no local config).

    ``target``: a checkpoint directory or model name (None: the default pair's target), or
    ``"vllm:<dir or name>"`` for an in-process vLLM engine; ``target_url``: one or more running ``vllm serve``
    URLs (``target``, if given, is then read only for its config.json, for cost accounting); ``vocab_size``:
    the draft's, which a remote target's runner takes (the pair shares it)."""
    in_vllm = target is not None and str(target).startswith(VLLM_PREFIX)
    name = str(target).removeprefix(VLLM_PREFIX) if target is not None else None
    target_dir = resolve_member(name, 1) if target_url is None or name is not None else None
    if target_url is None and not in_vllm:
        return local_runner(target_dir, options), target_dir
    from cascade.models.vllm import VLLMTargetOptions, in_process_target, remote_target

    vopts = vllm_options or VLLMTargetOptions()
    if target_url is not None:
        if vopts.config_dir is None and target_dir is not None:
            vopts = dataclasses.replace(vopts, config_dir=str(target_dir))
        if vocab_size is None:
            raise ValueError("vocab_size: a remote target needs the draft's vocabulary size")
        return remote_target(target_url, vocab_size=vocab_size, max_rows=options.max_rows, max_len=options.max_len,
                             options=vopts), target_dir
    return in_process_target(target_dir, max_rows=options.max_rows, max_len=options.max_len,
                             dtype=options.dtype or "auto", options=vopts), target_dir


def load_pair_runners(draft: str | Path | None, target: str | Path | None, options: RunnerOptions, *,
                      target_url: str | Sequence[str] | None = None, vllm_options: "VLLMTargetOptions | None" = None,
                      draft_extra: dict[str, Any] | None = None) -> PairRunners:
    """Both runners of a pair: the draft always local (with ``draft_extra`` runner options, e.g. the greedy
    loops to capture), the target as ``target_runner`` places it."""
    draft_dir = resolve_member(draft, 0)
    draft_runner = local_runner(draft_dir, options, **(draft_extra or {}))
    target_run, target_dir = target_runner(target, options, target_url=target_url, vllm_options=vllm_options,
                                           vocab_size=draft_runner.vocab_size)
    return PairRunners(draft_runner, target_run, draft_dir, target_dir)


__all__ = ["PairRunners", "RunnerOptions", "VLLM_PREFIX", "load_pair_runners", "local_runner", "random_runner",
           "resolve_member", "resolve_pair", "target_runner"]
