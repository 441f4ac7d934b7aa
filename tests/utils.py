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


def run_on_8_devices(script: str, *args: str, timeout: int = 600) -> dict:
    """Runs ``script`` (Python source) in a subprocess with 8 fake CPU devices from the repo root
    and returns the JSON it prints after ``RESULT``."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=root, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.split("RESULT", 1)[1])
