"""attention(impl="chunked"): the same values and gradients as the reference XLA attention (GQA,
masks and biases with and without a query axis, a query count that is not a multiple of the
block), and a memory footprint that does not grow with Lq x Lk."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vans_jax.models import layers
from tests.utils import rel_err


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(layers, "CHUNK", 16)


def _inputs(lq=50, lk=37, hq=4, hkv=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, lq, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, lk, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, lk, hkv, d)), jnp.float32)
    return q, k, v, rng


@pytest.mark.parametrize("kind", ["none", "query_mask", "key_mask", "bias"])
def test_chunked_matches_xla(small_chunks, kind):
    q, k, v, rng = _inputs()
    kw = {}
    if kind == "query_mask":                       # (B, 1, Lq, Lk), e.g. causal + padding
        kw["mask"] = jnp.asarray(rng.random((2, 1, 50, 37)) > 0.3)
    elif kind == "key_mask":                       # (B, 1, 1, Lk), e.g. key padding
        kw["mask"] = jnp.asarray(rng.random((2, 1, 1, 37)) > 0.3)
    elif kind == "bias":                           # (1, H, Lq, Lk), e.g. relative positions
        kw["bias"] = jnp.asarray(rng.standard_normal((1, 4, 50, 37)), jnp.float32)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(layers.attention(q, k, v, impl=impl, **kw)))

    ref = layers.attention(q, k, v, impl="xla", **kw)
    out = layers.attention(q, k, v, impl="chunked", **kw)
    assert out.shape == ref.shape == (2, 50, 4, 8)
    assert rel_err(out, ref) < 1e-6
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-5


def test_short_queries_take_the_plain_path(small_chunks):
    q, k, v, _ = _inputs(lq=16)
    np.testing.assert_array_equal(layers.attention(q, k, v, impl="chunked"), layers.attention(q, k, v, impl="xla"))


def test_chunked_memory_is_bounded():
    """Forward + backward at Lq = Lk = 4096: the XLA reference keeps the (H, Lq, Lk) scores for the
    backward pass, the chunked form one block's."""
    shape = jax.ShapeDtypeStruct((1, 4096, 4, 32), jnp.float32)

    def temp_bytes(impl):
        fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(layers.attention(q, k, v, impl=impl)), argnums=(0, 1, 2)))
        return fn.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

    scores = 4 * 4096 * 4096 * 4                   # one fp32 (H, Lq, Lk) buffer: 268 MB
    block = 4 * layers.CHUNK * 4096 * 4            # one block's: 34 MB
    xla, chunked = temp_bytes("xla"), temp_bytes("chunked")
    assert xla >= 2 * scores and chunked <= 5 * block and chunked < xla / 5, (xla, chunked)
