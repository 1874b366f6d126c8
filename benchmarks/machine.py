"""The benchmark scripts' view of ``cascade.machine`` (they import it as a sibling module)."""

from cascade.machine import cpu_model, machine_info  # noqa: F401
