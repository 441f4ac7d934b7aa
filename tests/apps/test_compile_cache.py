"""The interactive commands' persistent compilation cache is size-limited, which is what makes JAX
lock each read and write (two processes at once must not load a half-written entry)."""
import jax

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
