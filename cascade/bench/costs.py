"""Modelled time: what a run's passes would cost on a machine whose per-pass costs were measured.

The cost axes read from counters alone say FLOPs (positions) or target passes; a deployment pays time,
which is neither: a pass of n positions costs about ``step + (n - 1) * position`` on the machine at hand
(on a GPU at low batch ``position`` is tiny against ``step``; on a 2-core CPU it is not). ``PassCosts``
holds those two figures per model, fitted from ``benchmarks/runner_cost.py``'s CSV (batch 1, the
1-token step and the k-token forwards), and turns a ``RunRecord``'s counters into milliseconds:

- draft: one pass per drafted position (``draft_tokens`` steps) plus its prompt positions;
- target: ``target_passes`` steps plus every other position it processed (catch-up, block, prompt).

The same pricing of a record's counters at its first reported token gives the modelled time to first
token (``ttft_ms``): a token-level policy pays its first round (the draft's prompt and first block, and the
target's prompt and block if that round escalates); a request-level router pays the draft's whole answer
first (``runs.first_token_counters``). Both are batch-1 figures: one request alone on the machine.

GPU figures replace the CPU ones when a GPU run of the runner benchmark has written its CSV; the report
names the file and machine the figures came from.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cascade.bench.runs import RunRecord

DEFAULT_COST_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "runner_cost_cpu-avx2-2c.csv"


@dataclass(frozen=True)
class PassCosts:
    """Per-pass costs of both models, in milliseconds: a pass of n positions costs step + (n - 1) * position."""

    draft_step_ms: float
    draft_position_ms: float
    target_step_ms: float
    target_position_ms: float
    source: str = ""  # where the figures come from (file, machine, dtype, implementation)

    def counters_ms(self, c: dict) -> float:
        """Modelled wall time of cost counters (``runs.COUNTERS``: both models' positions and target passes)."""
        passes = c["target_passes"]
        target_positions = c["target_tokens"] + c["target_prefill_tokens"]
        target = passes * self.target_step_ms + max(0, target_positions - passes) * self.target_position_ms
        draft = c["draft_tokens"] * self.draft_step_ms + c["draft_prefill_tokens"] * self.draft_position_ms
        return draft + target

    def record_ms(self, r: "RunRecord") -> float:
        """Modelled wall time of one record's passes (both models, prompts included): its end-to-end latency
        alone on the machine."""
        return self.counters_ms(r.counters())

    def ttft_ms(self, r: "RunRecord") -> float:
        """Modelled time to the record's first reported token (alone on the machine)."""
        from cascade.bench.runs import first_token_counters

        return self.counters_ms(first_token_counters(r))

    @classmethod
    def from_runner_cost_csv(cls, path: str | Path = DEFAULT_COST_FILE, draft_shape: str = "0.5b",
                             target_shape: str = "1.5b", dtype: str | None = None,
                             impl: str | None = None) -> "PassCosts":
        """Fit step and per-position cost of each shape from batch-1 rows of a runner_cost CSV. ``dtype``
        defaults to float32 where the file has it, else the file's one dtype (a llama.cpp file: q4_k_m);
        ``impl`` (the linear implementation column) to the fastest one measured for the target's step."""
        table = list(csv.DictReader(Path(path).open()))
        if dtype is None:
            present = {r["dtype"] for r in table}
            dtype = "float32" if "float32" in present or len(present) != 1 else present.pop()
        rows = [r for r in table if r["batch"] == "1" and r["dtype"] == dtype and r["op"] in ("step", "span")]
        if not rows:
            raise ValueError(f"cost model: {path} has no batch-1 step/span rows in {dtype}")
        if impl is None:
            steps = [r for r in rows if r["model"] == target_shape and r["op"] == "step"]
            impl = min(steps, key=lambda r: float(r["ms_median"]))["linear_impl"] if steps else rows[0]["linear_impl"]

        def fit(shape: str) -> tuple[float, float]:
            pts = [(int(r["tokens_per_row"]), float(r["ms_median"])) for r in rows
                   if r["model"] == shape and r["linear_impl"] == impl]
            if len(pts) < 2:
                raise ValueError(f"cost model: {path} has fewer than two {shape} {impl} rows")
            step = min(pts)[1] if min(pts)[0] == 1 else pts[0][1]
            extra = [(n - 1, ms - step) for n, ms in pts if n > 1]
            slope = sum(a * b for a, b in extra) / sum(a * a for a, _ in extra)  # least squares through the step
            return step, max(0.0, slope)

        d_step, d_pos = fit(draft_shape)
        t_step, t_pos = fit(target_shape)
        machine = rows[0].get("machine", "?")
        return cls(d_step, d_pos, t_step, t_pos, source=f"{Path(path).name} ({machine}, {dtype}, {impl})")
