"""``vans-jax bench``: throughput of our JAX models, and of the PyTorch references (transformers,
diffusers) on the same shapes, weights and dtype in the same run.

Sections (a registry by name, ``common.SECTIONS``; ``cfg.sections`` picks and orders them; a new
one is a module of this package with a function decorated ``@section("name")`` returning a list of
``figure(...)`` dicts, imported below so that it registers):

- ``matmul`` (``matmul.py``): one square matmul, the device's achievable dense rate (the yardstick
  for the DiT).
- ``vlm`` (``vlm.py``): Qwen2.5-VL prefill of one video prompt and decode of G x N new tokens
  (``models.qwen2_5_vl.generate``) vs ``transformers ... .generate`` (sampling, EOS suppressed on
  both sides so every row decodes exactly N tokens).
- ``dit`` (``dit.py``): one Wan DiT forward and one training step (velocity MSE + gradient w.r.t.
  every DiT parameter, no optimizer update) on n_ref + target latent frames, with achieved TFLOP/s
  from an analytic FLOP count (``dit_forward_flops``) and the fraction of the device's peak; vs
  diffusers' ``WanTransformer3DModel`` forward / backward.
- ``pipeline`` (``wan_generate.py``): a full N-step CFG generation (``sampling.wan.generate``: text
  encoding, UniPC sampling, VAE decode) vs diffusers' ``WanPipeline`` from the same components and
  initial noise; plus our VANS generation with reference frames (no reference counterpart).
- ``vlm_parity`` (``parity.py``): Qwen2.5-VL logits of one video prompt vs transformers' on the
  same weights: max / mean relative error and argmax agreement (the ``dit`` section's forward
  carries the DiT's error vs diffusers the same way).
- ``vae`` (``vae.py``): Wan VAE encode / decode vs diffusers' ``AutoencoderKLWan``.
- ``train`` and ``predict`` (``train.py``): one SFT-VLM and one SFT-VDM step of the world config
  (``configs/tiny_world.py``: the shipped tiny models, synthetic-world clips, the trainer's runners) and
  ``vans-jax predict`` end to end on one synthetic clip with the shipped models. No reference (VANS
  ships no training code); they are here so that regressions of our own heaviest CPU work show.
- ``grpo`` (``grpo.py``): one Joint-GRPO Stage-1 and one Stage-2 step
  (``train.grpo.JointGRPO.step``, the trainer's code and settings from the ``grpo.recipe`` block) at
  a stated batch: median, spread and the step's rollout-text / rollout-video / update split. No
  reference: the official VANS release is inference-only. Runs last: it releases the reference
  models the other sections cached.

Every figure carries its shape, dtype, device, our warm-up (first call: tracing + compilation + one
run) and steady time (median of ``repeats`` runs, outputs blocked on) with their min and max, the
reference's times and the speedup = reference time / our time with its range and verdict ("tie" when
the [min, max] intervals overlap). Both sides get the same CPU threads (``resources.py``).
Models are random (no downloads): when the reference runs, random PyTorch components are built,
saved as a Hugging Face / diffusers directory and loaded by our loaders (same weights on both
sides); otherwise our models are initialized directly. The reference
is skipped with ``reference=False`` and reported as absent (null + reason) when torch / diffusers
are not installed, or when JAX runs on an accelerator torch cannot use.

``common.py`` holds what the sections share (registry, timing, figures, the run's context, random
model builders); ``markdown.py`` the table written next to the JSON.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from typing import Callable

import jax
import numpy as np

# importing a section module registers its section; in this order, SECTIONS keeps the original order
from . import matmul, vlm, dit, wan_generate, vae, train, grpo, parity  # noqa: F401, I001
from . import resources
from .common import (PEAK_BF16_TFLOPS, SECTIONS, BenchContext, compare, dit_forward_flops, figure,
                     jax_device_description, peak_bf16_tflops, random_model, relative_spread, section, spread)
from .markdown import markdown_path, markdown_table

__all__ = ["run", "markdown_table", "markdown_path", "SECTIONS", "section", "figure", "compare", "spread",
           "relative_spread", "run_noise", "BenchContext", "random_model",
           "PEAK_BF16_TFLOPS", "peak_bf16_tflops", "dit_forward_flops", "jax_device_description"]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("jax", "jaxlib", "flax", "torch", "transformers", "diffusers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _xla_default_flags() -> dict:
    """What ``vans-jax``'s XLA defaults (``apps.xla_env``) did in this process: the flags added to
    XLA_FLAGS and those skipped, with the reason; ``how`` says when the bench ran without the CLI."""
    from vans_jax.apps import xla_env
    if not xla_env.LAST:
        return {"applied": [], "skipped": {}, "how": "not applied in this process (the bench was called "
                                                      "without the vans-jax command); XLA_FLAGS as set"}
    return dict(xla_env.LAST, how="vans-jax set them before JAX started (apps.xla_env)")


def run(cfg, output: str | None = None, progress: Callable[[str], None] | None = print) -> dict:
    """Runs the configured sections; writes ``output`` (JSON) and the markdown table next to it."""
    names = list(cfg.sections)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench section(s) {unknown}; available: {sorted(SECTIONS)}")
    if str(cfg.dtype) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    threads = resources.prepare(cfg)       # before JAX's client and torch start
    ctx = BenchContext(cfg, threads["threads"])
    threads = resources.finish(threads, ctx.torch, ctx.torch_threads_how, jax.default_backend())
    started = time.perf_counter()
    figures, timings = [], {}
    try:
        for name in names:
            t0 = time.perf_counter()
            if progress:
                progress(f"bench: {name} ...")
            figures.extend(SECTIONS[name](ctx))
            timings[name] = time.perf_counter() - t0
            if ctx.torch is not None and ctx.torch_device.startswith("cuda"):
                ctx.torch.cuda.empty_cache()     # give the GPU memory torch cached back for the next section
    finally:
        ctx.close()
    result = dict(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=ctx.device, device_kind=ctx.device_kind, backend=jax.default_backend(), num_devices=1,
        dtype=ctx.dtype, repeats=ctx.repeats, reference_repeats=ctx.reference_repeats,
        reference=dict(enabled=bool(cfg.reference), available=ctx.torch is not None,
                       device=ctx.torch_description() if ctx.torch is not None else None,
                       reason=ctx.reference_reason),
        threads=threads, noise=run_noise(figures), versions=_versions(), sections=names, section_seconds=timings,
        environment={k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                                     "XLA_PYTHON_CLIENT_MEM_FRACTION", "PJRT_NPROC",
                                                     "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS",
                                                     "MKL_NUM_THREADS")},
        xla_default_flags=_xla_default_flags(),
        total_seconds=time.perf_counter() - started,
        conventions=dict(
            warmup_s="first call: tracing + compilation + one run (ours); first call (reference)",
            steady_s="median of the repeats, outputs blocked on (jax.block_until_ready / torch.cuda.synchronize)",
            min_s_max_s="fastest and slowest of the repeats (times_s: all of them)",
            speedup="reference steady_s / our steady_s (> 1: we are faster)",
            speedup_range="[reference min_s / our max_s, reference max_s / our min_s]",
            verdict=("'tie' when our [min_s, max_s] and the reference's overlap (whatever the speedup), else "
                     "'faster' (our slowest run beats the reference's fastest) or 'slower'"),
            noise="(max_s - min_s) / steady_s of the matmul figure, each side: the run's timing noise",
            random_weights="all models are random; shapes and dtypes as in each figure's shape"),
        figures=figures, config=cfg.to_dict())
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
        with open(output, "w") as f:
            json.dump(result, f, indent=2, default=_json_default)
        with open(markdown_path(output), "w") as f:
            f.write(markdown_table(result))
    return result


def run_noise(figures: list[dict]) -> dict:
    """The run's timing noise: the matmul figure's relative spread ((max - min) / median), each side."""
    mm = next((f for f in figures if f["name"] == "matmul"), None)
    if mm is None:
        return dict(ours=None, reference=None, reason="the matmul section did not run")
    ref = mm["reference"]
    return dict(ours=relative_spread(mm["ours"]), reference=relative_spread(ref) if ref else None,
                reason=None if ref else mm["reference_reason"])


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (tuple, set)):
        return list(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
