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


def _count_decodes(monkeypatch):
    from vans_jax.data.loader import VNEPSource
    calls = []
    real = VNEPSource.load

    def load(self, i):
        calls.append(int(i))
        return real(self, i)

    monkeypatch.setattr(VNEPSource, "load", load)
    return calls


def test_cached_step_gives_the_uncached_losses_and_is_reused(tiny_world, tmp_path, monkeypatch):
    """The cached runs train on the uncached numbers; a run whose examples are all in the cache encodes
    nothing and decodes no clip (their aliases stand for them); a rewritten video is decoded again."""
    shared = str(tmp_path / "cache")
    off = _run(tiny_world, tmp_path / "off", "off")
    calls = _count_decodes(monkeypatch)
    cold = _run(tiny_world, tmp_path / "cold", shared)
    cold_calls = list(calls)
    assert cold_calls and cold[0]["cache/decode_skipped"] == 0.0
    del calls[:]
    warm = _run(tiny_world, tmp_path / "warm", shared)
    assert calls == []                                   # every example from its alias
    assert all(r["cache/decode_skipped"] == 1.0 for r in warm)
    assert all(r["throughput/frames_per_s"] > 0 for r in warm)
    assert len(off) == len(cold) == len(warm) == 3
    for rows in (cold, warm):
        np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in off], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose([r["grad_norm"] for r in rows], [r["grad_norm"] for r in off], rtol=1e-5)
    assert "cache/hit_rate" not in off[-1]
    assert cold[0]["cache/hit_rate"] < 1.0 and warm[-1]["cache/hit_rate"] == 1.0   # the second run encodes nothing
    ns = [d for d in os.listdir(shared)]
    assert len(ns) == 1 and os.path.isfile(os.path.join(shared, ns[0], "settings.json"))
    assert {"latents", "context", "ref", "sources"} <= set(os.listdir(os.path.join(shared, ns[0])))
    # a video rewritten (same bytes, new modification time): the examples that read it are decoded again
    import csv
    with open(tiny_world["train_csv"]) as f:
        rows = list(csv.DictReader(f))
    i0 = cold_calls[0]
    path = os.path.join(tiny_world["video_root"], rows[i0]["output_video_path"])
    readers = {i for i, r in enumerate(rows) if path in (os.path.join(tiny_world["video_root"], r["input_video_path"]),
                                                         os.path.join(tiny_world["video_root"], r["output_video_path"]))}
    st = os.stat(path)
    try:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
        again = _run(tiny_world, tmp_path / "again", shared)
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    np.testing.assert_allclose([r["loss"] for r in again], [r["loss"] for r in cold], rtol=1e-6, atol=1e-8)
    assert i0 in calls and set(calls) <= readers
    assert min(r["cache/decode_skipped"] for r in again) < 1.0


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


def test_an_entry_gone_after_its_alias_was_read_is_decoded(tiny_world, tmp_path, monkeypatch):
    """The step decodes the examples given from aliases when an entry they name is missing by then,
    and encodes the same latents."""
    from vans_jax.train.latent_cache import CachedSource
    shared = str(tmp_path / "cache")
    _run(tiny_world, tmp_path / "cold", shared)
    cfg = make_config(tiny_world, str(tmp_path / "w"), "sft_vdm", **RUN, **{"train.sft_vdm.latent_cache": shared})
    from vans_jax import parallel
    mesh = parallel.make_mesh(dict(cfg.mesh))
    runner = loop.build_runner(cfg, "sft_vdm", mesh)
    src = runner.cached_source(loop.data_source(cfg, "sft_vdm"))
    assert isinstance(src, CachedSource)
    aliased = [src[i] for i in range(len(src))]
    aliased = [e for e in aliased if e.get("cached_keys")]
    assert aliased and all(e["target"] is None and e["reference"] is None for e in aliased)
    e = aliased[0]
    want = np.load(src.entry_path("latents", e["cached_keys"]["latents"]))
    os.remove(src.entry_path("latents", e["cached_keys"]["latents"]))     # gone; and not in this process's memory
    calls = _count_decodes(monkeypatch)
    out = runner._cached([e], ("latents", "context", "ref"))
    assert calls == [e["source_index"]]
    np.testing.assert_allclose(np.asarray(out["latents"])[0], want, rtol=1e-5, atol=1e-6)
    assert os.path.exists(src.entry_path("latents", e["cached_keys"]["latents"]))   # written again
    # a decoded example's alias needs every entry: with one missing it is decoded by the source
    os.remove(src.entry_path("ref", e["cached_keys"]["ref"]))
    assert src[e["source_index"]]["cached_keys"] is None
