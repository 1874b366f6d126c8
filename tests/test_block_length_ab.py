"""``benchmarks/block_length_ab.py``'s bookkeeping: the configurations it alternates, the rotation, the
paired ratios, and that a fixed-k block really runs without the controller (the bench itself loads the
real pair: see the script)."""

import pytest

from benchmark_scripts import import_benchmark
from cascade.config import EngineConfig, SamplingParams
from cascade.speculation import BlockLengthController
from test_engine import PROMPTS, make_cascade


@pytest.fixture(scope="module")
def ab():
    return import_benchmark("block_length_ab")


def test_configurations_and_rotation(ab):
    configs = ab.configurations([1, 3])
    assert [c[0] for c in configs] == ["target-only", "k=1", "k=3", "dynamic"]
    assert configs[-1] == ("dynamic", "speculative(k=3)", True)  # the controller's range is 0 .. max k
    assert [c[0] for c in ab.rotated(configs, 5)] == ["k=1", "k=3", "dynamic", "target-only"]


def test_summarise_pairs_each_block_with_target_only_of_its_cycle(ab):
    blocks = [{"batch": 4, "cycle": c, "config": cfg, "tokens_per_s": tps, "mean_k": mk}
              for c, base in enumerate((10.0, 20.0)) for cfg, tps, mk in
              (("target-only", base, float("nan")), ("k=1", 1.2 * base, float("nan")), ("dynamic", (1.1, 0.9)[c] * base, 0.5))]
    by = {s["config"]: s for s in ab.summarise(blocks)}
    assert by["k=1"]["ratio_vs_target_only"] == pytest.approx(1.2)  # the slower second cycle does not move it
    assert by["k=1"]["tokens_per_s"] == pytest.approx(18.0)
    assert by["dynamic"]["ratio_vs_target_only"] == pytest.approx(1.0)
    assert (by["dynamic"]["ratio_min"], by["dynamic"]["ratio_max"]) == (pytest.approx(0.9), pytest.approx(1.1))
    assert by["dynamic"]["ratio_lo95"] < 1.0 < by["dynamic"]["ratio_hi95"]
    assert by["dynamic"]["mean_k_dynamic"] == pytest.approx(0.5)


def test_controller_off_runs_the_policys_k_and_restores_the_controller(ab, tiny_pair_dirs):
    c = make_cascade(tiny_pair_dirs)
    c.engine.config = EngineConfig(max_rows=8, max_len=128, adaptive_k=True)
    c.engine.block_controller = ctrl = BlockLengthController()
    with ab.controller_off(c.engine):
        c.generate(PROMPTS[:2], SamplingParams(max_tokens=8), policy="speculative(k=2)")
    assert c.engine.block_controller is ctrl and c.engine.stats.block_length_rounds == {}
    c.generate(PROMPTS[:2], SamplingParams(max_tokens=8), policy="speculative(k=2)")
    assert sum(c.engine.stats.block_length_rounds.values()) >= 1
