"""``benchmarks/kernel_bench.py``'s HBM bounds come from the device's name: every listed GPU resolves to its
own entry (a name that contains another's must not take that one's bandwidth), and an override wins."""

import pytest

from benchmark_scripts import import_benchmark


@pytest.fixture(scope="module")
def kb():
    return import_benchmark("kernel_bench")


@pytest.mark.parametrize("name, gbps", [
    ("NVIDIA H200", 4800.0), ("NVIDIA GH200 480GB", 4000.0), ("NVIDIA H100 80GB HBM3", 3350.0),
    ("NVIDIA H100 PCIe", 2000.0), ("NVIDIA H100 NVL", 3900.0), ("NVIDIA A100-SXM4-80GB", 2039.0),
    ("NVIDIA A100 80GB PCIe", 1935.0), ("NVIDIA A100-SXM4-40GB", 1555.0), ("NVIDIA L40S", 864.0),
    ("NVIDIA L4", 300.0), ("NVIDIA A10G", 600.0), ("Tesla T4", 320.0), ("NVIDIA GeForce RTX 4090", 1008.0),
])
def test_each_gpu_gets_its_own_bandwidth(kb, name, gbps):
    assert kb.peak_gbps(name, None) == gbps


def test_every_key_is_reachable_and_overrides_win(kb):
    for key, gbps in kb.PEAK_GBPS:  # no entry is shadowed by an earlier key contained in it
        assert kb.peak_gbps(f"NVIDIA {key.upper()}", None) == gbps, key
    assert kb.peak_gbps("NVIDIA H200", 1234.0) == 1234.0
    assert kb.peak_gbps("Some Unknown Accelerator", None) is None
