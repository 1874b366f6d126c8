"""Model names -> validated checkpoint directories, offline: a local directory, a known model of the default
pair (in the cache ``cascade.weights`` fills), a model ``cascade convert`` wrote into the cache, or a Hugging
Face repo id found in the local hub cache. Nothing here downloads; importing it has no side effects."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cascade.weights import KNOWN_MODELS, SUPPORTED_MODEL_TYPES, cached_model_dir, is_fetched, models_dir

__all__ = ["hf_cache_snapshot", "hf_hub_cache", "resolve_model", "validate_checkpoint_dir"]


def validate_checkpoint_dir(path: Path | str) -> Path:
    """Check that ``path`` is a safetensors HF checkpoint of a supported family; returns it resolved."""
    path = Path(path).expanduser()
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory: it has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: unsupported model_type {model_type!r} in config.json; cascade runs "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return path.resolve()


def resolve_model(name_or_path: str | os.PathLike, home: Path | str | None = None) -> Path:
    """The validated checkpoint directory of, in this order: an existing directory; a known model name
    (looked up in the cache, never downloaded); a model converted into the cache (``cascade convert``:
    ``$CASCADE_HOME/models/<name>``); a Hugging Face repo id (``org/name`` or ``org/name@revision``) found
    in the local Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub), offline."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return validate_checkpoint_dir(path)
    models = models_dir(home)
    spec = KNOWN_MODELS.get(str(name_or_path))
    if spec is not None:
        model_dir = cached_model_dir(spec, home)
        if not is_fetched(spec, model_dir):
            raise FileNotFoundError(f"model {spec.name!r} is not in the cache ({model_dir}); run "
                                    "`cascade fetch-models --backend torch` first to download and convert the default pair")
        return validate_checkpoint_dir(model_dir)
    name = str(name_or_path)
    if "/" not in name and (models / name).is_dir():
        return validate_checkpoint_dir(models / name)
    if path.exists():
        raise ValueError(f"{path} is not a directory; pass a Hugging Face checkpoint directory or a model name")
    snapshot = hf_cache_snapshot(name) if name.count("/") == 1 and not name.startswith((".", "/", "~")) else None
    if snapshot is not None:
        return validate_checkpoint_dir(snapshot)
    raise ValueError(f"{name!r} is neither a known model ({', '.join(KNOWN_MODELS)}), a model in {models}, a "
                     f"repo id in the local Hugging Face cache ({hf_hub_cache()}) nor an existing checkpoint directory")


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser() / "hub"


def hf_cache_snapshot(repo: str) -> Path | None:
    """The snapshot directory of ``org/name[@revision]`` in the local hub cache, or None (nothing is fetched)."""
    repo_id, _, revision = repo.partition("@")
    folder = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    ref = folder / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else (revision or None)
    if commit is None:
        return None
    snapshot = folder / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None
