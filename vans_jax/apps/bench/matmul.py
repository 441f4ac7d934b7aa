"""Bench section ``matmul``: one square matmul, the device's achievable dense rate (the yardstick
for the DiT's TFLOP/s)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .common import BenchContext, figure, fraction_of_peak, median_times, peak_bf16_tflops, section


@section("matmul")
def bench_matmul(ctx: BenchContext) -> list[dict]:
    n = int(ctx.cfg.matmul.size)
    key_a, key_b = jax.random.split(jax.random.key(ctx.seed))
    a = jax.random.normal(key_a, (n, n), jnp.float32).astype(ctx.jdtype)
    b = jax.random.normal(key_b, (n, n), jnp.float32).astype(ctx.jdtype)
    mm = jax.jit(lambda x, y: x @ y)
    repeats = int(ctx.cfg.matmul.repeats)
    ours, _ = median_times(lambda: mm(a, b), repeats, jax.block_until_ready)
    ours["device"] = ctx.device
    flops = 2 * n ** 3
    ours["tflops_per_s"] = flops / ours["steady_s"] / 1e12
    ctx.measured_matmul_tflops = ours["tflops_per_s"]
    ref, reason = None, ctx.reference_reason
    if ctx.torch is not None:
        t = ctx.torch
        ta = t.from_numpy(np.array(a.astype(jnp.float32))).to(ctx.torch_device, ctx.torch_dtype())
        tb = t.from_numpy(np.array(b.astype(jnp.float32))).to(ctx.torch_device, ctx.torch_dtype())
        ref, _ = median_times(lambda: ta @ tb, repeats, ctx.torch_sync)
        ref["device"] = ctx.torch_description()
        ref["tflops_per_s"] = flops / ref["steady_s"] / 1e12
    peak = peak_bf16_tflops(ctx.device_kind)
    return [figure("matmul", "matmul", f"one {n}x{n} @ {n}x{n} matmul (the device's achievable dense rate)",
                   dict(m=n, k=n, n=n), ctx.dtype, ours, ref, reason, flops=flops, peak_bf16_tflops=peak,
                   fraction_of_peak=fraction_of_peak(ours["tflops_per_s"], peak, ctx.dtype)[0])]
