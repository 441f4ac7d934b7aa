"""The parameter EMA (train.sft_vdm.ema_decay): the recurrence, skipped steps, and that the export
(what users sample) holds the EMA."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.tiny import make_config
from vans_jax.train import core, loop


def test_param_ema_follows_its_recurrence_and_skips_with_the_step():
    opt = optax.chain(optax.sgd(0.5), core.param_ema(0.9))
    params = {"w": jnp.asarray([1.0, -2.0])}
    state = core.init_state(params, opt, seed=0)
    step = core.make_update_step(lambda p, g, f, b, r: (jnp.sum(p["w"] * b["x"]), {}), opt, None)
    w, ema = np.array([1.0, -2.0]), np.array([1.0, -2.0])
    for n, x in enumerate(([1.0, 2.0], [0.5, -1.0], [3.0, 0.0], [1.0, 1.0])):
        state, _ = step(state, {}, {"x": jnp.asarray(x)})
        w = w - 0.5 * np.asarray(x)
        d = min(0.9, (1 + n) / (10 + n))
        ema = d * ema + (1 - d) * w
        np.testing.assert_allclose(np.asarray(core.ema_params(state)["w"]), ema, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-6)
    before = np.asarray(core.ema_params(state)["w"])
    state, m = step(state, {}, {"x": jnp.asarray([jnp.nan, 1.0])})          # skipped: EMA untouched
    assert float(m["skipped_step"]) == 1
    np.testing.assert_array_equal(np.asarray(core.ema_params(state)["w"]), before)
    assert core.ema_params(core.init_state(params, optax.sgd(0.1), seed=0)) is None
    with pytest.raises(ValueError, match="ema_decay"):
        core.param_ema(1.0)


def _dit_params(model):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
            jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def test_sft_vdm_exports_the_ema(tiny_world, tmp_path):
    from vans_jax.sampling import wan as wp
    run = {"video.height": 32, "video.width": 32, "train.steps": 1, "train.checkpoint_every": 0,
           "train.sft_vdm.latent_cache": str(tmp_path / "cache")}
    raw = loop.train(make_config(tiny_world, str(tmp_path / "raw"), "sft_vdm", **run), progress=False)
    ema = loop.train(make_config(tiny_world, str(tmp_path / "ema"), "sft_vdm", **run,
                                 **{"train.sft_vdm.ema_decay": 0.99}), progress=False)
    init = _dit_params(wp.from_pretrained(tiny_world["vdm"], dtype=jnp.float32).dit)
    p1 = _dit_params(wp.from_pretrained(raw["exports"]["vdm"], dtype=jnp.float32).dit)
    e1 = _dit_params(wp.from_pretrained(ema["exports"]["vdm"], dtype=jnp.float32).dit)
    # one update: d = min(0.99, 1/10) -> ema = 0.1 * start + 0.9 * trained (the update itself is the
    # same with or without the EMA: same seed, same batch)
    moved = 0
    for k in init:
        np.testing.assert_allclose(e1[k], 0.1 * init[k] + 0.9 * p1[k], rtol=1e-5, atol=1e-6, err_msg=k)
        moved += not np.array_equal(p1[k], init[k])
    assert moved > 0


def test_per_part_ema_decay_and_lr():
    """``train.grpo.dit_ema_decay`` / ``vlm_ema_decay`` (and ``*_lr``) set one part's optimizer only;
    unset (None) parts keep the section's values."""
    from ml_collections import ConfigDict

    from vans_jax.train.grpo import part_optim_cfg
    cfg = ConfigDict(dict(lr=1e-4, ema_decay=0.0, vlm_lr=1e-3, dit_lr=None, vlm_ema_decay=None, dit_ema_decay=0.9))
    dit, vlm = part_optim_cfg(cfg, "dit"), part_optim_cfg(cfg, "vlm")
    assert (dit.lr, dit.ema_decay) == (1e-4, 0.9)
    assert (vlm.lr, vlm.ema_decay) == (1e-3, 0.0)
    assert cfg.ema_decay == 0.0 and cfg.lr == 1e-4            # the section itself untouched
    params = {"w": jnp.ones((2,))}
    assert core.ema_params(core.init_state(params, core.make_optimizer(dit), seed=0)) is not None
    assert core.ema_params(core.init_state(params, core.make_optimizer(vlm), seed=0)) is None
