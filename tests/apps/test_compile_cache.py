"""The interactive commands' persistent compilation cache is size-limited, which is what makes JAX
lock each read and write (two processes at once must not load a half-written entry)."""
import gc
import sys

import jax
import pytest

from vans_jax.apps import compile_cache


def test_enable_sets_a_size_limit_and_keeps_the_users(tmp_path, monkeypatch):
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs", "jax_compilation_cache_max_size")
    before = {k: getattr(jax.config, k) for k in keys}
    try:
        monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
        jax.config.update("jax_compilation_cache_max_size", -1)
        assert compile_cache.enable(str(tmp_path / "c")) == str(tmp_path / "c")
        assert jax.config.jax_compilation_cache_max_size == compile_cache.DEFAULT_MAX_BYTES > 0
        # a limit the user set in the environment is theirs
        monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "12345")
        jax.config.update("jax_compilation_cache_max_size", 12345)
        compile_cache.enable(str(tmp_path / "c"))
        assert jax.config.jax_compilation_cache_max_size == 12345
        # and the locked cache works: an entry written is read back
        from jax._src.lru_cache import LRUCache
        c = LRUCache(str(tmp_path / "l"), max_size=compile_cache.DEFAULT_MAX_BYTES)
        assert c.eviction_enabled and c.get("k") is None
        c.put("k", b"abc")
        assert c.get("k") == b"abc"
        monkeypatch.setenv(compile_cache.ENV, "off")
        assert compile_cache.enable() is None
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


@linux_only
def test_memory_maps_reads_the_count_and_the_limit():
    used, limit = compile_cache.memory_maps()
    assert limit >= 1024
    assert used is not None and 10 < used < limit


@linux_only
def test_release_compiled_programs_gives_their_mappings_back():
    """Compiled programs kept in a jit cache hold memory mappings until the caches are cleared (a
    test worker that never released them segfaulted in XLA's compiler at ~65,500 mappings)."""
    import jax.numpy as jnp

    @jax.jit
    def f(x):                      # one program per input shape, all kept in f's cache
        return jnp.tanh(x @ x.T).sum(0) + jnp.cos(x).mean()

    gc.collect()
    before, _ = compile_cache.memory_maps()
    for n in range(1, 41):
        f(jnp.ones((n, 3))).block_until_ready()
    held, _ = compile_cache.memory_maps()
    assert held - before >= 40, (before, held)       # each compiled program maps its code
    assert compile_cache.release_compiled_programs(fraction=1.0) is None      # below the threshold: kept
    assert compile_cache.memory_maps()[0] >= held - 5
    released = compile_cache.release_compiled_programs(fraction=0.0)
    assert released is not None and released[0] >= held - 5
    assert held - released[1] >= 0.8 * (held - before), (before, held, released)
    f(jnp.ones((2, 3))).block_until_ready()                                     # still works: compiled again
