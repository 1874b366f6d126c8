"""Model runners: the ``ModelRunner`` protocol (base.py) and its implementations."""

from cascade.models.base import ModelRunner

__all__ = ["ModelRunner"]
