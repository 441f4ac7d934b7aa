"""Bench section ``vae``: Wan VAE encode / decode vs diffusers' ``AutoencoderKLWan``."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .common import BenchContext, figure, section, wan_models


@section("vae")
def bench_vae(ctx: BenchContext) -> list[dict]:
    """The pipeline's VAE steps: clip -> normalized latents (``pipeline.encode_video``: posterior mean,
    normalized) and latents -> uint8 frames on the host (``pipeline.decode_latents``, as ``generate``);
    the reference does the same with ``AutoencoderKLWan`` and WanPipeline's post-processing."""
    from vans_jax.sampling import wan as wp

    models, torch_parts, reason = wan_models(ctx)
    c = ctx.cfg.vae
    vae = models.vae
    height, width, num_frames = int(c.height), int(c.width), int(c.num_frames)
    vae.check_video_shape((1, 3, num_frames, height, width))
    rng = np.random.default_rng(ctx.seed)
    video = rng.uniform(-1, 1, (1, 3, num_frames, height, width)).astype(np.float32)
    v = jnp.asarray(video)
    enc, latents = ctx.ours(lambda: wp.encode_video(models, v))
    dec, frames = ctx.ours(lambda: wp.decode_latents(models, latents, "uint8"))
    if frames.shape != (1, num_frames, height, width, 3):
        raise RuntimeError(f"VAE round trip gave {frames.shape}, expected {(1, num_frames, height, width, 3)}")
    ref_enc = ref_dec = None
    if torch_parts is not None:
        t = ctx.torch
        tvae, pipe = torch_parts["vae"], torch_parts["pipe"]
        dev, tdt = ctx.torch_device, ctx.torch_dtype(vae.cfg.dtype)
        z = tvae.config.z_dim
        mean = t.tensor(tvae.config.latents_mean).view(1, z, 1, 1, 1).to(dev, tdt)
        std = t.tensor(tvae.config.latents_std).view(1, z, 1, 1, 1).to(dev, tdt)
        tv = t.from_numpy(video).to(dev, tdt)
        tz = t.from_numpy(np.array(latents, np.float32)).to(dev, tdt)

        def ref_encode():
            with t.inference_mode():
                return (tvae.encode(tv).latent_dist.mean - mean) / std

        def ref_decode():   # as WanPipeline.__call__ after the denoising loop (output_type="np"), then uint8
            with t.inference_mode():
                out = tvae.decode(tz * std + mean, return_dict=False)[0]
                frames01 = pipe.video_processor.postprocess_video(out, output_type="np")
                return np.round(frames01 * 255).astype(np.uint8)

        ref_enc, _ = ctx.reference(ref_encode)
        ref_dec, _ = ctx.reference(ref_decode)
    shape = dict(batch=1, video=[3, num_frames, height, width], latents=list(latents.shape[1:]),
                 base_dim=vae.cfg.base_dim)
    return [figure("vae_encode", "vae", "VAE encode: posterior mean, normalized", shape, vae.cfg.dtype, enc,
                   ref_enc, reason),
            figure("vae_decode", "vae", "VAE decode: denormalize, decode, uint8 frames on the host", shape,
                   vae.cfg.dtype, dec, ref_dec, reason)]
