"""WanVAE vs diffusers' AutoencoderKLWan on a tiny random config: chunked encode (frame 0, then
chunks of 4) and decode (one latent frame at a time), loading a ``save_pretrained`` directory,
input validation, checkpoint coverage errors and latent normalization."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vans_jax.convert.safetensors_io import Checkpoint, CheckpointError, save_file
from vans_jax.convert.wan_vae import check_coverage, key_table, load_vae
from vans_jax.models.wan.vae import WanVAEConfig
from tests.utils import rel_err

diffusers = pytest.importorskip("diffusers")

TINY = dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], dropout=0.0,
            latents_mean=[0.3, -0.7, 1.1, 0.05], latents_std=[1.9, 0.6, 2.4, 1.2])
H, W = 32, 48  # non-square; latents 4 x 6


@pytest.fixture(scope="module")
def ref_model():
    torch.manual_seed(0)
    m = diffusers.AutoencoderKLWan(**TINY).eval()
    with torch.no_grad():  # non-trivial norm scales, so every gamma mapping matters
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.add_(torch.randn_like(p) * 0.3)
    return m


@pytest.fixture(scope="module")
def vae_dir(ref_model, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("wan_vae"))
    ref_model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def vae(vae_dir):
    return load_vae(vae_dir)  # config from config.json


_encode = nnx.jit(lambda m, x: m.encode(x))
_decode = nnx.jit(lambda m, z: m.decode(z))


def test_config_from_save_pretrained(vae, vae_dir):
    cfg = vae.cfg
    assert cfg.base_dim == 16 and cfg.z_dim == 4 and cfg.dim_mult == (1, 2, 2, 2)
    assert cfg.temperal_downsample == (False, True, True)
    assert cfg.latents_mean == tuple(TINY["latents_mean"]) and cfg.latents_std == tuple(TINY["latents_std"])
    assert cfg.temporal_compression == 4 and cfg.spatial_compression == 8
    assert WanVAEConfig.from_diffusers_config(vae_dir) == cfg
    # the torch reference can be rebuilt from the directory without accelerate
    m = diffusers.AutoencoderKLWan.from_config(diffusers.AutoencoderKLWan.load_config(vae_dir))
    ck = Checkpoint(vae_dir)
    m.load_state_dict({k: torch.from_numpy(np.array(ck.get(k))) for k in ck.keys()}, strict=True)


# (40, 56): odd latent sizes 5 x 7 through every stride-2 stage
@pytest.mark.parametrize("batch,frames,hw", [(2, 5, (H, W)), (1, 9, (40, 56))])
def test_encode_matches_diffusers(vae, ref_model, batch, frames, hw):
    H, W = hw
    x = np.random.default_rng(frames).uniform(-1, 1, (batch, 3, frames, H, W)).astype(np.float32)
    post = _encode(vae, jnp.asarray(x))
    with torch.no_grad():
        ref = ref_model.encode(torch.from_numpy(x)).latent_dist
    t = 1 + (frames - 1) // 4
    assert post.mean.shape == post.logvar.shape == (batch, 4, t, H // 8, W // 8)
    assert rel_err(post.mean, ref.mean.numpy()) < 1e-4
    assert rel_err(post.logvar, ref.logvar.numpy()) < 1e-4


@pytest.mark.parametrize("batch,latent_frames,hw", [(2, 2, (H, W)), (1, 3, (40, 56))])
def test_decode_matches_diffusers(vae, ref_model, batch, latent_frames, hw):
    H, W = hw
    z = np.random.default_rng(latent_frames).standard_normal((batch, 4, latent_frames, H // 8, W // 8))
    z = z.astype(np.float32)
    out = np.asarray(_decode(vae, jnp.asarray(z)))
    with torch.no_grad():
        ref = ref_model.decode(torch.from_numpy(z)).sample.numpy()
    assert out.shape == ref.shape == (batch, 3, 1 + 4 * (latent_frames - 1), H, W)
    assert np.abs(ref).max() <= 1.0 and (np.abs(ref) < 1.0).mean() > 0.9  # clamping active but rare
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert rel_err(out, ref) < 1e-4


def test_chunk_loops_are_scans(vae):
    """Only the first chunk is unrolled; the rest is one lax.scan over chunks (bounded memory)."""
    graphdef, state = nnx.split(vae)

    def scan_lengths(fn, shape):
        jaxpr = jax.make_jaxpr(lambda s, a: fn(nnx.merge(graphdef, s), a))(state, jnp.zeros(shape))
        return [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]

    assert scan_lengths(lambda m, x: m.encode(x).mean, (1, 3, 17, H, W)) == [4]
    assert scan_lengths(lambda m, z: m.decode(z), (1, 4, 5, 4, 6)) == [4]
    assert scan_lengths(lambda m, x: m.encode(x).mean, (1, 3, 1, H, W)) == []


def test_channels_last_matches(vae):
    x = np.random.default_rng(3).uniform(-1, 1, (1, 3, 1, H, W)).astype(np.float32)
    a = vae.encode(jnp.asarray(x)).mean
    b = vae.encode(jnp.asarray(x.transpose(0, 2, 3, 4, 1)), channels_last=True).mean
    np.testing.assert_allclose(np.asarray(b).transpose(0, 4, 1, 2, 3), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_bad_inputs(vae):
    with pytest.raises(ValueError, match=r"4k\+1 frames.*got 8 frames"):
        vae.encode(jnp.zeros((1, 3, 8, H, W)))
    with pytest.raises(ValueError, match=r"divisible by 8; got 30x48"):
        vae.encode(jnp.zeros((1, 3, 5, 30, W)))
    with pytest.raises(ValueError, match=r"divisible by 8; got 32x44"):
        vae.encode(jnp.zeros((1, 3, 5, H, 44)))
    with pytest.raises(ValueError, match="channels"):
        vae.encode(jnp.zeros((1, 4, 5, H, W)))
    with pytest.raises(ValueError, match="z_dim=4"):
        vae.decode(jnp.zeros((1, 16, 2, 4, 6)))
    with pytest.raises(ValueError, match="attn_scales"):
        WanVAEConfig(attn_scales=(0.5,))
    with pytest.raises(ValueError, match="is_residual"):
        WanVAEConfig.from_diffusers_config({**TINY, "is_residual": True})


def test_bad_checkpoint_keys(vae_dir, tmp_path):
    ck = Checkpoint(vae_dir)
    tensors = {k: np.array(ck.get(k)) for k in ck.keys()}
    cfg = WanVAEConfig.from_diffusers_config(vae_dir)
    assert set(key_table(cfg)) == set(tensors)
    tensors.pop("decoder.up_blocks.0.upsamplers.0.time_conv.weight")
    tensors["encoder.extra.weight"] = np.zeros((2,), np.float32)
    tensors["encoder.mid_block.attentions.0.norm.gamma"] = np.ones((64, 1, 1, 1), np.float32)
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(vae_dir, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    with pytest.raises(CheckpointError) as e:
        load_vae(str(tmp_path))
    msg = str(e.value)
    assert "missing" in msg and "decoder.up_blocks.0.upsamplers.0.time_conv.weight" in msg
    assert "unexpected" in msg and "encoder.extra.weight" in msg
    assert "mis-shaped" in msg and "encoder.mid_block.attentions.0.norm.gamma" in msg and "(32, 1, 1)" in msg
    with pytest.raises(CheckpointError, match="mis-shaped"):  # a config that does not fit the weights
        check_coverage(Checkpoint(vae_dir), WanVAEConfig(**{**TINY, "base_dim": 8, "attn_scales": ()}))


def test_normalize_round_trip(vae):
    mu = jnp.asarray(np.random.default_rng(5).standard_normal((2, 4, 3, 4, 6)).astype(np.float32))
    z = vae.normalize_latents(mu)
    mean = np.asarray(TINY["latents_mean"], np.float32).reshape(1, 4, 1, 1, 1)
    std = np.asarray(TINY["latents_std"], np.float32).reshape(1, 4, 1, 1, 1)
    np.testing.assert_allclose(np.asarray(z), (np.asarray(mu) - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vae.denormalize_latents(z)), np.asarray(mu), rtol=1e-5, atol=1e-6)
    zl = vae.normalize_latents(jnp.moveaxis(mu, 1, -1), channels_last=True)
    np.testing.assert_allclose(np.asarray(jnp.moveaxis(zl, -1, 1)), np.asarray(z), rtol=1e-6, atol=1e-6)


def test_bf16_load_runs(vae_dir, vae):
    vb = load_vae(vae_dir, dtype="bfloat16")
    assert vb.decoder.conv_in.kernel[...].dtype == jnp.bfloat16
    x = np.random.default_rng(7).uniform(-1, 1, (2, 3, 5, H, W)).astype(np.float32)  # shapes compiled above
    a = np.asarray(_encode(vb, jnp.asarray(x)).mean.astype(jnp.float32))
    b = np.asarray(_encode(vae, jnp.asarray(x)).mean)
    assert np.isfinite(a).all() and rel_err(a, b) < 5e-2


def test_single_frame_conv_is_the_padded_conv():
    """A causal conv's first frame (zero cache) runs as its last time tap's 2D conv: the same numbers
    and the same new cache as the 3-tap conv over the zero-padded frame, for stride 1 and 2 in space."""
    from vans_jax.models.wan.vae import CausalConv3d

    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 1, 9, 7, 3)).astype(np.float32))
    for stride in (1, (1, 2, 2)):
        conv = CausalConv3d(3, 5, 3, stride=stride, padding=1, dtype=jnp.float32, rngs=nnx.Rngs(2))
        y, cache = conv(x)
        xp = jnp.concatenate([jnp.zeros((2, 2) + x.shape[2:]), x], axis=1)
        ref = conv.conv(xp)
        assert y.shape == ref.shape
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(cache), np.asarray(xp[:, -2:]))
