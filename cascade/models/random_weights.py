"""Seeded random weights of a decoder config's shapes, under its family's parameter names: what the
benchmarks' cost tables and the GPU suite run, where no checkpoint travels (``factory.random_runner``).

``RandomWeights`` is a read-only mapping that makes each tensor when the runner reads it (peak memory stays at
one model), on a chosen device and dtype: norms are ones, everything else N(0, 0.02), each tensor seeded by
its name so a weight does not depend on the order it is read in.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

import torch

from cascade.models.decoder_weights import parameter_shapes
from cascade.models.loading import DecoderConfig


class RandomWeights(Mapping):
    """Parameter name -> a random tensor of its shape, made on access (see the module docstring)."""

    def __init__(self, config: DecoderConfig, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.config, self.seed, self.device, self.dtype = config, seed, torch.device(device), dtype
        self.shapes = parameter_shapes(config)
        names = config.family.names
        self._norms = {names.norm} | {n.format(i=i) for i in range(config.num_layers)
                                      for n in (names.ln1, names.ln2, names.q_norm, names.k_norm)}

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name in self._norms:
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        g = torch.Generator(device=self.device).manual_seed(self.seed + zlib.crc32(name.encode()))
        return torch.empty(shape, device=self.device, dtype=self.dtype).normal_(0.0, 0.02, generator=g)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)
