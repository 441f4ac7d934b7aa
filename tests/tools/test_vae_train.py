"""The world's tiny Wan VAE: a short training run lowers the loss, the latent statistics land in the
config, and the exported diffusers directory loads in our loader and in diffusers with equal
encode / decode."""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from vans_jax.convert.safetensors_io import Checkpoint  # noqa: E402
from vans_jax.convert.wan_vae import load_vae  # noqa: E402
from vans_jax.data import synthetic  # noqa: E402
from vans_jax.models.wan.vae import WanVAE  # noqa: E402
from tools.tiny_world import vae_train as vt  # noqa: E402
from tools.tiny_world.clips import load_world_clips  # noqa: E402
from tests.utils import rel_err  # noqa: E402

SPEC = vt.TinyVAESpec(base_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("world"))
    synthetic.generate_world(d, "train", 16)
    synthetic.generate_world(d, "eval", 4)
    return d


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vdm")) + "/vae"
    # the encoder sees the decoded mp4s, the loss targets the exact rendered frames
    cfg = vt.VAETrainConfig(image_steps=10, image_batch_size=4, steps=6, batch_size=2, lr=3e-3, warmup_steps=2,
                            input_source="video")
    metrics = vt.train_vae(world, out, spec=SPEC, train_config=cfg, num_frames=5, stats_clips=8, seed=0, log=None)
    return out, metrics


def test_short_training_lowers_the_loss(trained):
    _, m = trained
    assert m["image_loss_last"] < 0.8 * m["image_loss_first"], m
    assert m["clip_loss_last"] < m["image_loss_first"], m          # the clip phase starts from the image phase
    assert np.isfinite(m["eval_psnr_target"]) and np.isfinite(m["eval_psnr_input"])
    assert m["train_clips"] == 32 and m["num_frames"] == 5 and m["image_steps"] == 10 and m["steps"] == 6


def test_latent_stats_are_written(trained, world):
    out, m = trained
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["_class_name"] == "AutoencoderKLWan" and cfg["latents_mean"] == m["latents_mean"]
    assert len(cfg["latents_std"]) == 16 and min(cfg["latents_std"]) > 0
    vae = load_vae(out)
    # recomputed on the same clips (the first 8 of a fixed permutation of the training clips, as the
    # encoder sees them: decoded) they agree
    clips = vt.vae_clips(load_world_clips(world, "train", source="video"), 5)
    idx = np.sort(np.random.default_rng(1).permutation(len(clips))[:8])
    mean, std = vt.latent_stats(vae, clips[idx])
    np.testing.assert_allclose(mean, cfg["latents_mean"], atol=2e-4)
    np.testing.assert_allclose(std, cfg["latents_std"], atol=2e-4)
    # normalized latents of those clips: zero mean, unit std per channel
    graphdef, state = nnx.split(vae)
    mu = np.asarray(vt._encode_mean(graphdef, state, jnp.asarray(clips[idx])))
    z = np.asarray(vae.normalize_latents(jnp.asarray(mu), channels_last=True)).reshape(-1, 16)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-2)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-2)


def test_export_matches_diffusers(trained):
    out, _ = trained
    ours = load_vae(out)
    ref = diffusers.AutoencoderKLWan.from_pretrained(out).eval()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 9, 32, 48)).astype(np.float32)
    with torch.no_grad():
        r = ref.encode(torch.from_numpy(x)).latent_dist
        r_mean = r.mean.numpy()
        r_dec = ref.decode(r.mean).sample.numpy()
    post = ours.encode(jnp.asarray(x))
    assert rel_err(post.mean, r_mean) < 1e-4 and rel_err(post.logvar, r.logvar.numpy()) < 1e-4
    assert rel_err(ours.decode(jnp.asarray(r_mean)), r_dec) < 1e-4
    assert ref.config.latents_std == list(ours.cfg.latents_std)


def test_state_dict_round_trip(trained):
    """vae_state_dict inverts the loader's mapping exactly (every key, shape and value)."""
    out, _ = trained
    vae = load_vae(out)
    sd = vt.vae_state_dict(vae)
    ck = Checkpoint(out)
    assert set(sd) == set(ck.keys())
    for k in sd:
        np.testing.assert_array_equal(sd[k], ck.get(k), err_msg=k)
    fresh = WanVAE(SPEC.config(), rngs=nnx.Rngs(3))
    assert set(vt.vae_state_dict(fresh)) == set(sd)


def test_exact_frame_metrics(trained, world):
    """The build measures the decoded mp4s' reconstructions against the exact rendered frames, and the
    codec alone (decoded vs exact: yuv420p blurs the world's coloured edges, a few tens of dB)."""
    out, m = trained
    assert np.isfinite(m["eval_psnr_exact_target"]) and np.isfinite(m["eval_psnr_exact_worst_clip"])
    assert 25.0 < m["eval_codec_psnr_worst_clip"] <= m["eval_codec_psnr"] < 60.0, m
    assert m["input_source"] == "video"
    vae = load_vae(out)
    ev, ex = (vt.vae_clips(load_world_clips(world, "eval", source=s), 5) for s in ("video", "render"))
    own, same = vt.reconstruction_psnr(vae, ev), vt.reconstruction_psnr(vae, ev, targets_u8=ev)
    assert own == same
    exact = vt.reconstruction_psnr(vae, ev, targets_u8=ex)
    assert exact["psnr"] != own["psnr"] and abs(exact["psnr"] - m["eval_psnr_exact_target"]) < 3.0
    # per frame index over all clips: 5 frames whose mean MSE is the overall one
    pf = np.asarray(exact["psnr_per_frame"])
    assert pf.shape == (5,) and len(m["eval_psnr_exact_per_frame"]) == 5
    np.testing.assert_allclose(10 * np.log10(1 / np.mean(10 ** (-pf / 10))), exact["psnr"], atol=0.02)
    with pytest.raises(ValueError, match="targets of shape"):
        vt.reconstruction_psnr(vae, ev, targets_u8=ex[:2])


def test_bad_input_source(world, tmp_path):
    with pytest.raises(ValueError, match="input_source must be"):
        vt.train_vae(world, str(tmp_path / "x"), spec=SPEC, train_config=vt.VAETrainConfig(input_source="mp4"),
                     log=None)
    with pytest.raises(ValueError, match="train_source must be 'render'"):
        vt.train_vae(world, str(tmp_path / "x"), spec=SPEC, train_config=vt.VAETrainConfig(input_source="video"),
                     train_source="video", log=None)


def test_vae_clips_and_bad_input(world):
    clips = load_world_clips(world, "eval")
    v = vt.vae_clips(clips)
    assert v.shape == (8, 9, 64, 64, 3)
    np.testing.assert_array_equal(v[4:], clips.inputs[:, -9:])
    with pytest.raises(ValueError, match="4k\\+1"):
        vt.vae_clips(clips, 8)
    with pytest.raises(FileNotFoundError, match="no train.csv"):
        vt.train_vae(os.path.dirname(world), "/nonexistent", spec=SPEC, log=None)


def test_training_init_is_a_per_frame_autoencoder():
    """init_for_training: residual blocks start as identities, the VAE as a 2D autoencoder applied
    to frame 0 and to the last frame of every 4-frame chunk, each decoded latent frame repeated."""
    vae = vt.init_for_training(WanVAE(SPEC.config(), rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 9, 16, 16, 3)).astype(np.float32))
    clip = np.asarray(vae.decode(vae.encode(x, channels_last=True).mean, channels_last=True))
    frame = lambda i: np.asarray(vae.decode(vae.encode(x[:, i:i + 1], channels_last=True).mean, channels_last=True))[:, 0]
    for t, src in ((0, 0), (1, 4), (3, 4), (4, 4), (5, 8), (8, 8)):
        np.testing.assert_allclose(clip[:, t], frame(src), atol=1e-5, err_msg=f"frame {t}")
    assert np.abs(frame(4) - frame(8)).max() > 1e-3
    biases = [v.get_value() for p, v in nnx.to_flat_state(nnx.state(vae, nnx.Param)) if p[-1] == "bias"]
    assert all(not np.any(np.asarray(b)) for b in biases)


def test_loss_terms_and_weights():
    """The step's loss is l1_weight * L1 + mse_weight * MSE + kl_weight * KL (+ edge_weight * edge when
    set, reported as "edge")."""
    import jax
    import optax
    vae = vt.init_for_training(WanVAE(SPEC.config(scan_unroll=True), rngs=nnx.Rngs(0)))
    graphdef, params, frozen = nnx.split(vae, vt._trainable_filter("all"), ...)
    rng = np.random.default_rng(0)
    batch = tuple(jnp.asarray(rng.integers(0, 255, (2, 1, 16, 16, 3), dtype=np.uint8)) for _ in range(2))
    tx = optax.sgd(0.0)

    def metrics(**kw):
        step = vt._make_step(graphdef, tx, vt.VAETrainConfig(**kw))
        _, _, m = step(jax.tree.map(jnp.copy, params), frozen, tx.init(params), batch, jax.random.key(0))
        return {k: float(v) for k, v in m.items()}

    base = metrics()
    assert "edge" not in base
    np.testing.assert_allclose(base["loss"], base["l1"] + base["mse"] + 1e-6 * base["kl"], rtol=1e-5)
    m = metrics(l1_weight=0.0, mse_weight=2.0, edge_weight=0.5)
    assert m["edge"] > 0
    np.testing.assert_allclose(m["loss"], 2.0 * m["mse"] + 1e-6 * m["kl"] + 0.5 * m["edge"], rtol=1e-5)
    np.testing.assert_allclose(m["l1"], base["l1"], rtol=1e-5)      # the weights do not change the terms


def test_schedule_and_phase_lr():
    cfg = vt.VAETrainConfig(lr=1e-3, clip_lr=3e-4, warmup_steps=5, lr_end_ratio=0.1)
    assert vt._phase_lr(cfg, "image") == 1e-3 and vt._phase_lr(cfg, "clip") == 3e-4
    assert vt._phase_lr(vt.VAETrainConfig(lr=1e-3), "clip") == 1e-3
    sched = vt._schedule(cfg, 100, vt._phase_lr(cfg, "clip"))
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 3e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 3e-5, rtol=1e-5)


def test_bad_loss_config(world, tmp_path):
    for kw, match in (({"lr_end_ratio": 1.5}, "lr_end_ratio must be in"),
                      ({"edge_weight": -1.0}, "loss weights must be >= 0"),
                      ({"l1_weight": 0.0, "mse_weight": 0.0}, "l1_weight \\+ mse_weight > 0")):
        with pytest.raises(ValueError, match=match):
            vt.train_vae(world, str(tmp_path / "x"), spec=SPEC, train_config=vt.VAETrainConfig(**kw), log=None)


def _params(vae):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


def test_decoder_only_finetune_keeps_the_latent_space(trained, world, tmp_path):
    """``init_from`` + ``trainable="decoder"``: the encoder, ``quant_conv`` and the latent statistics are
    exactly those of the starting VAE (a DiT trained on its latents stays valid); the decoder moves."""
    src, m0 = trained
    out = str(tmp_path / "vae_dec")
    cfg = vt.VAETrainConfig(init_from=src, trainable="decoder", image_steps=0, steps=4, batch_size=2, lr=3e-3,
                            warmup_steps=1, input_source="video")
    m = vt.train_vae(world, out, spec=SPEC, train_config=cfg, num_frames=5, log=None)
    assert m["trainable"] == "decoder" and m["init_from"] == src and m["steps"] == 4
    assert m["latents_mean"] == m0["latents_mean"] and m["latents_std"] == m0["latents_std"]
    before, after = _params(load_vae(src)), _params(load_vae(out))
    assert before.keys() == after.keys()
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved and all(k.split(".")[0] in vt.DECODER_PARTS for k in moved), sorted(moved)[:5]
    assert any(k.startswith("decoder.") for k in moved)
    # the encoder gives the very same latents
    clips = vt.vae_clips(load_world_clips(world, "eval"), 5)[:2]
    mu0 = vt._encode_mean(*nnx.split(load_vae(src)), jnp.asarray(clips))
    mu1 = vt._encode_mean(*nnx.split(load_vae(out)), jnp.asarray(clips))
    np.testing.assert_array_equal(np.asarray(mu0), np.asarray(mu1))


def test_bad_finetune_config(trained, world, tmp_path):
    src, _ = trained
    for kw, err, match in (({"trainable": "decoder"}, ValueError, "set init_from"),
                           ({"trainable": "encoder", "init_from": src}, ValueError, "trainable must be 'all' or 'decoder'"),
                           ({"init_from": str(tmp_path / "missing")}, FileNotFoundError, "no VAE directory at")):
        with pytest.raises(err, match=match):
            vt.train_vae(world, str(tmp_path / "x"), spec=SPEC, train_config=vt.VAETrainConfig(**kw), log=None)


def test_training_resumes_exactly(world, tmp_path):
    """A run stopped (in the image phase, then at the phase boundary) and resumed from its checkpoint
    ends with the same weights and history as the uninterrupted run; other settings are refused."""
    cfg = vt.VAETrainConfig(image_steps=5, image_batch_size=2, steps=3, batch_size=2, lr=3e-3, warmup_steps=2)
    kw = dict(spec=SPEC, train_config=cfg, num_frames=5, stats_clips=4, seed=0, log=None, max_train_samples=8,
              max_eval_samples=2)
    whole = vt.train_vae(world, str(tmp_path / "whole"), **kw)
    ck = str(tmp_path / "ck")
    assert vt.train_vae(world, str(tmp_path / "part"), checkpoint_dir=ck, checkpoint_every=2, stop_after=3,
                        **kw) == {"stopped_at": {"phase": "image", "step": 3}}
    assert json.load(open(os.path.join(ck, "meta.json")))["step"] == 3
    assert vt.train_vae(world, str(tmp_path / "part"), checkpoint_dir=ck, stop_after=2,
                        **kw) == {"stopped_at": {"phase": "clip", "step": 0}}
    assert not os.path.exists(os.path.join(tmp_path, "part", "config.json"))     # nothing exported yet
    m = vt.train_vae(world, str(tmp_path / "part"), checkpoint_dir=ck, **kw)
    for k in ("image_loss_first", "image_loss_last", "clip_loss_last", "eval_psnr_target", "latents_mean"):
        np.testing.assert_allclose(m[k], whole[k], rtol=1e-6, err_msg=k)
    a, b = Checkpoint(str(tmp_path / "whole")), Checkpoint(str(tmp_path / "part"))
    for k in a.keys():
        np.testing.assert_allclose(b.get(k), a.get(k), rtol=1e-6, atol=1e-7, err_msg=k)
    # a finished checkpoint: the call only exports again
    again = vt.train_vae(world, str(tmp_path / "again"), checkpoint_dir=ck, **kw)
    np.testing.assert_allclose(again["eval_psnr_target"], whole["eval_psnr_target"], rtol=1e-6)
    other = dict(kw, train_config=dataclasses.replace(cfg, image_steps=6, lr=2e-3))
    with pytest.raises(ValueError, match=r"another VAE run \(it differs in \['train_config.image_steps', "
                                         r"'train_config.lr'\]\)"):
        vt.train_vae(world, str(tmp_path / "x"), checkpoint_dir=ck, **other)
    # other clip-phase settings only: the run continues from the end of the image phase the checkpoint kept,
    # as the uninterrupted run with those settings
    new = dict(kw, train_config=dataclasses.replace(cfg, steps=2, clip_lr=1e-3))
    whole2 = vt.train_vae(world, str(tmp_path / "whole2"), **new)
    m2 = vt.train_vae(world, str(tmp_path / "part2"), checkpoint_dir=ck, **new)
    assert len(json.load(open(os.path.join(ck, "meta.json")))["history"]["clip"]) == 2
    for k in ("image_loss_last", "clip_loss_first", "clip_loss_last", "eval_psnr_target"):
        np.testing.assert_allclose(m2[k], whole2[k], rtol=1e-6, err_msg=k)
    a, b = Checkpoint(str(tmp_path / "whole2")), Checkpoint(str(tmp_path / "part2"))
    for k in a.keys():
        np.testing.assert_allclose(b.get(k), a.get(k), rtol=1e-6, atol=1e-7, err_msg=k)
