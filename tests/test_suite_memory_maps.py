"""The suite's guard against running out of memory mappings (conftest.py): compiled programs kept in
jit caches hold mappings until ``jax.clear_caches()``; a test worker that never released them
segfaulted in XLA's compiler at ~65,500 mappings (the kernel's ``vm.max_map_count``)."""
import gc
import sys

import pytest

from tests.utils import memory_maps

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


def test_memory_maps_reads_the_count_and_the_limit():
    used, limit = memory_maps()
    assert used is not None and 10 < used < limit
    assert limit >= 1024


def test_clearing_jax_caches_gives_the_mappings_of_compiled_programs_back():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def f(x):                      # one program per input shape, all kept in f's cache
        return jnp.tanh(x @ x.T).sum(0) + jnp.cos(x).mean()

    gc.collect()
    before, _ = memory_maps()
    for n in range(1, 41):
        f(jnp.ones((n, 3))).block_until_ready()
    held, _ = memory_maps()
    assert held - before >= 40, (before, held)       # each compiled program maps its code
    jax.clear_caches()
    gc.collect()
    after, _ = memory_maps()
    assert held - after >= 0.8 * (held - before), (before, held, after)
