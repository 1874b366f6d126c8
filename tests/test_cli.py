"""The command line: --help explains every option; bad input gives a clear error and exit code 2."""

from __future__ import annotations

import pytest

from cascade.cli import build_parser, main


@pytest.mark.parametrize("command", ["generate", "serve", "fetch-models", "bench", "calibrate"])
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
    (["calibrate", "--policy", "speculative", "--budget", "0.2"], "--policy"),
    (["calibrate", "--policy", "chow", "--budget", "-1"], "--budget"),
    (["calibrate", "--policy", "chow", "--budget", "0.2", "--dataset", "nope"], "dataset"),
    (["serve", "--policy", "nope"], "unknown policy"),
    (["serve", "--policy", "chow", "--calibration", "x.json"], "--policy and --calibration"),
    (["serve", "--calibration", "/nonexistent/calibration.json"], "--calibration"),
    (["serve", "--max-rows", "0"], "--max-rows"),
    (["serve", "--target-url", "http://x", "--vllm-memory-fraction", "2"], "vllm_memory_fraction"),
    (["serve", "--target-url", "http://x", "--target-timeout", "0"], "target_timeout"),
    (["serve", "--target-url", "http://x", "--target-logprobs", "0"], "target_logprobs"),
])
def test_bad_input_exits_2_with_message(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


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
