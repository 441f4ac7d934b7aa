"""Wan generation pipeline (vans_jax.sampling.wan) on tiny random diffusers components saved
as a diffusers pipeline directory: loading, full T2V parity with diffusers' WanPipeline from the same
initial noise, the VANS reference-latent path and input validation."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from vans_jax.convert.safetensors_io import save_file  # noqa: E402
from vans_jax.convert.wan_dit import iter_dit_tensors  # noqa: E402
from vans_jax.sampling import wan as wp  # noqa: E402
from vans_jax.models.wan import text  # noqa: E402
from vans_jax.sampling import flow  # noqa: E402
from tests import tiny  # noqa: E402
from tests.utils import rel_err  # noqa: E402

Z = tiny.Z
VAE = tiny.PARITY_WAN["vae"]
SHIFT = 3.0                 # the saved scheduler's flow_shift (read back with shift=None)
H, W, F = 32, 48, 5         # latents (2, 4, 6)
CAPTIONS = ["a red cat runs on the grass", "the big dog"]


@pytest.fixture(scope="module")
def torch_pipe(tmp_path_factory):
    pipe = tiny.build_wan_pipeline(0, tiny.PARITY_WAN)
    d = str(tmp_path_factory.mktemp("wan_pipe"))
    pipe.save_pretrained(d, safe_serialization=True)
    return pipe, d


@pytest.fixture(scope="module")
def models(torch_pipe):
    return wp.from_pretrained(torch_pipe[1], "float32")


def _params(m):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


def _link_dir(src, dst, skip):
    os.makedirs(dst)
    for name in os.listdir(src):
        if name not in skip:
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    return dst


# ------------------------------------------------------------------------------------ loading


def test_from_pretrained_loads_all_parts(models, torch_pipe, tmp_path):
    _, d = torch_pipe
    assert os.path.isfile(os.path.join(d, "model_index.json"))
    assert models.dit.cfg.num_heads == 2 and models.dit.cfg.in_channels == Z and models.dit.cfg.text_dim == 32
    assert models.vae.cfg.z_dim == Z and models.vae.cfg.latents_std == tuple(VAE["latents_std"])
    assert models.text_encoder.config.d_model == 32
    assert models.tokenizer("a cat")["input_ids"][-1] == 1          # </s>
    assert models.scheduler.flow_shift == SHIFT and models.scheduler.unipc_mismatches() == []
    assert models.size_multiple == 16 and models.temporal_factor == 4 and models.text_len == 512
    from vans_jax.models import wan
    assert getattr(wan, "from_pretrained", wp.from_pretrained) is wp.from_pretrained

    # a missing subfolder is named
    with pytest.raises(FileNotFoundError, match=r"missing subfolder\(s\) vae/"):
        wp.from_pretrained(_link_dir(d, str(tmp_path / "novae"), {"vae"}))
    with pytest.raises(FileNotFoundError, match="transformer/.*dit_path"):
        wp.from_pretrained(_link_dir(d, str(tmp_path / "nodit"), {"transformer"}))

    # dit_path: the VANS-style file (original-Wan keys, "dit." prefix, no config.json) -> base config
    f = str(tmp_path / "vdm.safetensors")
    save_file({"dit." + k: v for k, v in iter_dit_tensors(models.dit, "wan")}, f)
    alt = wp.from_pretrained(d, dit_path=f)
    assert alt.dit.cfg == models.dit.cfg
    ref, got = _params(models.dit), _params(alt.dit)
    assert ref.keys() == got.keys() and all(np.array_equal(ref[k], got[k]) for k in ref)
    # no transformer/ at all, a diffusers transformer directory as dit_path
    alt2 = wp.from_pretrained(str(tmp_path / "nodit"), dit_path=os.path.join(d, "transformer"))
    assert alt2.dit.cfg == models.dit.cfg


# ------------------------------------------------------------------------------------ T2V parity


def test_t2v_matches_diffusers_pipeline(models, torch_pipe):
    pipe, _ = torch_pipe
    noise = np.random.default_rng(0).standard_normal((2, Z, 2, H // 8, W // 8)).astype(np.float32)
    kw = dict(height=H, width=W, num_frames=F, num_inference_steps=4, guidance_scale=4.0, max_sequence_length=512)
    with torch.no_grad():
        ref_lat = pipe(prompt=CAPTIONS, latents=torch.from_numpy(noise), output_type="latent", **kw).frames.numpy()
        ref_vid = pipe(prompt=CAPTIONS, latents=torch.from_numpy(noise), output_type="np", **kw).frames
    ours_kw = dict(noise=noise, num_steps=4, guidance_scale=4.0, shift=None, height=H, width=W, num_frames=F)
    lat = np.asarray(wp.generate(models, CAPTIONS, output_type="latent", **ours_kw))
    vid = wp.generate(models, CAPTIONS, output_type="float", **ours_kw)
    u8 = wp.generate(models, CAPTIONS, output_type="uint8", **ours_kw)
    assert lat.shape == ref_lat.shape == (2, Z, 2, 4, 6)
    assert vid.shape == ref_vid.shape == (2, F, H, W, 3) and u8.dtype == np.uint8 and u8.shape == vid.shape
    e_lat, e_vid = rel_err(lat, ref_lat), rel_err(vid, ref_vid)
    print(f"\nT2V parity: latents max abs {np.abs(lat - ref_lat).max():.2e} rel {e_lat:.2e}; "
          f"frames max abs {np.abs(vid - ref_vid).max():.2e} rel {e_vid:.2e}")
    assert e_lat < 1e-4 and e_vid < 1e-4
    assert np.abs(u8.astype(int) - np.round(ref_vid * 255).astype(int)).max() <= 1
    # not a degenerate pass: the result moved away from the noise and differs per caption
    assert rel_err(lat, noise) > 0.1 and np.abs(lat[0] - lat[1]).max() > 1e-2

    # same shapes again: nothing recompiles (jitted pieces are module level, keyed on the graphdef)
    sizes = (flow._sample_jit._cache_size(), wp._decode_jit._cache_size())
    wp.generate(models, CAPTIONS[::-1], output_type="uint8", **{**ours_kw, "guidance_scale": 2.5})
    assert (flow._sample_jit._cache_size(), wp._decode_jit._cache_size()) == sizes
    # negative prompt encoded once
    assert list(models._negative) == [("", 512)]


# ------------------------------------------------------------------------------------ VANS path


def _clip(seed, frames=13, h=40, w=56):
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def test_ref_frame_indices():
    np.testing.assert_array_equal(wp.ref_frame_indices(9, 6), [0, 1, 3, 4, 6, 8])   # 33 input frames
    np.testing.assert_array_equal(wp.ref_frame_indices(4, 3), [0, 1, 3])            # floor, not round
    np.testing.assert_array_equal(wp.ref_frame_indices(2, 3), [0, 0, 1])


@pytest.fixture(scope="module")
def clips():
    return np.stack([_clip(1), _clip(2)])                       # 13 frames -> 4 latent frames; 40x56 -> resized


def test_reference_latents(models, torch_pipe, clips):
    from vans_jax.data.video_io import resize_center_crop
    pipe, _ = torch_pipe
    refs = wp.reference_latents(models, clips, n_ref=3, height=H, width=W)
    assert refs.shape == (2, Z, 3, H // 8, W // 8) and refs.dtype == jnp.float32
    video = np.stack([resize_center_crop(c, H, W) for c in clips]).astype(np.float32) / 127.5 - 1.0
    video = video.transpose(0, 4, 1, 2, 3)
    full = np.asarray(wp.encode_video(models, video))
    assert full.shape == (2, Z, 4, H // 8, W // 8)
    np.testing.assert_array_equal(np.asarray(refs), full[:, :, [0, 1, 3]])     # floor(linspace(0, 3, 3))
    with torch.no_grad():   # normalized posterior mean vs diffusers' VAE
        mu = pipe.vae.encode(torch.from_numpy(video)).latent_dist.mean.numpy()
    m = np.asarray(VAE["latents_mean"], np.float32).reshape(1, -1, 1, 1, 1)
    s = np.asarray(VAE["latents_std"], np.float32).reshape(1, -1, 1, 1, 1)
    assert rel_err(full, (mu - m) / s) < 1e-4


def test_vans_generation(models, clips):
    kw = dict(num_steps=4, guidance_scale=5.0, shift=5.0, height=H, width=W, num_frames=F, seed=3)
    refs = wp.reference_latents(models, clips, n_ref=3, height=H, width=W)
    r1, r2 = refs[:1], refs[1:]                                 # batch-1 refs broadcast over the captions
    out1 = np.asarray(wp.generate(models, CAPTIONS, ref_latents=r1, output_type="latent", **kw))
    out2 = np.asarray(wp.generate(models, CAPTIONS, ref_latents=r2, output_type="latent", **kw))
    t2v = np.asarray(wp.generate(models, CAPTIONS, output_type="latent", **kw))
    assert out1.shape == (2, Z, 2, 4, 6)
    assert np.abs(out1 - out2).max() > 1e-3 and np.abs(out1 - t2v).max() > 1e-3
    # == flow.sample run by hand (noise from the seed, the negative prompt, refs in front)
    noise = jax.random.normal(jax.random.key(3), (2, Z, 2, 4, 6), jnp.float32)
    ctx = text.encode_prompts(models.text_encoder, models.tokenizer, CAPTIONS, 512)
    unc = text.encode_prompts(models.text_encoder, models.tokenizer, ["", ""], 512)
    manual = flow.sample(models.dit, noise, ctx, uncond_context=unc, guidance_scale=5.0,
                         ref_latents=jnp.concatenate([r1, r1]), num_steps=4, shift=5.0)
    np.testing.assert_allclose(out1, np.asarray(manual), rtol=0, atol=1e-6)
    # decoded frames for the VANS path: uint8 video of the target length
    vid = wp.generate(models, CAPTIONS, ref_latents=r1, **kw)
    assert vid.shape == (2, F, H, W, 3) and vid.dtype == np.uint8


# ------------------------------------------------------------------------------------ bad input


def test_bad_inputs(models):
    kw = dict(num_steps=4, height=H, width=W, num_frames=F, output_type="latent")
    with pytest.raises(ValueError, match=r"4k\+1 frames.*got num_frames=6"):
        wp.generate(models, ["a cat"], **{**kw, "num_frames": 6})
    with pytest.raises(ValueError, match="height=40, width=48"):
        wp.generate(models, ["a cat"], **{**kw, "height": 40})
    with pytest.raises(ValueError, match="height=32, width=56"):
        wp.generate(models, ["a cat"], **{**kw, "width": 56})
    with pytest.raises(ValueError, match="noise has shape"):
        wp.generate(models, ["a cat"], noise=np.zeros((1, Z, 3, 4, 6), np.float32), **kw)
    with pytest.raises(ValueError, match="ref_latents must be"):
        wp.generate(models, ["a cat"], ref_latents=np.zeros((1, Z, 2, 4, 4), np.float32), **kw)
    with pytest.raises(ValueError, match="output_type"):
        wp.generate(models, ["a cat"], **{**kw, "output_type": "pil"})
    with pytest.raises(ValueError, match="sampler mode"):
        wp.generate(models, ["a cat"], **{**kw, "mode": "ddim"})
    # reference clips: frames not 4k+1 (or trimmed to the last 4k+1), dtype, size
    clip = _clip(4, frames=8)
    with pytest.raises(ValueError, match=r"4k\+1 frames.*got num_frames=8"):
        wp.reference_latents(models, clip, n_ref=2, height=H, width=W)
    trimmed = wp.reference_latents(models, clip, n_ref=2, height=H, width=W, trim=True)
    np.testing.assert_array_equal(np.asarray(trimmed),
                                  np.asarray(wp.reference_latents(models, clip[-5:], n_ref=2, height=H, width=W)))
    with pytest.raises(TypeError, match="uint8"):
        wp.reference_latents(models, clip.astype(np.float32), height=H, width=W)
    with pytest.raises(ValueError, match="height=36"):
        wp.reference_latents(models, clip[:5], height=36, width=W)

    # an overlong caption is truncated (no error): two captions equal up to the cut give equal videos
    head = "a red cat runs on the grass " * 80                       # > 512 tokens
    a, b = head + "the big dog", head + "a video of a dog"
    ids, mask = text.tokenize(models.tokenizer, [a, b], 512)
    assert ids.shape == (2, 512) and mask.all() and (ids[:, -1] == 1).all()   # cut, </s> kept
    noise = np.repeat(np.random.default_rng(5).standard_normal((1, Z, 2, 4, 6)).astype(np.float32), 2, 0)
    out = np.asarray(wp.generate(models, [a, b], noise=noise, **kw))
    np.testing.assert_array_equal(out[0], out[1])
