"""XLA settings the ``vans-jax`` commands apply before JAX starts.

One default today, for XLA's CPU backend: ``--xla_cpu_experimental_ynn_fusion_type=individual_dot``.
XLA:CPU hands fusions to YNNPACK; by default that includes reductions, and on our models' backward
passes those YNNPACK reduction fusions were the largest single cost (0.3-1.3 ms for each reduction of a
320x256 tensor: bias, norm and modulation gradients). With ``individual_dot`` YNNPACK keeps the matrix
products and XLA's own emitter does the rest. Measured with ``vans-jax bench --config
configs/bench_cpu.py`` on 2 quiet cores (README, Benchmark), every figure was as fast or faster, e.g.
the DiT training step 75 -> 44 ms, VLM decode 23 -> 10 ms, a Joint-GRPO Stage-1 step 0.36 -> 0.28 s.

Rules:
- a flag already in ``XLA_FLAGS`` (the user's, any value) is left as set;
- ``VANS_JAX_DEFAULT_XLA_FLAGS=0`` turns the defaults off;
- a flag is added only when every XLA in this environment knows it (XLA aborts the process on an
  unknown flag): jaxlib's shared libraries and any installed PJRT plugin's (CUDA, ROCm, TPU) are
  scanned for the flag's name; experimental flags come and go between releases;
- nothing changes once JAX's backends have started in this process (XLA has read its flags then).

This module imports no JAX: it runs first thing in ``vans_jax.apps.cli.main`` and the tools' entry
points. Library users call :func:`apply_default_xla_flags` themselves before their first JAX
computation, or set ``XLA_FLAGS``.
"""
from __future__ import annotations

import glob
import importlib.util
import mmap
import os
import sys

DEFAULT_XLA_FLAGS: tuple[tuple[str, str], ...] = (
    ("--xla_cpu_experimental_ynn_fusion_type", "individual_dot"),
)
OPT_OUT_ENV = "VANS_JAX_DEFAULT_XLA_FLAGS"
# what the last call on this process's environment did (the bench records it in its JSON)
LAST: dict = {}


def _package_dirs(name: str) -> list[str]:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return list(spec.submodule_search_locations)
    return [os.path.dirname(spec.origin)] if spec.origin else []


def xla_libraries() -> dict[str, list[str]]:
    """The shared libraries that hold an XLA in this environment: ``jaxlib`` (always) and each PJRT
    plugin found (``jax_plugins.*``, ``libtpu``). Only files over 1 MiB (the XLA builds, not stubs)."""
    found: dict[str, list[str]] = {}
    for name in ("jaxlib", "jax_plugins", "libtpu"):
        libs = []
        for d in _package_dirs(name):
            libs += [f for f in glob.glob(os.path.join(d, "**", "*.so*"), recursive=True)
                     if os.path.isfile(f) and os.path.getsize(f) > (1 << 20)]
        if libs or name == "jaxlib":
            found[name] = sorted(set(libs))
    return found


def _contains(path: str, needle: bytes) -> bool:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(needle) >= 0


def known_to_xla(flag: str, libraries: dict[str, list[str]] | None = None) -> tuple[bool, str]:
    """Whether every XLA here knows ``flag`` (its name is in each package's libraries), with the reason."""
    libraries = xla_libraries() if libraries is None else libraries
    if not libraries.get("jaxlib"):
        return False, "jaxlib's shared libraries were not found"
    needle = flag.lstrip("-").encode()
    for package, libs in libraries.items():
        try:
            if not any(_contains(f, needle) for f in libs):
                return False, f"{package} does not know {flag}"
        except OSError as e:
            return False, f"could not read {package}'s libraries: {e}"
    return True, "known to " + ", ".join(sorted(libraries))


def _backends_started() -> bool:
    xb = sys.modules.get("jax._src.xla_bridge")
    if xb is None:
        return False
    started = getattr(xb, "backends_are_initialized", None)
    return bool(started()) if callable(started) else bool(getattr(xb, "_backends", {}))


def apply_default_xla_flags(environ=None, libraries: dict[str, list[str]] | None = None) -> dict:
    """Adds :data:`DEFAULT_XLA_FLAGS` to ``environ["XLA_FLAGS"]`` (default ``os.environ``) where the
    rules in the module docstring allow. Returns ``{"applied": [flag=value, ...], "skipped": {flag:
    reason}}``."""
    env = os.environ if environ is None else environ
    record: dict = {"applied": [], "skipped": {}}
    if env.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        record["skipped"] = {f: f"{OPT_OUT_ENV}={env[OPT_OUT_ENV]}" for f, _ in DEFAULT_XLA_FLAGS}
        return record
    current = env.get("XLA_FLAGS", "")
    started = environ is None and _backends_started()
    for flag, value in DEFAULT_XLA_FLAGS:
        if flag in current:
            record["skipped"][flag] = "already in XLA_FLAGS (kept as set)"
            continue
        if started:
            record["skipped"][flag] = "JAX's backends had already started in this process"
            continue
        ok, why = known_to_xla(flag, libraries)
        if not ok:
            record["skipped"][flag] = why
            continue
        current = (current + f" {flag}={value}").strip()
        record["applied"].append(f"{flag}={value}")
    if record["applied"]:
        env["XLA_FLAGS"] = current
    if environ is None:
        LAST.clear()
        LAST.update(record)
    return record
