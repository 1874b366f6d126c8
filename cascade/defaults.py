"""The project's default policy: the configuration ``cascade calibrate --ship`` chose on the dev splits of
HumanEval, GSM8K and MATH-500 for the default pair (since issue 31 under a latency limit, so that it streams),
shipped as ``cascade/calibrated_default.json`` beside this module. ``cascade generate``, ``cascade serve`` and ``Cascade.generate`` use it when no policy is given.

Without the file (a checkout where it was deleted) the default is lossless ``speculative``: it never
changes the target's greedy answer, so it is the one choice that needs no calibration. The file's figures
(dev and test quality, cost on the budget's axis) say what the default was measured on; the README quotes
them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

SHIPPED_FILE = "calibrated_default.json"
UNCALIBRATED_DEFAULT = "speculative"


def shipped_path() -> Path:
    """Where the shipped calibration lives (``cascade calibrate --ship`` writes it)."""
    return Path(str(resources.files("cascade").joinpath(SHIPPED_FILE)))


def default_calibration() -> dict | None:
    """The shipped calibration's summary, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(shipped_path().read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("policy"), str) else None


def default_policy(router_loaded: bool = True, default_pair: bool = True) -> str:
    """The policy string requests run when they name none. The shipped configuration was calibrated on
    the default pair (its thresholds are on that draft's log-probs and that pair's costs), so any other
    pair (``default_pair`` False) gets the uncalibrated default; so does a pair without a router when the
    shipped policy reads the learned router (``learned``), instead of an error."""
    cal = default_calibration()
    if cal is None or not default_pair:
        return UNCALIBRATED_DEFAULT
    if not router_loaded:
        from cascade.policies import parse_policy

        if parse_policy(cal["policy"]).uses_router:
            return UNCALIBRATED_DEFAULT
    return cal["policy"]
