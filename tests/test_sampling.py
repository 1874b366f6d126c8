"""Each request's random streams (``cascade.sampling.RequestRng``): one generator per device, seeded,
snapshot and restore, and every draw of a round made with a generator on the device of the tensor it draws
from (on a GPU, a CPU generator meeting CUDA probabilities in ``torch.multinomial`` raises)."""

from __future__ import annotations

import pytest
import torch

from cascade import SamplingParams
from cascade.sampling import RequestRng, _mix

from test_engine import PROMPTS, make_cascade


def test_one_generator_per_device_seeded_from_the_request():
    a, b = RequestRng(7), RequestRng(7)
    assert a.on("cpu") is a.on(torch.device("cpu"))
    assert a.devices == [torch.device("cpu")]
    assert torch.equal(torch.rand(5, generator=a.on("cpu")), torch.rand(5, generator=b.on("cpu")))
    assert not torch.equal(torch.rand(5, generator=RequestRng(8).on("cpu")), torch.rand(5, generator=RequestRng(7).on("cpu")))
    assert RequestRng(None).seed != RequestRng(None).seed  # fresh entropy without a seed


def test_devices_get_streams_of_their_own():
    seeds = {_mix(7, "cuda:0"), _mix(7, "cuda:1"), 7}
    assert len(seeds) == 3
    assert all(0 <= s < 2**63 for s in seeds)


def test_state_restores_every_stream_and_drops_later_ones():
    r = RequestRng(3)
    torch.rand(4, generator=r.on("cpu"))
    state = r.get_state()
    first = torch.rand(6, generator=r.on("cpu"))
    r.set_state(state)
    assert torch.equal(torch.rand(6, generator=r.on("cpu")), first)
    r.set_state({})  # a snapshot taken before any draw: the stream restarts from the seed
    assert r.devices == []
    assert torch.equal(torch.rand(4, generator=r.on("cpu")), torch.rand(4, generator=RequestRng(3).on("cpu")))


@pytest.fixture
def device_checked_draws(monkeypatch):
    """Make every generator-driven draw assert its generator is on the device of the tensor it draws on."""
    seen: list[tuple[str, str]] = []
    multinomial, rand, randint = torch.multinomial, torch.rand, torch.randint

    def checked_multinomial(probs, n, *args, generator=None, **kw):
        if generator is not None:
            seen.append((str(generator.device), str(probs.device)))
            assert generator.device == probs.device
        return multinomial(probs, n, *args, generator=generator, **kw)

    def checked(fn):
        def draw(*args, generator=None, device=None, **kw):
            if generator is not None:
                out_dev = torch.device(device) if device is not None else torch.device("cpu")
                seen.append((str(generator.device), str(out_dev)))
                assert generator.device == out_dev
            return fn(*args, generator=generator, device=device, **kw)
        return draw

    monkeypatch.setattr(torch, "multinomial", checked_multinomial)
    monkeypatch.setattr(torch, "rand", checked(rand))
    monkeypatch.setattr(torch, "randint", checked(randint))
    return seen


@pytest.mark.parametrize("policy", ["speculative", "token-v3(alpha=0.2)", "opt(alpha=0.2)", "target-only"])
def test_every_draw_of_a_round_uses_a_generator_on_the_tensors_device(tiny_pair_dirs, device_checked_draws, policy):
    c = make_cascade(tiny_pair_dirs, max_rows=4)
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=i) for i in range(len(PROMPTS))]
    c.generate(PROMPTS, params, policy=policy)
    assert device_checked_draws  # the sampled rounds drew through the checked functions
    devices = {c.draft.device, c.target.device}
    assert {torch.device(d) for d, _ in device_checked_draws} <= devices
