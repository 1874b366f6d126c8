"""``cascade.models.backend``: which runner the default pair runs on (``--backend auto|torch|llama.cpp``), and what
``cascade fetch-models --backend auto`` prepares, on a machine told what it has (bindings, GGUFs, CUDA)."""

from __future__ import annotations

import pytest

from cascade.models import backend


@pytest.fixture
def machine(monkeypatch):
    """Set what the machine has: ``machine(bindings=..., ggufs=..., cuda=...)``."""

    def set_(bindings: bool = True, ggufs: bool = True, cuda: bool = False) -> None:
        monkeypatch.setattr(backend, "llamacpp_installed", lambda: bindings)
        monkeypatch.setattr(backend, "default_pair_on_llamacpp", lambda home=None: ggufs)
        monkeypatch.setattr(backend, "cuda_present", lambda: cuda)
        monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)

    return set_


def test_auto_picks_llamacpp_on_a_cpu_with_the_bindings_and_both_ggufs(machine):
    machine()
    assert backend.pick_backend("auto", "auto", "auto") == "llama.cpp"
    assert backend.pick_backend("auto", "cpu", None) == "llama.cpp"


@pytest.mark.parametrize("has, device, dtype", [
    (dict(bindings=False), "auto", "auto"),  # the llamacpp extra is not installed
    (dict(ggufs=False), "auto", "auto"),  # fetched for torch only
    (dict(cuda=True), "auto", "auto"),  # a GPU: the torch runner's CUDA path
    ({}, "cuda", "auto"),
    ({}, "cpu", "float32"),  # a dtype is the torch runner's choice
    ({}, "cpu", "bfloat16"),
])
def test_auto_keeps_the_torch_runner_otherwise(machine, has, device, dtype):
    machine(**has)
    assert backend.pick_backend("auto", device, dtype) == "torch"


def test_an_explicit_backend_is_kept_and_a_bad_one_is_named(machine):
    machine(bindings=False, ggufs=False)
    assert backend.pick_backend("llama.cpp", "cpu", "float32") == "llama.cpp"
    assert backend.pick_backend("torch") == "torch"
    with pytest.raises(ValueError, match="backend"):
        backend.pick_backend("gguf")


def test_only_the_unnamed_members_follow_the_backend():
    assert backend.default_member_name(None, "llama.cpp") == "llama.cpp:"
    assert backend.default_member_name(None, "torch") is None
    assert backend.default_member_name("my/model", "llama.cpp") == "my/model"


@pytest.mark.parametrize("has, want", [({}, "llama.cpp"), (dict(cuda=True), "torch"), (dict(bindings=False), "torch")])
def test_fetch_models_auto_prepares_what_generate_will_run(machine, has, want):
    machine(**has)
    assert backend.fetch_backend("auto") == want
    assert backend.fetch_backend("both") == "both"


def test_the_cli_passes_the_backend_to_the_pair():
    from cascade.cli import build_parser
    from cascade.cli.options import pair_kwargs

    for command in (["generate", "hi"], ["serve"]):
        args = build_parser().parse_args(command)
        assert pair_kwargs(args)["backend"] == "auto"
        args = build_parser().parse_args(command + ["--backend", "torch"])
        assert pair_kwargs(args)["backend"] == "torch"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--backend", "gguf"])
    assert not hasattr(build_parser().parse_args(["bench"]), "backend")  # the bench is the fp32 runner's, always
