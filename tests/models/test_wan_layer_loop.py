"""The DiT's two layer loops (``WanConfig.layer_loop``: ``lax.scan`` over the stacked blocks, or a
Python loop over the same parameters) compute the same velocity and the same gradients, under
every remat policy; "auto" unrolls small DiTs only."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vans_jax.models.wan import dit as W


def test_auto_unrolls_small_dits_only():
    assert W.WanConfig(dim=64, num_heads=2, num_layers=4).unrolled
    assert not W.WanConfig().unrolled                      # Wan2.1-1.3B: 30 scanned layers
    assert not W.WanConfig(dim=64, num_heads=2, num_layers=2, layer_loop="scan").unrolled
    assert W.WanConfig(layer_loop="unroll").unrolled
    with pytest.raises(ValueError, match="layer_loop must be"):
        W.WanConfig(layer_loop="while")


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_unroll_agree(remat):
    cfg = W.WanConfig(dim=64, num_heads=2, num_layers=3, ffn_dim=96, text_dim=32, freq_dim=32, remat=remat,
                      layer_loop="scan")
    model = W.WanTransformer3D(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((2, 16, 3, 4, 6)), jnp.float32)
    t = jnp.asarray([10.0, 700.0])
    c = jnp.asarray(r.standard_normal((2, 5, 32)), jnp.float32)
    target = jnp.asarray(r.standard_normal((2, 16, 2, 4, 6)), jnp.float32)

    def loss(p, loop):
        m = nnx.merge(graphdef, p, rest)
        m.cfg = dataclasses.replace(cfg, layer_loop=loop)
        v = m(x, t, c, n_ref=1)
        return jnp.mean((v - target) ** 2), v

    (l_scan, v_scan), g_scan = jax.jit(jax.value_and_grad(lambda p: loss(p, "scan"), has_aux=True))(params)
    (l_loop, v_loop), g_loop = jax.jit(jax.value_and_grad(lambda p: loss(p, "unroll"), has_aux=True))(params)
    assert v_scan.shape == (2, 16, 2, 4, 6)
    np.testing.assert_allclose(v_loop, v_scan, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_loop, l_scan, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_loop), jax.tree.leaves(g_scan)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(g_loop["blocks"]))
