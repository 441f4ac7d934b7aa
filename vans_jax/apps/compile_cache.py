"""JAX's persistent compilation cache for the interactive commands (``vans-jax demo``, ``predict``):
on by default, so a second run loads its programs instead of compiling them again.

Where: ``$VANS_JAX_COMPILATION_CACHE`` if set (``off`` disables it), else a ``JAX_COMPILATION_CACHE_DIR``
you already set (JAX's own variable wins), else ``$XDG_CACHE_HOME/vans_jax/jax`` (default
``~/.cache/vans_jax/jax``). The cache is keyed by the program, the JAX version and the device, so
it is safe to share between runs and checkouts; delete the directory to reclaim the space.
"""
from __future__ import annotations

import os

ENV = "VANS_JAX_COMPILATION_CACHE"


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vans_jax", "jax")


def enable(path: str | None = None) -> str | None:
    """Turns the cache on (before anything compiles); returns its directory, or None when off."""
    import jax

    choice = path or os.environ.get(ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir()
    if choice.strip().lower() == "off":
        return None
    os.makedirs(choice, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", choice)
    # small programs too: the demo's many mid-size programs are what a second run saves
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return choice
