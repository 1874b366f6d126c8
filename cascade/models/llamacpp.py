"""A ``ModelRunner`` on llama.cpp: a GGUF file run as it ships (quantized, memory-mapped, no conversion), through
the maintained Python bindings ``llama-cpp-python``'s low-level API (ctypes over ``libllama``).

Why llama.cpp: it is the engine people run small models with on CPUs (hand-written quantized kernels, Q4_K_M at
a third of fp32's memory traffic); our torch runner is kept for what needs fp32 exactness (the bench's replay)
and for GPUs. Why these bindings: they are maintained, ship llama.cpp's source in their sdist (the extra builds
it for the machine at hand) and expose the C API one to one, which is all a runner needs: the per-sequence KV
cache, a batch of tokens with explicit positions and sequence ids, logits at the positions asked, and a KV
removal by position range.

How the contract maps onto llama.cpp:
- a cache row is a llama.cpp sequence id; the context is made with one KV stream per sequence
  (``kv_unified = false``, ``n_ctx = max_rows x max_len`` rounded up to llama.cpp's 256-cell granularity), so a
  row holds ``max_len`` positions whatever the other rows hold;
- ``forward_span`` is one ``llama_decode`` over every row's span (several when the tokens exceed ``n_batch``),
  each token at its explicit position, logits flagged on the last ``num_logits[i]`` tokens of span i; llama.cpp
  returns the flagged rows contiguous in batch order, copied once per call into the float32 result;
- ``truncate`` is ``llama_memory_seq_rm(row, new_length, -1)``: the cells are released, nothing is recomputed;
  ``free`` removes the whole sequence;
- ``decode`` is ``forward_span`` with one-token spans; ``decode_loop`` is ``decode`` calls with the argmax fed
  back (llama.cpp has no fused greedy loop to call).

Exactness: llama.cpp picks kernels by batch shape (quantized activations, chunked matrix products), so a position's
logits can differ in the last bits between a batch-1 decode and a k-token verification; greedy lossless decoding
then equals target-only only up to those near-ties, as with bf16 on our runner (``EngineConfig.exact_verify``
is the guarantee). The batch buffers are numpy arrays the ``llama_batch`` struct points into, filled by vector
assignments, not a Python loop per token. Importing this module loads nothing; the bindings are imported when a
runner is made.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cascade.models.base import decode_steps
from cascade.models.row_checks import as_int, check_decode, check_decode_loop, check_rows, check_spans, check_truncate

KV_CELL_GRANULARITY = 256  # llama.cpp pads each sequence's KV stream to a multiple of this many cells
KV_DTYPES = {"f16": "GGML_TYPE_F16", "f32": "GGML_TYPE_F32", "q8_0": "GGML_TYPE_Q8_0"}  # KV cache element types
INSTALL_HINT = ("the llama.cpp runner needs the bindings: `bash scripts/setup.sh llamacpp` (builds "
                "llama-cpp-python from its sdist for this machine; a few minutes)")


@functools.cache
def _bindings():
    """The ``llama_cpp`` module, its backend initialised once per process and llama.cpp's own log kept to
    warnings and errors (the callback is cached with the module, so it outlives every runner)."""
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from e
    llama_cpp.llama_backend_init()
    callback = _quiet_log_callback(llama_cpp)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return llama_cpp, callback


def _quiet_log_callback(ll):
    """A log callback that forwards llama.cpp's warnings and errors to stderr and drops its info lines."""
    import sys

    warn = getattr(ll, "GGML_LOG_LEVEL_WARN", 3)

    @ll.llama_log_callback
    def callback(level, text, _user):
        if level >= warn and level != getattr(ll, "GGML_LOG_LEVEL_CONT", 5):
            sys.stderr.write(text.decode("utf-8", "replace"))

    return callback


def default_threads() -> int:
    """Threads for llama.cpp: the CPUs this process may run on (llama.cpp's own tools default to the physical
    cores, which is the same on the 2-vCPU machines the figures in the README come from; on a machine with SMT,
    ``threads`` = the physical cores may be faster)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class LlamaCppRunner:
    """``ModelRunner`` over a GGUF file in llama.cpp (see the module docstring for the mapping).

    ``gguf_path``: the model file; ``max_rows`` / ``max_len``: cache rows (sequences) and positions per row;
    ``threads``: llama.cpp threads for decoding and batches (default: every CPU this process may use);
    ``n_batch``: the most tokens one ``llama_decode`` takes (a bigger call is split), ``n_ubatch`` its physical
    micro-batch; ``gpu_layers``: layers offloaded where the bindings were built with a GPU backend (0: CPU);
    ``kv_dtype``: the KV cache's element type, ``f16`` (llama.cpp's default), ``f32`` (exact keys and values: the
    tests compare against fp32 references) or ``q8_0``; ``flash_attn``: llama.cpp's fused attention on (True), off
    (False) or llama.cpp's choice (None, the default: on where the backend has it). Its CPU kernel takes the query
    in f16, about 1e-3 off fp32 logits; off, an f32 model with an f32 cache is within 1e-6 of transformers."""

    def __init__(self, gguf_path: str | Path, max_rows: int, max_len: int, *, threads: int | None = None,
                 n_batch: int = 512, n_ubatch: int | None = None, gpu_layers: int = 0, kv_dtype: str = "f16",
                 flash_attn: bool | None = None) -> None:
        for name, value in (("max_rows", max_rows), ("max_len", max_len), ("n_batch", n_batch)):
            if as_int(value) is None or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if threads is not None and (as_int(threads) is None or threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        if flash_attn not in (None, True, False):
            raise ValueError(f"flash_attn must be True, False or None (llama.cpp's choice), got {flash_attn!r}")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        path = Path(gguf_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        ll, _ = _bindings()
        self._ll = ll
        self.path = path
        self.max_rows = int(max_rows)
        self.max_len = int(max_len)
        self.threads = int(threads or default_threads())
        self.n_batch = int(n_batch)
        self.device = torch.device("cpu")

        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = int(gpu_layers)
        self._model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ValueError(f"{path}: llama.cpp could not load this GGUF (see its message above)")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.vocab_size = int(ll.llama_vocab_n_tokens(self._vocab))
        self.num_params = int(ll.llama_model_n_params(self._model))
        self.train_len = int(ll.llama_model_n_ctx_train(self._model))  # past it, llama.cpp warns (as transformers
        #   would run on): the torch runner does not refuse it either

        per_row = -(-self.max_len // KV_CELL_GRANULARITY) * KV_CELL_GRANULARITY
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = per_row * self.max_rows
        cparams.n_seq_max = self.max_rows
        cparams.kv_unified = False
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = min(int(n_ubatch or self.n_batch), self.n_batch)
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        cparams.type_k = cparams.type_v = getattr(ll, KV_DTYPES[kv_dtype])
        cparams.flash_attn_type = {None: ll.LLAMA_FLASH_ATTN_TYPE_AUTO, True: ll.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   False: ll.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        self.kv_dtype = kv_dtype
        self.flash_attn = flash_attn
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            ll.llama_model_free(self._model)
            self._model = None
            raise ValueError(f"{path}: llama.cpp could not make a context of {self.max_rows} rows x "
                             f"{self.max_len} positions (see its message above)")
        self._memory = ll.llama_get_memory(self._ctx)
        self._len = [0] * self.max_rows
        self._batch, self._buffers = self._make_batch(self.n_batch)
        self.calls = 0  # llama_decode calls

    # ------------------------------------------------------------------ batch buffers
    def _make_batch(self, capacity: int):
        """A ``llama_batch`` whose arrays are numpy buffers of ``capacity`` tokens (one sequence id each)."""
        ll = self._ll
        buf = {
            "token": np.zeros(capacity, dtype=np.int32),
            "pos": np.zeros(capacity, dtype=np.int32),
            "n_seq_id": np.ones(capacity, dtype=np.int32),
            "seq": np.zeros(capacity, dtype=np.int32),
            "logits": np.zeros(capacity, dtype=np.int8),
        }
        seq_ptr_type = ctypes.POINTER(ll.llama_seq_id)
        base = buf["seq"].ctypes.data
        buf["seq_ptrs"] = (seq_ptr_type * capacity)(*(ctypes.cast(base + 4 * i, seq_ptr_type) for i in range(capacity)))
        batch = ll.llama_batch()
        batch.n_tokens = 0
        batch.token = buf["token"].ctypes.data_as(ctypes.POINTER(ll.llama_token))
        batch.embd = ctypes.POINTER(ctypes.c_float)()
        batch.pos = buf["pos"].ctypes.data_as(ctypes.POINTER(ll.llama_pos))
        batch.n_seq_id = buf["n_seq_id"].ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.seq_id = buf["seq_ptrs"]
        batch.logits = buf["logits"].ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        return batch, buf

    # ------------------------------------------------------------------ contract
    def lengths(self, rows: Sequence[int]) -> list[int]:
        return [self._len[r] for r in check_rows(rows, self.max_rows)]

    def forward_span(self, rows: Sequence[int], spans: Sequence[Sequence[int]],
                     num_logits: Sequence[int] | None = None) -> torch.Tensor:
        rows, spans, num_logits = check_spans(self._len, rows, spans, num_logits, max_rows=self.max_rows,
                                              max_len=self.max_len, vocab_size=self.vocab_size)
        return self._run(rows, spans, num_logits)

    def _run(self, rows: list[int], spans: list[list[int]], num_logits: list[int]) -> torch.Tensor:
        """``forward_span`` on checked arguments: append each span to its row, logits of its last tokens."""
        tokens = np.fromiter((t for s in spans for t in s), dtype=np.int32, count=sum(len(s) for s in spans))
        seq = np.repeat(np.asarray(rows, dtype=np.int32), [len(s) for s in spans])
        pos = np.concatenate([np.arange(self._len[r], self._len[r] + len(s), dtype=np.int32)
                              for r, s in zip(rows, spans)])
        want = np.concatenate([np.arange(len(s), dtype=np.int32) >= len(s) - k for s, k in zip(spans, num_logits)])
        out = torch.empty(sum(num_logits), self.vocab_size, dtype=torch.float32)
        try:
            self._decode_flat(tokens, pos, seq, want, out)
        except BaseException:
            for r in rows:  # drop whatever part of the spans reached the cache: the rows are as before the call
                self._ll.llama_memory_seq_rm(self._memory, r, self._len[r], -1)
            raise
        for r, s in zip(rows, spans):
            self._len[r] += len(s)
        return out

    def _decode_flat(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, want: np.ndarray,
                     out: torch.Tensor) -> None:
        """``tokens / pos / seq / want [N]``: the flat batch (``want``: return this position's logits) ->
        ``out [want.sum(), V]`` in order, in ``llama_decode`` calls of at most ``n_batch`` tokens."""
        ll, buf, V = self._ll, self._buffers, self.vocab_size
        done = 0
        for start in range(0, len(tokens), self.n_batch):
            stop = min(start + self.n_batch, len(tokens))
            n = stop - start
            buf["token"][:n] = tokens[start:stop]
            buf["pos"][:n] = pos[start:stop]
            buf["seq"][:n] = seq[start:stop]
            buf["logits"][:n] = want[start:stop]
            self._batch.n_tokens = n
            rc = ll.llama_decode(self._ctx, self._batch)
            self.calls += 1
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} for {n} tokens over rows "
                                   f"{sorted(set(seq[start:stop].tolist()))}")
            n_out = int(want[start:stop].sum())
            if n_out:
                ptr = ll.llama_get_logits(self._ctx)
                logits = np.ctypeslib.as_array(ptr, shape=(n_out, V))  # llama.cpp's buffer, no copy
                out[done:done + n_out].copy_(torch.from_numpy(logits))
                done += n_out

    def decode(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``rows [B]`` int64, ``ids [B]`` int64 -> float32 logits ``[B, V]``: one token per row."""
        row_list, ids_t = check_decode(self._len, rows, ids, max_rows=self.max_rows, max_len=self.max_len,
                                       vocab_size=self.vocab_size)
        return self._run(row_list, [[int(t)] for t in ids_t.tolist()], [1] * len(row_list))

    def decode_loop(self, rows: torch.Tensor | Sequence[int], ids: torch.Tensor, steps: int,
                    vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` greedy ``decode`` calls with the argmax (over ids < ``vocab``) fed back."""
        row_list, vocab = check_decode_loop(self._len, rows, steps, vocab, max_rows=self.max_rows,
                                            max_len=self.max_len, vocab_size=self.vocab_size)
        return decode_steps(self, row_list, ids, steps, vocab)

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        rows, new = check_truncate(self._len, rows, lengths, max_rows=self.max_rows)
        for r, n in zip(rows, new):
            if n < self._len[r]:
                self._ll.llama_memory_seq_rm(self._memory, r, n, -1)
                self._len[r] = n

    def free(self, rows: Sequence[int]) -> None:
        for r in check_rows(rows, self.max_rows):
            self._ll.llama_memory_seq_rm(self._memory, r, -1, -1)
            self._len[r] = 0

    # ------------------------------------------------------------------ lifetime
    def describe(self) -> dict:
        """What runs the model, for the bench's machine record."""
        return {"backend": "llama.cpp", "gguf": self.path.name, "threads": self.threads, "n_batch": self.n_batch,
                "kv_dtype": self.kv_dtype, "flash_attn": self.flash_attn,
                "llama_cpp_python": getattr(self._ll, "__version__", "?"),
                "system_info": self._ll.llama_print_system_info().decode("utf-8", "replace").strip()}

    def close(self) -> None:
        """Free the context and the model (the runner is unusable afterwards)."""
        if getattr(self, "_ctx", None):
            self._ll.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            self._ll.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass


__all__ = ["INSTALL_HINT", "LlamaCppRunner", "default_threads"]
