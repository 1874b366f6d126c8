"""What every stage of a round shares besides its own model: the pair's vocabulary, the ids that end an
answer, the detokenizer (stop strings), the learned router, the engine's counters with the round's one host
read point (``fetch``), and the trace of chosen requests.

The engine builds one ``RoundContext`` and hands it to each stage (``cascade.drafting.Drafter``, ...), so a
stage reads what it needs through its arguments and this object, never through the engine's private
methods; the engine's own ``detokenize`` / ``router`` / ``trace`` / ``stats`` are this object's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable
from typing import Sequence as Seq

import torch

from cascade.host import fetch
from cascade.metrics import EngineStats

if TYPE_CHECKING:
    from cascade.router import DeferralRouter
    from cascade.scheduler import Sequence
    from cascade.trace import Trace


@dataclass
class RoundContext:
    """The round's shared, engine-wide state (see the module docstring)."""

    vocab_size: int  # the tokenizer's ids: every logits row is cut to them
    max_len: int  # positions per cache row, the smaller of the two runners'
    eos_token_ids: frozenset[int]
    eos_ids: torch.Tensor  # [E] int64, the same ids on the draft's device
    detokenize: Callable[[list[int]], str] | None = None  # ids -> text, for stop strings (None: ids only)
    router: DeferralRouter | None = None  # the learned router, for ``uses_router`` policies
    stats: EngineStats = field(default_factory=EngineStats)
    trace: Trace | None = None  # per-position statistics of chosen requests (``cascade.trace``)
    read: Callable[..., list[torch.Tensor]] = fetch  # the host read itself (``cascade.host.fetch``)

    def cut_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """A runner's logits [n, V_runner] -> [n, vocab_size]: the tokenizer's ids only (a view)."""
        return logits if logits.shape[-1] == self.vocab_size else logits[:, : self.vocab_size]

    def fetch(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Bring device results to the host: one sync (``cascade.host``), counted."""
        self.stats.host_syncs += 1
        return self.read(*tensors)

    def completes_stop(self, s: Sequence, extra: Seq[int] = ()) -> bool:
        """Does the text of ``s``'s output (followed by ``extra`` tokens) hold a stop string? Only the last few
        tokens are decoded: earlier ones were checked when they were emitted, so a new occurrence must end
        within the tail (a stop string of n characters spans at most n tokens, plus partial UTF-8)."""
        if not s.params.stop or self.detokenize is None:
            return False
        width = 2 * max(map(len, s.params.stop)) + 8
        start = max(len(s.prompt_ids), len(s.tokens) + len(extra) - width)
        text = self.detokenize((s.tokens[start:] + list(extra))[-width:])
        return any(stop in text for stop in s.params.stop)
