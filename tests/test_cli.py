"""The command line: --help explains every option; bad input gives a clear error and exit code 2."""

from __future__ import annotations

import pytest

from cascade.cli import build_parser, main


@pytest.mark.parametrize("command", ["generate", "serve", "target-serve", "fetch-models", "bench", "calibrate",
                                     "train-router"])
def test_help_lists_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    gen = parser._subparsers._group_actions[0].choices[command]
    for action in gen._actions:
        for opt in action.option_strings:
            assert opt in text
        assert action.help, f"option {action.option_strings} has no help"


def test_top_level_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("generate", "serve", "fetch-models", "bench", "calibrate"))


@pytest.mark.parametrize("argv, needle", [
    (["generate", "hi", "--policy", "nope"], "unknown policy"),
    (["generate", "hi", "--policy", "chow", "--alpha", "3"], "alpha"),
    (["generate", "hi", "--max-tokens", "0"], "max_tokens"),
    (["generate", "hi", "--param", "oops"], "name=value"),
    (["bench", "--policies", "chow,nope"], "--policies"),
    (["bench", "--dataset", "nope"], "dataset"),
    (["bench", "--real-check", "nope:0.2"], "--real-check"),
    (["bench", "--real-check", "target"], "--real-check"),
    (["bench", "--real-check", "target:lots"], "--real-check"),
    (["bench", "--real-check", "passes:-1"], "--real-check"),
    (["calibrate", "--policy", "speculative", "--budget", "0.2"], "--policy"),
    (["calibrate", "--policy", "chow", "--budget", "-1"], "--budget"),
    (["calibrate", "--policy", "chow", "--budget", "0.2", "--limit-axis", "ttft"], "--limit-axis"),
    (["calibrate", "--policy", "chow", "--budget", "0.2", "--limit-axis", "latency:1"], "--limit-axis"),
    (["calibrate", "--policy", "chow", "--budget", "0.2", "--dataset", "nope"], "dataset"),
    (["serve", "--policy", "nope"], "unknown policy"),
    (["serve", "--policy", "chow", "--calibration", "x.json"], "--policy and --calibration"),
    (["serve", "--calibration", "/nonexistent/calibration.json"], "--calibration"),
    (["serve", "--max-rows", "0"], "--max-rows"),
    (["serve", "--keepalive", "0"], "--keepalive"),
    (["generate", "hi", "--min-p", "3"], "min_p"),
    (["serve", "--target-url", "http://x", "--vllm-memory-fraction", "2"], "vllm_memory_fraction"),
    (["serve", "--target-url", "http://x", "--target-timeout", "0"], "target_timeout"),
    (["serve", "--target-url", "http://x", "--target-logprobs", "0"], "target_logprobs"),
    (["target-serve", "--max-rows", "0"], "--max-rows"),
    (["target-serve", "--max-logprobs", "0"], "--max-logprobs"),
    (["target-serve", "--target", "/nonexistent/model", "--", "--tensor-parallel-size", "2"], "after '--'"),
])
def test_bad_input_exits_2_with_message(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_arguments_after_a_double_dash_are_only_for_target_serve(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--", "--x"])
    assert exc.value.code == 2 and "only taken by target-serve" in capsys.readouterr().err


def test_target_serve_hands_vllm_its_command_line(tiny_pair_dirs):
    """--target vllm:DIR becomes `vllm serve` with the verify middleware, prefix caching and the passthrough."""
    from cascade.cli.target_serve import VERIFY_MIDDLEWARE, vllm_command

    args = build_parser().parse_args(["target-serve", "--target", f"vllm:{tiny_pair_dirs[1]}", "--port", "9001",
                                      "--max-logprobs", "-1", "--dtype", "float32"])
    cmd = vllm_command(args, str(tiny_pair_dirs[1]), ["--tensor-parallel-size", "2"])
    joined = " ".join(cmd)
    assert f"--middleware {VERIFY_MIDDLEWARE}" in joined and "--enable-prefix-caching" in cmd
    assert "--max-logprobs -1" in joined and "--port 9001" in joined and "--dtype float32" in joined
    assert cmd[-2:] == ["--tensor-parallel-size", "2"]
    import importlib

    module, name = VERIFY_MIDDLEWARE.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), name))  # vLLM imports it by this path


def test_serve_with_an_unreachable_target_url_exits_2(tiny_pair_dirs, capsys):
    argv = ["serve", "--draft", str(tiny_pair_dirs[0]), "--target-url", "http://127.0.0.1:9", "--target-timeout", "2",
            "--target-retries", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9" in err and "failed after 1 tries" in err


def test_version_flag_and_attribute(capsys):
    import cascade

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"cascade {cascade.__version__}" and cascade.__version__[0].isdigit()


def _subparser(name):
    return build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("command", ["generate", "serve", "bench", "calibrate", "train-router"])
def test_every_command_that_loads_the_pair_shares_the_model_options(command):
    """One definition (cascade.cli.options.add_model_options): the same flags, --device auto everywhere, and
    --dtype auto except the benchmark commands, which default to float32 (replay is exact there)."""
    args = build_parser().parse_args([command] + (["--policy", "chow", "--budget", "0.2"] if command == "calibrate" else []))
    assert args.device == "auto"
    assert args.dtype == ("auto" if command in ("generate", "serve") else "float32")
    flags = {opt for a in _subparser(command)._actions for opt in a.option_strings}
    assert {"--draft", "--target", "--device", "--dtype", "--max-len"} <= flags
    dtype = next(a for a in _subparser(command)._actions if "--dtype" in a.option_strings)
    assert dtype.choices == ["auto", "float32", "bfloat16", "float16"]


def test_serve_and_generate_share_the_target_options():
    serve = {opt for a in _subparser("serve")._actions for opt in a.option_strings}
    generate = {opt for a in _subparser("generate")._actions for opt in a.option_strings}
    target = {"--target-url", "--target-model", "--target-api-key", "--on-target-error", "--target-timeout",
              "--exact-verify"}
    assert target <= serve and target <= generate


def test_device_auto_resolves_to_what_the_machine_has():
    import torch

    from cascade.config import EngineConfig, resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    cfg = EngineConfig(device="auto", dtype="auto")
    assert cfg.device == resolve_device("auto") and cfg.dtype is None


def test_serve_without_the_server_extra_names_the_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "cascade[server]" in err and "fastapi" in err


def test_serve_reads_the_api_key_from_the_environment(monkeypatch):
    seen = {}

    def fake_app(cascade, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    class FakeCascade:
        draft = target = None

        class engine:
            class config:
                device = "cpu"

        @staticmethod
        def from_pretrained(*a, **k):
            seen["pair"] = k
            return FakeCascade()

        def default_policy(self):
            return "speculative"

    monkeypatch.setenv("CASCADE_API_KEY", "from-env")
    monkeypatch.setattr("cascade.library.Cascade", FakeCascade)
    monkeypatch.setattr("cascade.server.create_app", fake_app)
    with pytest.raises(SystemExit):
        main(["serve"])
    assert seen["api_key"] == "from-env" and seen["pair"]["device"] == "auto"
    with pytest.raises(SystemExit):
        main(["serve", "--api-key", "flag"])
    assert seen["api_key"] == "flag"


def test_the_target_api_key_reaches_the_remote_target(monkeypatch):
    from cascade.cli.options import pair_kwargs

    monkeypatch.setenv("CASCADE_TARGET_API_KEY", "env-key")
    args = build_parser().parse_args(["serve", "--target-url", "http://gpu:8000"])
    assert pair_kwargs(args)["vllm_options"].api_key == "env-key"
    args = build_parser().parse_args(["serve", "--target-url", "http://gpu:8000", "--target-api-key", "sekret-42"])
    options = pair_kwargs(args)["vllm_options"]
    assert options.api_key == "sekret-42" and "sekret-42" not in repr(options)  # never printed with the options




def test_generate_says_what_a_request_level_policy_decided():
    from cascade.cli.generate import _routing
    from cascade.metrics import RequestStats
    from cascade.policies import parse_policy

    routed = RequestStats(draft_tokens=7, routed_to_target=1)
    assert "routed to the target" in _routing(parse_policy("quantile(tau=-1)"), routed) and "7 draft tokens" in _routing(
        parse_policy("quantile"), routed)
    assert "kept" in _routing(parse_policy("quantile"), RequestStats(draft_tokens=7))
    assert _routing(parse_policy("chow(alpha=0.2)"), routed) == ""  # token-level policies have no such decision


def test_real_check_option():
    from cascade.cli.bench import real_checks

    assert real_checks(None) == (("target_fraction", 0.2), ("passes_per_token", 0.2))
    assert real_checks(["none"]) == ()
    assert real_checks(["ttft:1.5", "time:0.8"]) == (("ttft", 1.5), ("modelled_time", 0.8))


def test_calibrate_passes_its_axis_limits_beside_the_dataset_limits(monkeypatch):
    """--limit-axis and --dataset-limit are different limits: the calibration gets the axis ones."""
    import cascade.bench.calibrate as calibrate_mod
    import cascade.bench.datasets as datasets_mod
    import cascade.bench.harness as harness_mod

    seen = {}

    class Stop(Exception):
        pass

    def fake_calibrate(bench, families, budget, datasets, *args, **kwargs):
        seen.update(families=families, datasets=datasets, **kwargs)
        raise Stop

    monkeypatch.setattr(calibrate_mod, "calibrate", fake_calibrate)
    monkeypatch.setattr(datasets_mod, "load_dataset", lambda name: [f"{name}-{i}" for i in range(200)])
    monkeypatch.setattr(datasets_mod, "select", lambda problems, limit, seed: problems[:limit])
    monkeypatch.setattr(harness_mod, "Bench", lambda cfg: object())
    with pytest.raises(Stop):
        main(["calibrate", "--policy", "takeover,chow", "--budget", "0.2", "--limit-axis", "ttft:1.5", "--limit-axis",
              "time:1", "--dataset", "humaneval", "--dataset-limit", "humaneval=7"])
    assert seen["limits"] == {"ttft": 1.5, "modelled_time": 1.0}
    assert seen["families"] == ["takeover", "chow"] and len(seen["datasets"]["humaneval"]) == 7
