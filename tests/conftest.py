"""Test-wide setup. TRITON_INTERPRET must be set before triton is first imported, so it is set here,
at the top of the first module pytest imports; the kernels then run on CPU through Triton's
interpreter and are compared against their torch references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
