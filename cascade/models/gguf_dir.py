"""GGUF model directories: a GGUF file that llama.cpp runs as it ships, beside what the engine reads besides the
weights. This module owns their layout, how a name picks the llama.cpp backend, and how a user's own ``.gguf``
gets its directory.

    <dir>/model.gguf                   the weights: the default pair's verified GGUF (moved in by
                                       ``cascade fetch-models --backend llama.cpp``), or a link to a user's file
    <dir>/config.json, tokenizer files, generation_config.json
                                       read from the GGUF's metadata (``cascade.gguf_convert.describe``): no
                                       tensor is dequantized, nothing of the fp32 conversion's 10 GB is written
    <dir>/.cascade-gguf.json           marker: what the directory describes (sha256 for a known model; path,
                                       size and mtime for a user's file, so an edited file is described again)

Names (``--draft`` / ``--target``, ``Cascade.from_pretrained``): ``llama.cpp:<model name, directory or file>``
picks llama.cpp (``llama.cpp:`` alone: the default pair's model); a path ending ``.gguf`` always does. Nothing
here loads a model; describing a user's file takes a few seconds once, then the directory is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

LLAMACPP_PREFIX = "llama.cpp:"  # a model named "llama.cpp:<name | dir | file.gguf>" runs on llama.cpp
GGUF_FILE = "model.gguf"
MARKER = ".cascade-gguf.json"

__all__ = ["GGUF_FILE", "LLAMACPP_PREFIX", "MARKER", "describe_user_gguf", "gguf_models_dir", "is_gguf_dir",
           "names_llamacpp", "resolve_gguf_model"]


def names_llamacpp(name: str | os.PathLike | None) -> bool:
    """Whether a model name picks the llama.cpp backend: the ``llama.cpp:`` prefix or a ``.gguf`` path."""
    if name is None:
        return False
    text = str(name)
    return text.startswith(LLAMACPP_PREFIX) or text.lower().endswith(".gguf")


def gguf_models_dir(home: Path | str | None = None) -> Path:
    """``<CASCADE_HOME>/gguf-models``: where GGUF model directories live."""
    from cascade.weights import cascade_home

    return (Path(home).expanduser() if home is not None else cascade_home()) / "gguf-models"


def is_gguf_dir(path: Path | str) -> bool:
    """Whether ``path`` is a GGUF model directory (its GGUF and its config are there)."""
    path = Path(path)
    return (path / GGUF_FILE).is_file() and (path / "config.json").is_file()


def _read_marker(path: Path) -> dict:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _file_identity(gguf: Path) -> dict:
    st = gguf.stat()
    return {"source": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def describe_user_gguf(gguf: Path | str, home: Path | str | None = None, progress: bool = True) -> Path:
    """The GGUF model directory of a user's own file (``<home>/gguf-models/<stem>-<hash>``), made on first use
    (its ``model.gguf`` links to the file, which stays where it is) and made again if the file changed."""
    from cascade.gguf_convert import describe

    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    identity = _file_identity(gguf)
    key = hashlib.sha1(str(gguf).encode()).hexdigest()[:10]
    out = gguf_models_dir(home) / f"{gguf.stem}-{key}"
    marker = _read_marker(out)
    if is_gguf_dir(out) and all(marker.get(k) == v for k, v in identity.items()):
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        facts = describe(gguf, tmp, None, progress)
        (tmp / GGUF_FILE).symlink_to(gguf)
        (tmp / MARKER).write_text(json.dumps({**identity, **facts, "described_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                             indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_gguf_model(name: str | os.PathLike | None, default: str, home: Path | str | None = None,
                       progress: bool = True) -> Path:
    """The GGUF model directory a name means (the ``llama.cpp:`` prefix optional), in this order: a ``.gguf``
    file (described on first use); a GGUF model directory; a known model (``default`` where the name is empty)
    that ``cascade fetch-models --backend llama.cpp`` put in the cache; a directory of ``gguf-models``."""
    from cascade.weights import KNOWN_MODELS

    text = str(name).removeprefix(LLAMACPP_PREFIX) if name is not None else ""
    text = text or default
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path}: llama.cpp runs .gguf files; this is not one")
        return describe_user_gguf(path, home, progress)
    if path.is_dir():
        if not is_gguf_dir(path):
            raise ValueError(f"{path} is not a GGUF model directory (no {GGUF_FILE} + config.json); pass a .gguf file")
        return path.resolve()
    if text.lower().endswith(".gguf"):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    cached = gguf_models_dir(home) / text
    if is_gguf_dir(cached):
        return cached.resolve()
    if text in KNOWN_MODELS:
        raise FileNotFoundError(f"model {text!r} has no GGUF in the cache ({cached}); run `cascade fetch-models "
                                "--backend llama.cpp` first")
    raise ValueError(f"{text!r} is neither a .gguf file, a GGUF model directory, nor a known model "
                     f"({', '.join(KNOWN_MODELS)}) for llama.cpp")
