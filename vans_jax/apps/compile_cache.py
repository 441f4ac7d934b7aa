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

In memory: every program XLA:CPU compiles maps its code into the process (6-30 memory mappings a
program) and JAX's jit caches keep it while the process lives. A process that compiles without end
(``vans-jax demo --compare`` over many variants and seeds: 10,300 mappings after the SFT evaluation
and three variants; the test suite's workers) reaches the kernel's per-process limit
(``vm.max_map_count``, 65,530 by default) and segfaults inside XLA's compiler when the next ``mmap``
fails. :func:`release_compiled_programs`
gives the mappings back (``jax.clear_caches()``) once a fraction of the limit is in use; a program
needed again is compiled again (or loaded from this cache).
"""
from __future__ import annotations

import gc
import os
import sys

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


def memory_maps() -> tuple[int | None, int]:
    """(memory mappings this process holds, the kernel's per-process limit ``vm.max_map_count``);
    the count is None where ``/proc`` is absent (not Linux), the limit then the kernel's default."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read().strip())
    except (OSError, ValueError):
        limit = 65530
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f), limit
    except OSError:
        return None, limit


def release_compiled_programs(fraction: float = 0.25) -> tuple[int, int] | None:
    """When this process holds more than ``fraction`` of its memory-mapping limit: clears JAX's
    caches of compiled programs and collects garbage (module docstring). Returns (mappings before,
    after) when it released, None when it did not need to (or cannot count them)."""
    used, limit = memory_maps()
    if used is None or used <= fraction * limit or "jax" not in sys.modules:
        return None
    import jax

    jax.clear_caches()
    gc.collect()
    return used, memory_maps()[0]
