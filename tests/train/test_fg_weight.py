"""SFT-VDM's foreground weighting (``train.sft_vdm.fg_weight``): which latent cells count as foreground,
and that the weighted loss is the weighted mean of the same per-cell errors the plain loss averages."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vans_jax.models.wan import WanConfig, WanTransformer3D
from vans_jax.train.sft import foreground_latents, sft_vdm_loss

CFG = WanConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=48, in_channels=4, out_channels=4, text_dim=24,
                freq_dim=16)


def _latents(rng, n=2):
    """A per-clip background latent everywhere (plus small noise), objects in a few cells."""
    bg = rng.standard_normal((n, 4, 1, 1, 1))
    x0 = bg + 0.05 * rng.standard_normal((n, 4, 2, 4, 4))
    fg = np.zeros((n, 2, 4, 4), bool)
    fg[0, 0, 1:3, 1:3] = True           # a 2 x 2 object in the first frame of clip 0
    fg[1, :, 0, 3] = True               # one cell in both frames of clip 1
    x0 = np.where(fg[:, None], x0 + 2.0 * np.sign(rng.standard_normal((n, 4, 1, 1, 1))), x0)
    return jnp.asarray(x0, jnp.float32), fg


def test_foreground_cells():
    x0, fg = _latents(np.random.default_rng(0))
    np.testing.assert_array_equal(np.asarray(foreground_latents(x0, 0.5)), fg)
    # a flat clip has no foreground; a high threshold none either
    assert not np.asarray(foreground_latents(jnp.ones((1, 4, 2, 4, 4)), 0.5)).any()
    assert not np.asarray(foreground_latents(x0, 100.0)).any()


def test_weighted_loss_is_the_weighted_mean_of_the_plain_errors():
    rng = np.random.default_rng(1)
    model = WanTransformer3D(CFG, rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    x0, fg = _latents(rng)
    batch = dict(latents=x0, context=jnp.asarray(rng.standard_normal((2, 8, 24)), jnp.float32),
                 null_context=jnp.zeros((1, 8, 24), jnp.float32),
                 ref_latents=jnp.asarray(rng.standard_normal((2, 4, 1, 4, 4)), jnp.float32))

    def loss(w):
        out = sft_vdm_loss(params, graphdef, frozen, batch, jax.random.key(5), shift=3.0, text_dropout=0.0,
                           dropout=False, fg_weight=w)
        return float(out[0]), out[1]

    plain, m0 = loss(0.0)
    assert "fg_fraction" not in m0
    # L(w) = (S_bg + (1 + w) S_fg) / (C (N_bg + (1 + w) N_fg)), S the summed errors of each kind of cell (C channels)
    n_fg, n_bg = fg.sum(), (~fg).sum()
    l1, m1 = loss(1.0)
    l3, _ = loss(3.0)
    a = np.array([[1.0, 2.0], [1.0, 4.0]])
    s_bg, s_fg = np.linalg.solve(a, [l1 * 4 * (n_bg + 2 * n_fg), l3 * 4 * (n_bg + 4 * n_fg)])
    assert s_bg > 0 and s_fg > 0
    np.testing.assert_allclose(plain, (s_bg + s_fg) / (4 * fg.size), rtol=1e-4)          # the same errors
    np.testing.assert_allclose(loss(9.0)[0], (s_bg + 10 * s_fg) / (4 * (n_bg + 10 * n_fg)), rtol=1e-4)
    np.testing.assert_allclose(float(m1["fg_fraction"]), fg.mean(), rtol=1e-6)
    # the foreground's errors are larger here, so weighting them raises the loss
    assert s_fg / n_fg > s_bg / n_bg and l3 > l1 > plain
