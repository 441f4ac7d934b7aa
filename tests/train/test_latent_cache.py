"""The SFT-VDM latent cache (train.latent_cache): the same losses as the uncached step, reuse across
runs, and a new namespace when the VAE or the text encoder change (a new entry when the data do)."""
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.tiny import make_config
from vans_jax.train import loop
from vans_jax.train.latent_cache import LatentCache, cache_dir, content_key

RUN = {"video.height": 32, "video.width": 32, "train.steps": 3, "train.checkpoint_every": 0, "train.export": False}


def _run(world, workdir, cache):
    cfg = make_config(world, str(workdir), "sft_vdm", **RUN, **{"train.sft_vdm.latent_cache": cache})
    loop.train(cfg, progress=False)
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_cached_step_gives_the_uncached_losses_and_is_reused(tiny_world, tmp_path):
    shared = str(tmp_path / "cache")
    off = _run(tiny_world, tmp_path / "off", "off")
    cold = _run(tiny_world, tmp_path / "cold", shared)
    warm = _run(tiny_world, tmp_path / "warm", shared)
    assert len(off) == len(cold) == len(warm) == 3
    for rows in (cold, warm):
        np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in off], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose([r["grad_norm"] for r in rows], [r["grad_norm"] for r in off], rtol=1e-5)
    assert "cache/hit_rate" not in off[-1]
    assert cold[0]["cache/hit_rate"] < 1.0 and warm[-1]["cache/hit_rate"] == 1.0   # the second run encodes nothing
    ns = [d for d in os.listdir(shared)]
    assert len(ns) == 1 and os.path.isfile(os.path.join(shared, ns[0], "settings.json"))
    assert {"latents", "context", "ref"} <= set(os.listdir(os.path.join(shared, ns[0])))


def _vdm(world):
    from vans_jax.sampling import wan as wp
    return wp.from_pretrained(world["vdm"], dtype=jnp.float32)


def _perturbed(module):
    state = nnx.state(module, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    leaves[0] = leaves[0] + 1e-3
    nnx.update(module, jax.tree.unflatten(tree, leaves))


def test_namespaces_follow_the_models_and_entries_the_data(tiny_world, tmp_path):
    vdm = _vdm(tiny_world)
    render = types.SimpleNamespace(n_ref=3, height=32, width=32)
    c = LatentCache(str(tmp_path), vdm, render)
    clip = np.zeros((9, 32, 32, 3), np.uint8)
    lat = np.random.default_rng(0).normal(size=(16, 3, 4, 4)).astype(np.float32)
    c.put("latents", content_key(clip), lat)
    np.testing.assert_array_equal(c.get("latents", content_key(clip)), lat)
    # a new process: read from disk, same namespace
    c2 = LatentCache(str(tmp_path), vdm, render)
    assert c2.namespace == c.namespace
    np.testing.assert_array_equal(c2.get("latents", content_key(clip)), lat)
    # the data change: another key, a miss
    other = clip.copy()
    other[0, 0, 0, 0] = 1
    assert content_key(other) != content_key(clip) and c2.get("latents", content_key(other)) is None
    assert content_key("a red ball") != content_key("a red ball.")
    # the VAE or the text encoder change: another namespace, nothing of the old one is read
    _perturbed(vdm.vae)
    c3 = LatentCache(str(tmp_path), vdm, render)
    assert c3.namespace != c.namespace and c3.get("latents", content_key(clip)) is None
    vdm2 = _vdm(tiny_world)
    _perturbed(vdm2.text_encoder)
    assert LatentCache(str(tmp_path), vdm2, render).namespace not in (c.namespace, c3.namespace)
    # other reference settings: another namespace too
    assert LatentCache(str(tmp_path), _vdm(tiny_world), types.SimpleNamespace(n_ref=2, height=32, width=32)
                       ).namespace != c.namespace


def test_context_round_trip_and_damaged_entries(tiny_world, tmp_path):
    vdm = _vdm(tiny_world)
    c = LatentCache(str(tmp_path), vdm, types.SimpleNamespace(n_ref=3, height=32, width=32))
    ctx = np.zeros((vdm.text_len, 8), jnp.bfloat16)
    ctx[:5] = np.arange(40).reshape(5, 8)
    c.put("context", "k", ctx)
    stored = np.load(c._path("context", "k"))
    assert stored.shape == (5, 8)                         # without its zero tail
    fresh = LatentCache(str(tmp_path), vdm, types.SimpleNamespace(n_ref=3, height=32, width=32))
    back = fresh.get("context", "k")
    assert back.dtype == jnp.bfloat16 and back.shape == ctx.shape
    np.testing.assert_array_equal(back.astype(np.float32), ctx.astype(np.float32))
    with open(c._path("context", "k"), "wb") as f:        # damaged -> a miss (recomputed), counted
        f.write(b"not a npy")
    other = LatentCache(str(tmp_path), vdm, types.SimpleNamespace(n_ref=3, height=32, width=32))
    assert other.get("context", "k") is None and other.damaged == 1


def test_cache_dir_setting(tmp_path):
    assert cache_dir("auto", str(tmp_path)) == os.path.join(str(tmp_path), "latent_cache")
    assert cache_dir("auto", "") is None and cache_dir("off", str(tmp_path)) is None
    assert cache_dir(str(tmp_path / "c"), "w") == str(tmp_path / "c")
