"""What a long step shows while it runs, on stderr: a line, a byte progress bar, a spinner with its
duration (rich). Shared by the model fetch (``cascade.weights``) and the GGUF conversion
(``cascade.gguf_convert``); every helper is a no-op when ``enabled`` is False."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


def console():
    from rich.console import Console

    return Console(stderr=True)


def escape_markup(text: str) -> str:
    """Escape rich markup (model names such as "[qwen2.5-…]" would otherwise read as tags)."""
    from rich.markup import escape as _escape

    return _escape(text)


def say(msg: str, enabled: bool) -> None:
    if enabled:
        console().print(msg, highlight=False, markup=False)


@contextlib.contextmanager
def byte_progress(desc: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(nbytes)``; draws a rich byte progress bar when enabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    cols = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn())
    with Progress(*cols, console=console()) as bar:
        task = bar.add_task(escape_markup(desc), total=total)
        yield lambda n: bar.advance(task, n)


@contextlib.contextmanager
def status(msg: str, enabled: bool, spinner: bool = True) -> Iterator[None]:
    """A spinner with a message while a step without measurable progress runs, then its duration.
    ``spinner=False`` prints a start line instead, for steps that draw their own progress bar."""
    if not enabled:
        yield
        return
    t0 = time.perf_counter()
    if not spinner:
        say(f"{msg}…", True)
        yield
        say(f"{msg}: done in {time.perf_counter() - t0:.1f} s", True)
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console(),
                  transient=True) as bar:
        bar.add_task(escape_markup(msg), total=None)
        yield
    say(f"{msg.rstrip('.… ')}: done in {time.perf_counter() - t0:.1f} s", True)
