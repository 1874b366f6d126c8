"""Compact decoder for every family of ``cascade.models.families`` (Llama, Qwen2, Qwen3, Mistral, Phi-3: they
differ in data, not code) with a batched, ragged KV cache. Runners are made by ``cascade.models.factory``.

``LlamaRunner`` implements ``cascade.models.base.ModelRunner``:

* the KV cache is preallocated, ``[layers, 2, max_rows + 1, kv_heads, max_len, head_dim]`` (the last row
  is a scratch row that padded CUDA-graph slots write into); each row has a length, kept both as a host
  list (bookkeeping, validation) and as a device tensor (read by the graph-captured decode step);
* ``forward_span`` packs every new token of every row into one ``[T, hidden]`` matrix for the linear
  layers (no padding in the GEMMs), writes K/V at ``length[row] + i`` and attends over the row's cache
  with a causal mask; the LM head runs only on the positions whose logits were asked for;
* ``decode`` is the one-token path; on CUDA it and every ``forward_span`` whose spans fit the largest
  token bucket (a verify pass: catch-up + block + bonus) replay a CUDA graph per (batch bucket, token
  bucket), captured at start-up (``cascade.models.cuda_graphs``). A captured step attends through the
  cache attention kernel (``cascade.kernels.attention``), which reads each row's K / V in place up to the
  row's own length, so its cost follows the live context and not ``max_len``;
* one transformer-block body (``_layers``) serves the eager ragged pass and the static captured step;
  they differ only in how attention reads the cache;
* rollback (``truncate``) and ``free`` only change lengths: stale positions are masked and overwritten.

GQA is done without copying K/V per query head: the ``g = heads / kv_heads`` query heads that share a
KV head are folded into the query-length axis, so one plain SDPA call serves all of them.

Weights (``cascade.models.decoder_weights``: read by name, shapes checked, laid out per device): q/k/v and
gate/up are fused into one weight each. On CPU in float32 the weights are
prepacked for oneDNN (``torch.ops.mkldnn._linear_pointwise``); elsewhere ``F.linear``. On a 2-core AVX2
EPYC (``benchmarks/results/runner_cost_cpu-avx2-2c.csv``, context 300, batch 1) a 5-token forward costs
1.17x (0.5B) / 1.36x (1.5B) a 1-token step, against 2.3x / 3.0x for transformers eager (MKL GEMM with
2+ rows runs at a third of GEMV bandwidth), and the step itself is 25-30 % faster than transformers'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from cascade.models.base import decode_steps
from cascade.models.row_checks import (as_int, as_list, check_decode, check_decode_loop, check_rows, check_spans,
                                       check_truncate)
from cascade.models.decoder_weights import LINEAR_IMPLS, Linear, load_decoder_weights, onednn_available
from cascade.models.loading import (
    DecoderConfig,
    default_dtype,
    load_checkpoint,
    resolve_dtype,
    rope_inv_freq,
)

__all__ = ["LINEAR_IMPLS", "Linear", "LlamaRunner", "default_dtype"]

def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # as transformers' LlamaRMSNorm / Qwen2RMSNorm: statistics in fp32, weight applied in model dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos, sin: [T, 1, D]
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class _Plan:
    """Host-side index metadata of one ragged forward pass (shared by all layers)."""

    __slots__ = (
        "B",
        "Lk",
        "T",
        "cos",
        "mask",
        "nmax",
        "pad_idx",
        "row_slice",
        "rows_t",
        "sin",
        "tok_pos",
        "tok_rows",
        "uniform",
        "valid_idx",
    )


class LlamaRunner:
    """In-process runner for one Llama / Qwen2 / Mistral checkpoint (implements ``ModelRunner``).

    Args:
        config: checkpoint shape (``DecoderConfig``; see ``cascade.models.loading``).
        state_dict: HF parameter names -> tensors (any dtype/device; copied into ``dtype``/``device``).
        max_rows: KV-cache rows (sequences in flight).
        max_len: positions per row.
        device: "cpu" or "cuda[:n]".
        dtype: None (per device, see ``default_dtype``), torch dtype or "float32"/"bfloat16"/"float16".
        linear_impl: "auto" (oneDNN prepacked on CPU fp32, else torch), "torch" or "onednn".
        cuda_graphs: True: on CUDA, capture the static steps (decode and short spans) per (batch bucket, token
            bucket) at start-up (ignored on CPU); False: eager everywhere; "uncaptured": run the same padded
            static steps without capturing them, on any device (tests of the CUDA path's logic on CPU).
        graph_tokens: the token buckets of the static steps (1 = decode; the largest bounds the spans that
            take the static path, longer ones such as prompts run eager).
        graph_loops: step counts of ``decode_loop`` (the draft's greedy block) captured at start-up for every
            batch bucket; other counts are captured when first met.
    """

    def __init__(
        self,
        config: DecoderConfig,
        state_dict: Mapping[str, torch.Tensor],
        max_rows: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        linear_impl: str = "auto",
        cuda_graphs: bool | str = True,
        graph_tokens: Sequence[int] = (1, 2, 4, 8, 16),
        graph_loops: Sequence[int] = (),
    ):
        if as_int(max_rows) is None or max_rows < 1:
            raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        if as_int(max_len) is None or max_len < 1:
            raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}")
        max_rows, max_len = int(max_rows), int(max_len)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r} is not a torch device: {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available")
        self.dtype = resolve_dtype(dtype, self.device)
        if linear_impl not in LINEAR_IMPLS:
            raise ValueError(f"linear_impl must be one of {LINEAR_IMPLS}, got {linear_impl!r}")
        if linear_impl == "auto":
            cpu_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
            linear_impl = "onednn" if cpu_fp32 and onednn_available() else "torch"
        elif linear_impl == "onednn" and (self.device.type != "cpu" or not onednn_available()):
            raise ValueError("linear_impl 'onednn' needs a CPU device with mkldnn available")
        elif linear_impl == "onednn" and self.dtype != torch.float32 and not (
            self.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        ):
            raise ValueError(f"linear_impl {linear_impl!r} with dtype {self.dtype} is not supported on this CPU")
        self.linear_impl = linear_impl
        if config.sliding_window is not None and max_len > config.sliding_window:
            raise ValueError(f"max_len {max_len} exceeds the model's sliding_window {config.sliding_window} "
                             "(sliding-window attention is not implemented; use max_len <= sliding_window)")
        self.config = config
        self.vocab_size = config.vocab_size
        self.max_rows = max_rows
        self.max_len = max_len
        self.num_params = config.num_params
        w = load_decoder_weights(config, state_dict, self.device, self.dtype, linear_impl)
        self.embed, self.layers, self.norm, self.lm_head = w.embed, w.layers, w.norm, w.lm_head

        c = config
        self.scratch_row = max_rows  # padded graph slots write here; never handed out
        self.cache = torch.zeros(
            (c.num_layers, 2, max_rows + 1, c.num_kv_heads, max_len, c.head_dim), dtype=self.dtype, device=self.device
        )
        self._len = [0] * max_rows  # host lengths
        self._len_dev = torch.zeros(max_rows + 1, dtype=torch.long, device=self.device)  # device mirror (+scratch)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(c))
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos().to(self.device, self.dtype)  # [max_len, D]
        self._sin = emb.sin().to(self.device, self.dtype)
        self._arange_len = torch.arange(max_len, device=self.device)
        self._group = c.num_heads // c.num_kv_heads
        if cuda_graphs not in (True, False, "uncaptured"):
            raise ValueError(f"cuda_graphs must be True, False or 'uncaptured', got {cuda_graphs!r}")
        self._graphs = None  # the static steps (``GraphedSteps``), captured or not
        if cuda_graphs == "uncaptured" or (cuda_graphs is True and self.device.type == "cuda"):
            from cascade.models.cuda_graphs import GraphedSteps

            # a bucket longer than a row cannot be warmed up or captured (it writes positions 0 .. n - 1 of
            # the scratch row); longer spans run eagerly, as those past the largest bucket do
            tokens = sorted(n for n in set(int(n) for n in graph_tokens) | {1} if n <= max_len)
            self._graphs = GraphedSteps(self._static_step, max_rows, tokens, self.scratch_row, self.device,
                                        capture=cuda_graphs is True, width=self.vocab_size)
            self._graphs.capture_all(graph_loops)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        max_rows: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        **options,
    ) -> LlamaRunner:
        """Load an HF checkpoint directory (config.json + model.safetensors or a sharded index)."""
        config, state = load_checkpoint(path)
        return cls(config, state, max_rows, max_len, device=device, dtype=dtype, **options)

    @classmethod
    def from_hf_model(cls, model, max_rows: int, max_len: int, **options) -> LlamaRunner:
        """Wrap the weights of an in-memory transformers model (tests, conversions)."""
        return cls(DecoderConfig.from_hf(model.config), model.state_dict(), max_rows, max_len, **options)

    def describe(self) -> dict:
        """What was chosen, for benchmark and log lines."""
        return {
            "backend": "torch",
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "linear_impl": self.linear_impl,
            "decode": "eager" if self._graphs is None else "cuda_graph" if self._graphs.capture else "static",
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }

    # ------------------------------------------------------------------ bookkeeping
    def _check_rows(self, rows: Sequence[int], field: str = "rows") -> list[int]:
        return check_rows(rows, self.max_rows, field)

    @staticmethod
    def _as_list(x, field: str) -> list[int]:
        return as_list(x, field)

    def lengths(self, rows: Sequence[int]) -> list[int]:
        rows = self._check_rows(self._as_list(rows, "rows"))
        return [self._len[r] for r in rows]

    def _sync_len_dev(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        val = torch.tensor([self._len[r] for r in rows], dtype=torch.long).to(self.device, non_blocking=True)
        self._len_dev.index_copy_(0, idx, val)

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        rows, new = check_truncate(self._len, rows, lengths, max_rows=self.max_rows)
        for r, n in zip(rows, new):
            self._len[r] = n
        if rows:
            self._sync_len_dev(rows)

    def free(self, rows: Sequence[int]) -> None:
        rows = self._check_rows(self._as_list(rows, "rows"))
        for r in rows:
            self._len[r] = 0
        if rows:
            self._sync_len_dev(rows)

    # ------------------------------------------------------------------ ragged forward
    @torch.inference_mode()
    def forward_span(
        self, rows: Sequence[int], spans: Sequence[Sequence[int]], num_logits: Sequence[int] | None = None
    ) -> torch.Tensor:
        rows, spans, num_logits = check_spans(self._len, rows, spans, num_logits, max_rows=self.max_rows,
                                              max_len=self.max_len, vocab_size=self.vocab_size)
        ns = [len(s) for s in spans]
        ids = torch.tensor([t for s in spans for t in s], dtype=torch.long)
        starts = [self._len[r] for r in rows]
        # positions (flat) whose logits are returned: last k of each span
        sel, off = [], 0
        for n, k in zip(ns, num_logits):
            sel.extend(range(off + n - k, off + n))
            off += n
        if self._graphs is not None and max(ns) <= self._graphs.max_tokens:
            out = self._forward_graphed(rows, spans, ns, sel)
        else:
            plan = self._plan(rows, starts, ns)
            out = self._forward(ids.to(self.device, non_blocking=True), plan, sel)
        for r, n in zip(rows, ns):
            self._len[r] += n
        if self._graphs is None or max(ns) > self._graphs.max_tokens:  # (the static step updates them itself)
            self._sync_len_dev(rows)
        return out

    def _forward_graphed(self, rows: list[int], spans: list[list[int]], ns: list[int], sel: list[int]) -> torch.Tensor:
        """``forward_span`` through the static steps: spans padded to ``[B, max(ns)]``; returns the logits of
        the flat positions ``sel`` (as ``_forward``), [len(sel), V] float32."""
        n = max(ns)
        ids = torch.tensor([s + [0] * (n - len(s)) for s in spans], dtype=torch.long).to(self.device, non_blocking=True)
        valid = torch.tensor(ns, dtype=torch.long).to(self.device, non_blocking=True)
        out = self._graphs(torch.tensor(rows, dtype=torch.long), ids, valid)  # [B, n, V]
        starts = [0]
        for k in ns[:-1]:
            starts.append(starts[-1] + k)
        padded = [b * n + (i - starts[b]) for b, i in _owners(sel, starts, ns)]
        idx = torch.tensor(padded, dtype=torch.long).to(self.device, non_blocking=True)
        return out.reshape(len(rows) * n, -1).index_select(0, idx)

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append prompts and return the logits of each prompt's last position, ``[B, V]``."""
        return self.forward_span(rows, prompts, num_logits=[1] * len(prompts))

    def _plan(self, rows: list[int], starts: list[int], ns: list[int]) -> _Plan:
        dev = self.device
        p = _Plan()
        p.B, p.T, p.nmax = len(rows), sum(ns), max(ns)
        p.Lk = max(s + n for s, n in zip(starts, ns))
        p.uniform = all(n == p.nmax for n in ns)
        contiguous = rows == list(range(rows[0], rows[0] + p.B))
        p.row_slice = slice(rows[0], rows[0] + p.B) if contiguous else None
        p.rows_t = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)
        pos = [s + i for s, n in zip(starts, ns) for i in range(n)]
        p.tok_pos = torch.tensor(pos, dtype=torch.long).to(dev, non_blocking=True)
        p.tok_rows = torch.tensor([r for r, n in zip(rows, ns) for _ in range(n)], dtype=torch.long).to(dev, non_blocking=True)
        p.cos = self._cos[p.tok_pos].unsqueeze(1)  # [T, 1, D]
        p.sin = self._sin[p.tok_pos].unsqueeze(1)
        # padded query layout [B, nmax]: query position per slot (padding -> 0, which always exists)
        qpos = torch.zeros(p.B, p.nmax, dtype=torch.long)
        if p.uniform:
            p.pad_idx = p.valid_idx = None
            qpos = torch.tensor(pos, dtype=torch.long).view(p.B, p.nmax)
        else:
            pad_idx, valid_idx, off = [], [], 0
            for b, n in enumerate(ns):
                pad_idx.extend(range(off, off + n))
                pad_idx.extend([off] * (p.nmax - n))
                valid_idx.extend(range(b * p.nmax, b * p.nmax + n))
                qpos[b, :n] = torch.arange(starts[b], starts[b] + n)
                off += n
            p.pad_idx = torch.tensor(pad_idx, dtype=torch.long).to(dev, non_blocking=True)
            p.valid_idx = torch.tensor(valid_idx, dtype=torch.long).to(dev, non_blocking=True)
        qpos = qpos.to(dev, non_blocking=True)
        mask = self._arange_len[: p.Lk].view(1, 1, p.Lk) <= qpos.unsqueeze(-1)  # [B, nmax, Lk]
        g = self._group
        # fold the g query heads of a KV group into the query axis: mask row (j, t) = mask row t
        mask = mask.unsqueeze(1).expand(p.B, g, p.nmax, p.Lk).reshape(p.B, 1, g * p.nmax, p.Lk)
        # additive float mask: built once per pass, and faster than a bool mask in CPU SDPA
        p.mask = torch.zeros(mask.shape, dtype=self.dtype, device=dev).masked_fill_(~mask, float("-inf"))
        return p

    def _layers(self, x: torch.Tensor, tok_rows: torch.Tensor, tok_pos: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, attend) -> torch.Tensor:
        """The transformer blocks, shared by the eager and the static paths. x: [T, hidden] embeddings of T
        new tokens; tok_rows, tok_pos: [T] cache row and position each token's K / V is written to; cos, sin:
        [T, 1, D]; attend(q [T, H, D], k_cache, v_cache [R, Hkv, max_len, D]) -> [T, H * D]."""
        c = self.config
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        qd, kvd = H * D, Hkv * D
        eps = c.rms_norm_eps
        T = x.shape[0]
        for li, L in enumerate(self.layers):
            h = _rms_norm(x, L.ln1, eps)
            qkv = L.qkv(h)  # [T, qd + 2 kvd]
            q, k = qkv[:, :qd].view(T, H, D), qkv[:, qd : qd + kvd].view(T, Hkv, D)
            if L.q_norm is not None:  # Qwen3: each head's query and key normalised before RoPE
                q, k = _rms_norm(q, L.q_norm, eps), _rms_norm(k, L.k_norm, eps)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            v = qkv[:, qd + kvd :].view(T, Hkv, D)
            kc, vc = self.cache[li, 0], self.cache[li, 1]  # [R, Hkv, max_len, D]
            kc[tok_rows, :, tok_pos] = k
            vc[tok_rows, :, tok_pos] = v
            x = x + L.o(attend(q, kc, vc))
            h = _rms_norm(x, L.ln2, eps)
            gu = L.gate_up(h)
            inter = gu.shape[-1] // 2
            x = x + L.down(F.silu(gu[:, :inter]) * gu[:, inter:])
        return x

    def _forward(self, ids: torch.Tensor, p: _Plan, sel: list[int]) -> torch.Tensor:
        """The eager ragged pass: attention by SDPA over each row's cache up to the batch's longest row."""
        c = self.config
        Hkv, D, g = c.num_kv_heads, c.head_dim, self._group
        qd = c.num_heads * D

        def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
            if p.row_slice is not None:
                K, Vv = kc[p.row_slice, :, : p.Lk], vc[p.row_slice, :, : p.Lk]
            else:
                K, Vv = kc[:, :, : p.Lk].index_select(0, p.rows_t), vc[:, :, : p.Lk].index_select(0, p.rows_t)
            # queries [T, H, D] -> [B, nmax, Hkv, g, D] -> [B, Hkv, g * nmax, D]
            qp = q if p.uniform else q.index_select(0, p.pad_idx)
            qp = qp.view(p.B, p.nmax, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(p.B, Hkv, g * p.nmax, D)
            a = F.scaled_dot_product_attention(qp, K, Vv, attn_mask=p.mask)  # [B, Hkv, g * nmax, D]
            a = a.view(p.B, Hkv, g, p.nmax, D).permute(0, 3, 1, 2, 4).reshape(p.B * p.nmax, qd)
            return a if p.uniform else a.index_select(0, p.valid_idx)

        x = self._layers(F.embedding(ids, self.embed), p.tok_rows, p.tok_pos, p.cos, p.sin, attend)
        if not sel:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device)
        if len(sel) != p.T:
            x = x.index_select(0, torch.tensor(sel, dtype=torch.long).to(self.device, non_blocking=True))
        return self.lm_head(_rms_norm(x, self.norm, c.rms_norm_eps)).float()

    # ------------------------------------------------------------------ one-token decode
    @torch.inference_mode()
    def decode(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``rows [B]`` int64 (host tensor or list: bookkeeping needs them without a device sync),
        ``ids [B]`` int64 (host or device) -> float32 logits ``[B, V]``."""
        row_list, ids_t = check_decode(self._len, rows, ids, max_rows=self.max_rows, max_len=self.max_len,
                                       vocab_size=self.vocab_size)
        ids_t = ids_t.to(self.device, torch.long, non_blocking=True)
        if self._graphs is not None:
            rows_t = torch.tensor(row_list, dtype=torch.long)
            ones = torch.ones(len(row_list), dtype=torch.long).to(self.device, non_blocking=True)
            out = self._graphs(rows_t, ids_t.view(-1, 1), ones)[:, 0]  # updates the device lengths itself
            for r in row_list:
                self._len[r] += 1
            return out
        starts = [self._len[r] for r in row_list]
        out = self._forward(ids_t, self._plan(row_list, starts, [1] * len(row_list)), list(range(len(row_list))))
        for r in row_list:
            self._len[r] += 1
        self._sync_len_dev(row_list)
        return out

    @torch.inference_mode()
    def decode_loop(self, rows: torch.Tensor | Sequence[int], ids: torch.Tensor, steps: int,
                    vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy drafting in one call: ``steps`` one-token steps per row, step 0 fed ``ids``, step j > 0 the
        argmax (over ids < ``vocab``, default all) of step j - 1's logits. ``rows [B]`` int64 (host),
        ``ids [B]`` int64 (host or device) -> (logits [steps, B, V] float32, tokens [steps, B] int64 on the
        device), the same as ``steps`` ``decode`` calls with the argmax fed back. With CUDA graphs the whole
        loop is one graph replay (``GraphedSteps.greedy_loop``); otherwise it is those ``decode`` calls."""
        row_list, vocab = check_decode_loop(self._len, rows, steps, vocab, max_rows=self.max_rows,
                                            max_len=self.max_len, vocab_size=self.vocab_size)
        if self._graphs is None:
            return decode_steps(self, row_list, ids, steps, vocab)
        if not row_list or tuple(ids.shape) != (len(row_list),):
            raise ValueError(f"ids must have shape [{len(row_list)}], got {tuple(ids.shape)}")
        ids_t = ids.to(self.device, torch.long, non_blocking=True)
        out = self._graphs.greedy_loop(torch.tensor(row_list, dtype=torch.long), ids_t, int(steps), vocab)
        for r in row_list:  # (the static steps update the device lengths themselves)
            self._len[r] += steps
        return out

    def _static_step(self, rows: torch.Tensor, ids: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        """The static step the CUDA graphs capture: ``rows [Bb]``, ``ids [Bb, n]``, ``n_valid [Bb]`` device int64
        (padding batch slots hold ``scratch_row``; token slots ``t >= n_valid[b]`` are padding, written to the
        scratch row). Row b's tokens go to positions ``len[b] ..`` read from ``_len_dev``; attention is the
        cache attention kernel, over each row's own length. No host sync. Updates ``_len_dev``. Returns
        float32 logits ``[Bb, n, V]`` (padding slots: garbage)."""
        from cascade.kernels.attention import cache_attention

        c = self.config
        H, D = c.num_heads, c.head_dim
        Bb, n = ids.shape
        start = self._len_dev.index_select(0, rows)  # [Bb]
        t = torch.arange(n, device=self.device)
        valid = t.view(1, n) < n_valid.view(Bb, 1)  # [Bb, n]
        pos = torch.where(valid, start.view(Bb, 1) + t.view(1, n), 0).reshape(-1)  # [Bb * n]
        tok_rows = torch.where(valid, rows.view(Bb, 1), self.scratch_row).reshape(-1)
        cos, sin = self._cos[pos].unsqueeze(1), self._sin[pos].unsqueeze(1)  # [Bb * n, 1, D]

        def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
            return cache_attention(q.view(Bb, n, H, D), kc, vc, rows, start, n_valid).view(Bb * n, H * D)

        x = self._layers(F.embedding(ids.reshape(-1), self.embed), tok_rows, pos, cos, sin, attend)
        self._len_dev.index_copy_(0, rows, start + n_valid)
        self._len_dev[self.scratch_row :].zero_()
        return self.lm_head(_rms_norm(x, self.norm, c.rms_norm_eps)).float().view(Bb, n, -1)


def _owners(sel: list[int], starts: list[int], ns: list[int]) -> list[tuple[int, int]]:
    """(span index, flat position) of each flat position in ``sel`` (spans start at ``starts``, length ``ns``)."""
    out, b = [], 0
    for i in sel:
        while i >= starts[b] + ns[b]:
            b += 1
        out.append((b, i))
    return out
