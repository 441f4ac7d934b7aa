"""Bench section ``pipeline``: a full N-step CFG Wan generation (``sampling.wan.generate``) vs
diffusers' ``WanPipeline``, plus our VANS generation with reference frames."""
from __future__ import annotations

import numpy as np

from .common import BenchContext, dit_forward_flops, figure, section, wan_models


@section("pipeline")
def bench_pipeline(ctx: BenchContext) -> list[dict]:
    from vans_jax.sampling import wan as wp

    models, torch_parts, reason = wan_models(ctx)
    c = ctx.cfg.pipeline
    height, width, num_frames = int(c.height), int(c.width), int(c.num_frames)
    steps, guidance, shift = int(c.num_steps), float(c.guidance_scale), float(c.shift)
    t_lat, h, w = wp.check_generation_size(models, height, width, num_frames)
    rng = np.random.default_rng(ctx.seed)
    noise = rng.standard_normal((1, models.latent_channels, t_lat, h, w)).astype(np.float32)
    text_len = int(c.text_len)
    kw = dict(noise=noise, num_steps=steps, guidance_scale=guidance, shift=shift, height=height, width=width,
              num_frames=num_frames, max_sequence_length=text_len)
    ours, video = ctx.ours(lambda: wp.generate(models, [str(c.caption)], **kw))
    ref = None
    if torch_parts is not None:
        t = ctx.torch
        pipe = torch_parts["pipe"]
        tnoise = t.from_numpy(noise).to(ctx.torch_device)

        def ref_generate():
            with t.inference_mode():
                return pipe(prompt=[str(c.caption)], negative_prompt="", height=height, width=width,
                            num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance,
                            latents=tnoise, output_type="np", max_sequence_length=text_len).frames

        ref, ref_video = ctx.reference(ref_generate)
        if tuple(ref_video.shape) != tuple(video.shape):
            raise RuntimeError(f"diffusers produced video {ref_video.shape}, ours {video.shape}")
    forwards = steps * (2 if guidance > 1.0 else 1)
    dit_cfg = models.dit.cfg
    flops = forwards * dit_forward_flops(dit_cfg, 1, t_lat, h, w, text_len)
    shape = dict(batch=1, video=[num_frames, height, width], latent=[t_lat, h, w], steps=steps,
                 guidance_scale=guidance, text_len=text_len, dit_forwards=forwards)
    ours["dit_tflops_per_s"] = flops / ours["steady_s"] / 1e12
    out = [figure("pipeline_t2v", "pipeline", f"text-to-video: encode caption, {steps} UniPC steps with CFG "
                  f"(2 DiT forwards a step), VAE decode to frames", shape, ctx.dtype, ours, ref, reason,
                  dit_flops=flops, note="dit_tflops_per_s = DiT FLOPs / whole-generation time (a lower bound on "
                                        "the DiT's rate: text encoding and VAE decode included)")]
    n_ref = int(c.n_ref)
    if n_ref > 0:
        refs = rng.standard_normal((1, models.latent_channels, n_ref, h, w)).astype(np.float32)
        vans, _ = ctx.ours(lambda: wp.generate(models, [str(c.caption)], ref_latents=refs, **kw))
        vflops = forwards * dit_forward_flops(dit_cfg, 1, n_ref + t_lat, h, w, text_len, n_ref)
        vans["dit_tflops_per_s"] = vflops / vans["steady_s"] / 1e12
        out.append(figure(
            "pipeline_vans", "pipeline", f"VANS video: as above with {n_ref} clean reference latent frames in "
            f"front ({n_ref}+{t_lat} latent frames through the DiT)",
            dict(shape, latent=[n_ref + t_lat, h, w], n_ref=n_ref), ctx.dtype, vans, None,
            "diffusers' WanPipeline has no reference-frame conditioning (pipeline_t2v is the like-for-like "
            "comparison)", dit_flops=vflops))
    return out
