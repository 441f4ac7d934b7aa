"""Helpers shared by the tests."""
import os

import numpy as np


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a subprocess test: the session's (conftest.py: fast compilation) plus ``extra``."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *extra]).strip()


def rel_err(a, b):
    """The parity measure used throughout: max |a - b| / max |b| (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
