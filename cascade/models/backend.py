"""Which runner the default pair runs on when a user names no model: the backend choice of ``cascade generate``,
``cascade serve``, ``cascade fetch-models`` and ``Cascade.from_pretrained``.

- ``"torch"``: cascade's own runner on the fp32 (or bf16) safetensors conversion; the GPU path, and what the bench
  always uses (its replay is exact only where teacher-forced and incremental passes round alike).
- ``"llama.cpp"``: the GGUF as it ships on llama.cpp (``cascade.models.llamacpp``): on a CPU the pair's single-model
  decoding runs at llama.cpp's own speed, about 4.7x the fp32 runner's on a 2-core EPYC (README, "The draft (or
  both) on llama.cpp").
- ``"auto"`` (the default): llama.cpp where it is the faster choice and ready: the device is the CPU, no torch
  dtype was asked for (a dtype is the torch runner's choice; llama.cpp computes in the GGUF's own types), the
  bindings are installed (the ``llamacpp`` extra) and both GGUFs are fetched; the torch runner otherwise.

The choice applies to the members a user leaves unnamed (the default pair's); a named model keeps its own runner
(a ``.gguf`` path or ``llama.cpp:<...>`` on llama.cpp, anything else on torch). Importing this module loads nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BACKENDS = ("auto", "torch", "llama.cpp")


def llamacpp_installed() -> bool:
    """Whether llama.cpp's Python bindings (``llama_cpp``, the ``llamacpp`` extra) can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def cuda_present() -> bool:
    """Whether torch sees a CUDA device (the torch runner's GPU path)."""
    import torch

    return torch.cuda.is_available()


def default_pair_on_llamacpp(home: Path | str | None = None) -> bool:
    """Whether both models of the default pair are in the cache as GGUF model directories
    (``cascade fetch-models --backend llama.cpp`` or ``both``)."""
    from cascade.weights import DEFAULT_PAIR, cached_gguf_dir, is_gguf_fetched

    return all(is_gguf_fetched(spec, cached_gguf_dir(spec, home)) for spec in DEFAULT_PAIR)


def pick_backend(backend: str, device: str = "auto", dtype: str | None = "auto") -> str:
    """``backend`` ("auto", "torch" or "llama.cpp") -> "torch" or "llama.cpp": what "auto" means here, for a pair
    loaded on ``device`` ("auto": CUDA when present) with ``dtype`` ("auto" / None: the runner's choice)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    from cascade.config import resolve_device

    on_cpu = resolve_device(device) == "cpu"
    if on_cpu and dtype in (None, "auto") and llamacpp_installed() and default_pair_on_llamacpp():
        return "llama.cpp"
    return "torch"


def default_member_name(name: str | Path | None, backend: str) -> str | Path | None:
    """The name a pair member is resolved by (``cascade.models.factory.resolve_member``): ``name`` itself where the
    user gave one; for the default pair's member (None), None on torch or ``"llama.cpp:"`` on llama.cpp.
    ``backend``: a picked one ("torch" or "llama.cpp", ``pick_backend``)."""
    from cascade.models.gguf_dir import LLAMACPP_PREFIX

    if name is not None:
        return name
    return LLAMACPP_PREFIX if backend == "llama.cpp" else None


def fetch_backend(backend: str) -> str:
    """What ``cascade fetch-models --backend auto`` prepares: the GGUFs for llama.cpp on a machine without CUDA
    whose bindings are installed (what ``pick_backend("auto")`` then runs), the torch conversion otherwise."""
    if backend != "auto":
        return backend
    return "llama.cpp" if llamacpp_installed() and not cuda_present() else "torch"


def runner_label(runner) -> str:
    """A few words on what runs a model ("torch float32", "llama.cpp"), from its ``describe()``: the load lines of
    ``cascade generate`` and ``cascade serve``."""
    info = runner.describe() if hasattr(runner, "describe") else {}
    words = [str(info[key]) for key in ("backend", "dtype") if key in info]
    return " ".join(words) or type(runner).__name__


__all__ = ["BACKENDS", "cuda_present", "default_member_name", "default_pair_on_llamacpp", "fetch_backend",
           "llamacpp_installed", "pick_backend",
           "runner_label"]
