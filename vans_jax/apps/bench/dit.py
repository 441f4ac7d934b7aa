"""Bench section ``dit``: one Wan DiT forward and one training step (velocity MSE + gradient, no
optimizer update) with achieved TFLOP/s, vs diffusers' ``WanTransformer3DModel`` forward / backward."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .common import (BenchContext, dit_forward_flops, figure, fraction_of_peak, output_parity, peak_bf16_tflops,
                     section, wan_models)


@section("dit")
def bench_dit(ctx: BenchContext) -> list[dict]:
    models, torch_parts, reason = wan_models(ctx)
    c = ctx.cfg.dit
    dit = models.dit
    cfg = dit.cfg
    s = models.spatial_factor
    b, n_ref, frames = int(c.batch), int(c.n_ref), int(c.n_ref) + int(c.target_frames)
    h, w, text_len = int(c.height) // s, int(c.width) // s, int(c.text_len)
    rng = np.random.default_rng(ctx.seed)
    x = rng.standard_normal((b, cfg.in_channels, frames, h, w)).astype(np.float32)
    target = rng.standard_normal((b, cfg.out_channels, frames - n_ref, h, w)).astype(np.float32)
    tsteps = rng.uniform(0, 1000, b).astype(np.float32)
    context = rng.standard_normal((b, text_len, cfg.text_dim)).astype(np.float32)

    graphdef, params, rest = nnx.split(dit, nnx.Param, ...)
    train_graphdef = graphdef
    if str(c.remat) != cfg.remat:
        tmp = nnx.merge(graphdef, params, rest)
        tmp.cfg = dataclasses.replace(cfg, remat=str(c.remat))
        train_graphdef = nnx.split(tmp, nnx.Param, ...)[0]

    def forward(params, x, t, ctx_):
        return nnx.merge(graphdef, params, rest)(x.astype(ctx.jdtype), t, ctx_.astype(ctx.jdtype), n_ref=n_ref)

    def loss(params, x, t, ctx_, target):
        v = nnx.merge(train_graphdef, params, rest)(x.astype(ctx.jdtype), t, ctx_.astype(ctx.jdtype), n_ref=n_ref)
        return jnp.mean((v.astype(jnp.float32) - target) ** 2)

    fwd = jax.jit(forward)
    step = jax.jit(jax.value_and_grad(loss))
    xs, ts, cs, tg = (jnp.asarray(a) for a in (x, tsteps, context, target))
    ours_fwd, ours_out = ctx.ours(lambda: fwd(params, xs, ts, cs))
    train_step = bool(c.get("train_step", True))
    ours_step = ctx.ours(lambda: step(params, xs, ts, cs, tg))[0] if train_step else None

    flops = dit_forward_flops(cfg, b, frames, h, w, text_len, n_ref)
    tokens = (frames // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    ref_fwd = ref_step = None
    parity = dict(parity_rel_err=None, parity_mean_rel_err=None)
    if torch_parts is not None:
        t = ctx.torch
        tdit = torch_parts["transformer"]
        dev, tdt = ctx.torch_device, ctx.torch_dtype()
        tx, tt, tc = (t.from_numpy(a).to(dev) for a in (x, tsteps, context))
        tx, tc = tx.to(tdt), tc.to(tdt)
        ttarget = t.from_numpy(target).to(dev)

        def ref_forward():
            with t.inference_mode():
                return tdit(tx, tt, tc, return_dict=False)[0][:, :, n_ref:]

        def ref_train():
            for p in tdit.parameters():
                p.grad = None
            out = tdit(tx, tt, tc, return_dict=False)[0][:, :, n_ref:]
            value = ((out.float() - ttarget) ** 2).mean()
            value.backward()
            return value

        ref_fwd, ref_out = ctx.reference(ref_forward)
        parity = output_parity(ours_out, ref_out.float().cpu().numpy())
        if train_step:
            for p in tdit.parameters():
                p.requires_grad_(True)
            ref_step, _ = ctx.reference(ref_train)
            for p in tdit.parameters():
                p.requires_grad_(False)
                p.grad = None
    peak = peak_bf16_tflops(ctx.device_kind)
    shape = dict(batch=b, latent_channels=cfg.in_channels, latent_frames=[n_ref, frames - n_ref],
                 latent_hw=[h, w], pixel_hw=[int(c.height), int(c.width)], tokens=tokens, text_len=text_len,
                 dim=cfg.dim, layers=cfg.num_layers, heads=cfg.num_heads, ffn=cfg.ffn_dim)
    out = []
    for name, what, ours, ref, mult, remat, extra in (
            ("dit_forward", "one DiT forward (velocity on the target frames)", ours_fwd, ref_fwd, 1, cfg.remat,
             dict(parity, attn_impl=cfg.attn_impl)),
            ("dit_train_step", "velocity MSE + gradient w.r.t. all DiT parameters (no optimizer update)",
             ours_step, ref_step, 3, str(c.remat), {})):
        if ours is None:
            continue
        f = flops * mult
        for stats in (ours, ref):
            if stats is not None:
                stats["tflops_per_s"] = f / stats["steady_s"] / 1e12
        frac, frac_reason = fraction_of_peak(ours["tflops_per_s"], peak, ctx.dtype)
        out.append(figure(
            name, "dit", what, dict(shape, remat=remat), ctx.dtype, ours, ref, reason,
            flops=f, flops_method=("analytic matmul count from the shapes "
                                   "(vans_jax.apps.bench.common.dit_forward_flops"
                                   + (", x3 for forward + backward)" if mult == 3 else ")")),
            peak_bf16_tflops=peak, fraction_of_peak=frac, fraction_of_peak_reason=frac_reason,
            fraction_of_measured_matmul=(ours["tflops_per_s"] / ctx.measured_matmul_tflops
                                         if ctx.measured_matmul_tflops else None), **extra))
    return out
