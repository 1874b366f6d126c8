"""How a row's vocabulary is split over several programs (split-K / flash-decoding style), shared by the
confidence and verify kernels. Plain Python: no triton import."""

from __future__ import annotations

import math

import torch

PROGRAMS_PER_SM = 4  # split target: enough resident programs to hide HBM latency
DEFAULT_NUM_SMS = 132  # H100 SXM; used off-CUDA (interpreter) where there is no device to ask


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def choose_num_splits(rows: int, vocab: int, block_v: int, num_sms: int) -> int:
    """Programs per row: enough that rows * splits >= PROGRAMS_PER_SM * num_sms, at most one tile of
    BLOCK_V per split; 1 (one program per row, one launch) once the rows alone fill the GPU."""
    tiles = max(1, math.ceil(vocab / block_v))
    if rows <= 0:
        return 1
    return max(1, min(tiles, math.ceil(PROGRAMS_PER_SM * num_sms / rows)))


def split_layout(vocab: int, block_v: int, num_splits: int) -> tuple[int, int]:
    """(chunk, num_splits): chunk is a multiple of block_v; no split is empty."""
    tiles = max(1, math.ceil(vocab / block_v))
    num_splits = max(1, min(num_splits, tiles))
    chunk = math.ceil(tiles / num_splits) * block_v
    return chunk, max(1, math.ceil(vocab / chunk))
