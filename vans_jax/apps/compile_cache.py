"""JAX's persistent compilation cache for the interactive commands (``vans-jax demo``, ``predict``):
on by default, so a second run loads its programs instead of compiling them again.

Where: ``$VANS_JAX_COMPILATION_CACHE`` if set (``off`` disables it), else a ``JAX_COMPILATION_CACHE_DIR``
you already set (JAX's own variable wins), else ``$XDG_CACHE_HOME/vans_jax/jax`` (default
``~/.cache/vans_jax/jax``). The cache is keyed by the program, the JAX version and the device, so
it is safe to share between runs and checkouts; delete the directory to reclaim the space.

Size: at most ``DEFAULT_MAX_BYTES`` (8 GiB; least recently used entries go first), or
``JAX_COMPILATION_CACHE_MAX_SIZE`` if set. The limit is also what makes the cache safe for several
processes at once: only with one does JAX take its file lock around each read and write; without
it a process can load an entry another is still writing (a torn executable: a segfault).
"""
from __future__ import annotations

import os

ENV = "VANS_JAX_COMPILATION_CACHE"
DEFAULT_MAX_BYTES = 8 << 30


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
    # -1 (JAX's default, unlimited) reads and writes entries without a lock: not safe for two
    # processes at once (module docstring); a value the user set is kept
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", DEFAULT_MAX_BYTES)
    return choice
