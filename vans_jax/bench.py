"""``vans-jax bench``: throughput of our JAX models, and of the PyTorch references (transformers,
diffusers) on the same shapes, weights and dtype in the same run.

Sections (a registry by name; ``cfg.sections`` picks and orders them; a new one is a function
decorated with ``@section("name")`` returning a list of ``figure(...)`` dicts):

- ``matmul``: one square matmul, the device's achievable dense rate (the yardstick for the DiT).
- ``vlm``: Qwen2.5-VL prefill of one video prompt and decode of G x N new tokens
  (``models.qwen2_5_vl.generate``) vs ``transformers ... .generate`` (sampling, EOS suppressed on
  both sides so every row decodes exactly N tokens).
- ``dit``: one Wan DiT forward and one training step (velocity MSE + gradient w.r.t. every DiT
  parameter, no optimizer update) on n_ref + target latent frames, with achieved TFLOP/s from an
  analytic FLOP count (``dit_forward_flops``) and the fraction of the device's peak; vs diffusers'
  ``WanTransformer3DModel`` forward / backward.
- ``pipeline``: a full N-step CFG generation (``models.wan.pipeline.generate``: text encoding,
  UniPC sampling, VAE decode) vs diffusers' ``WanPipeline`` from the same components and initial
  noise; plus our VANS generation with reference frames (no reference counterpart).
- ``vae``: Wan VAE encode / decode vs diffusers' ``AutoencoderKLWan``.

Every figure carries its shape, dtype, device, our warm-up (first call: tracing + compilation + one
run) and steady time (median of ``repeats`` runs, outputs blocked on), the reference's times and the
speedup = reference time / our time. Models are random (no downloads): when the reference runs,
random PyTorch components are built, saved as a Hugging Face / diffusers directory and loaded by our
loaders (same weights on both sides); otherwise our models are initialized directly. The reference
is skipped with ``reference=False`` and reported as absent (null + reason) when torch / diffusers
are not installed, or when JAX runs on an accelerator torch cannot use.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ----------------------------------------------------------------------------- registry

SECTIONS: dict[str, Callable[["BenchContext"], list[dict]]] = {}


def section(name: str):
    """Registers ``fn(ctx) -> list of figure dicts`` as bench section ``name``."""
    def register(fn):
        if name in SECTIONS:
            raise ValueError(f"bench section {name!r} is already registered")
        SECTIONS[name] = fn
        return fn
    return register


# ----------------------------------------------------------------------------- device peaks

# Dense bf16 peak per chip (TFLOP/s), vendor datasheets. Matched in order against device_kind.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H200 NVL", 835.0), ("H200", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)


def peak_bf16_tflops(device_kind: str) -> float | None:
    """The device's dense bf16 peak from ``PEAK_BF16_TFLOPS``, or None when unknown (e.g. CPUs)."""
    kind = device_kind.lower()
    for pattern, peak in PEAK_BF16_TFLOPS:
        if pattern.lower() in kind:
            return peak
    return None


# ----------------------------------------------------------------------------- FLOP counts


def dit_forward_flops(cfg, batch: int, frames: int, height: int, width: int, text_len: int, n_ref: int = 0) -> int:
    """Matmul FLOPs (2 per multiply-add) of one Wan DiT forward on latents (batch, C, frames,
    height, width) with ``text_len`` context tokens, counted from the shapes: per block the
    self-attention q/k/v/o projections, scores and weighted sum over all L tokens, the
    cross-attention (q/o on L tokens, k/v on the text, scores over L x text_len), the FFN; plus the
    patch embedding, the text and time MLPs and the output head (on the L - n_ref target tokens).
    Elementwise work (norms, RoPE, softmax, modulation) is not counted. A training step is
    3x this (backward = 2x forward; remat recomputation not counted)."""
    pt, ph, pw = cfg.patch_size
    grid_hw = (height // ph) * (width // pw)
    L, L_out, Lt = (frames // pt) * grid_hw, ((frames - n_ref) // pt) * grid_hw, text_len
    d, f = cfg.dim, cfg.ffn_dim
    block = (2 * L * d * d * 4                       # self-attention q, k, v, out
             + 2 * 2 * L * L * d                     # q k^T and p v
             + 2 * L * d * d * 2 + 2 * Lt * d * d * 2  # cross-attention q, out (video) and k, v (text)
             + 2 * 2 * L * Lt * d
             + 2 * 2 * L * d * f)                    # FFN in, out
    embed = (2 * L * cfg.patch_features * d + 2 * Lt * (cfg.text_dim * d + d * d)
             + 2 * (cfg.freq_dim * d + d * d + d * 6 * d))
    head = 2 * L_out * d * cfg.out_channels * math.prod(cfg.patch_size)
    return int(batch * (cfg.num_layers * block + embed + head))


# ----------------------------------------------------------------------------- timing + figures


def _median_times(fn, repeats: int, sync) -> tuple[dict, Any]:
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    first = time.perf_counter() - t0
    times = []
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        out = fn()
        sync(out)
        times.append(time.perf_counter() - t0)
    return dict(warmup_s=first, steady_s=statistics.median(times), times_s=times, repeats=len(times)), out


def figure(name: str, section_name: str, what: str, shape: dict, dtype: str, ours: dict,
           reference: dict | None = None, reference_reason: str | None = None, **extra) -> dict:
    """One benchmark figure. ``ours`` / ``reference``: dicts with at least steady_s, warmup_s,
    repeats, device (and any rates). speedup = reference steady time / our steady time."""
    if reference is None and reference_reason is None:
        raise ValueError(f"figure {name}: give the reference's timings or the reason it is absent")
    speedup = reference["steady_s"] / ours["steady_s"] if reference is not None else None
    return dict(name=name, section=section_name, what=what, shape=shape, dtype=dtype, device=ours["device"],
                ours=ours, reference=reference, reference_reason=None if reference is not None else reference_reason,
                speedup=speedup, **extra)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def jax_device_description() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu: {_cpu_name()}, {os.cpu_count()} cores (JAX {jax.__version__})"
    return f"{d.platform}: 1 x {d.device_kind} (JAX {jax.__version__})"


# ----------------------------------------------------------------------------- context


class BenchContext:
    """Shared state of one bench run: config, the reference (torch) status, lazily built models."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dtype = str(cfg.dtype)
        self.jdtype = jnp.dtype(self.dtype)
        self.repeats = int(cfg.repeats)
        self.reference_repeats = int(cfg.reference_repeats)
        self.device = jax_device_description()
        self.device_kind = jax.devices()[0].device_kind
        self.seed = int(cfg.seed)
        self._tmp = tempfile.TemporaryDirectory(prefix="vans_bench_")
        self._cache: dict[str, Any] = {}
        self.measured_matmul_tflops: float | None = None
        self.torch, self.torch_device, self.reference_reason = self._reference_status()

    def close(self):
        self._tmp.cleanup()

    def tmpdir(self, name: str) -> str:
        path = os.path.join(self._tmp.name, name)
        os.makedirs(path, exist_ok=True)
        return path

    # -- reference

    def _reference_status(self):
        if not self.cfg.reference:
            return None, None, "reference disabled in the config (reference=False)"
        try:
            import torch
        except ImportError:
            return None, None, "torch is not installed (pip install -e '.[test]' for the PyTorch references)"
        want = str(self.cfg.reference_device)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
        backend = jax.default_backend()
        if want == "auto" and device == "cpu" and backend != "cpu":
            return None, None, (f"JAX runs on {backend} but torch has no CUDA device: a CPU reference is not "
                                f"comparable (set reference_device=cpu to force one)")
        torch.manual_seed(self.seed)
        if int(self.cfg.reference_threads) > 0:
            torch.set_num_threads(int(self.cfg.reference_threads))
        for lib in ("transformers", "diffusers"):      # no progress bars / cast warnings in the output
            try:
                logging = __import__(f"{lib}.utils.logging", fromlist=["logging"])
                logging.set_verbosity_error()
                logging.disable_progress_bar()
            except ImportError:
                pass
        return torch, device, None

    def torch_dtype(self, name: str | None = None):
        return {"float32": self.torch.float32, "bfloat16": self.torch.bfloat16,
                "float16": self.torch.float16}[name or self.dtype]

    def torch_description(self) -> str:
        t = self.torch
        if self.torch_device.startswith("cuda"):
            return f"cuda: 1 x {t.cuda.get_device_name(0)} (torch {t.__version__})"
        return f"cpu: {_cpu_name()}, {t.get_num_threads()} threads (torch {t.__version__})"

    def to_torch_dtype(self, module, dtype: str | None = None):
        """``module.to(dtype)`` keeping the modules the library keeps in fp32 when it loads in half
        precision (``_keep_in_fp32_modules``: e.g. the Wan DiT's time embedding and modulation)."""
        module = module.to(self.torch_dtype(dtype))
        keep = getattr(module, "_keep_in_fp32_modules", None) or []
        if self.torch_dtype(dtype) != self.torch.float32 and keep:
            for name, sub in module.named_modules():
                if any(k in name.split(".") for k in keep):
                    sub.float()
        return module

    def torch_sync(self, _=None):
        if self.torch_device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def require(self, module: str):
        """(module, None) when the reference can use ``module``, else (None, reason)."""
        if self.torch is None:
            return None, self.reference_reason
        try:
            return __import__(module), None
        except ImportError:
            return None, f"{module} is not installed (pip install -e '.[test]' for the PyTorch references)"

    # -- measuring

    def ours(self, fn) -> tuple[dict, Any]:
        stats, out = _median_times(fn, self.repeats, jax.block_until_ready)
        stats["device"] = self.device
        return stats, out

    def reference(self, fn) -> tuple[dict, Any]:
        stats, out = _median_times(fn, self.reference_repeats, self.torch_sync)
        stats["device"] = self.torch_description()
        return stats, out

    # -- models

    def cached(self, key: str, build: Callable[[], Any]):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


# ----------------------------------------------------------------------------- random models


def random_model(make: Callable[[], nnx.Module], seed: int) -> nnx.Module:
    """``make()``'s module with random weights drawn on the host, without running its initializers
    (eager or jitted threefry init of the Wan VAE alone takes about a minute on a 2-core CPU):
    the structure from ``nnx.eval_shape``, then every parameter filled through the loader
    (``convert.loading.load_into``): matrices and kernels N(0, 0.02^2), 1-D biases 0 and other
    1-D parameters (norm scales) 1."""
    from .convert.loading import load_into

    rng = np.random.default_rng(seed)

    def fill(path, shape, dtype):
        if len(shape) >= 2:
            return (rng.standard_normal(shape, np.float32) * 0.02)
        return np.zeros(shape, np.float32) if path.endswith("bias") else np.ones(shape, np.float32)

    return load_into(nnx.eval_shape(make), {}, [], {}, fill_unloaded=fill)


# ----------------------------------------------------------------------------- matmul


@section("matmul")
def bench_matmul(ctx: BenchContext) -> list[dict]:
    n = int(ctx.cfg.matmul.size)
    key_a, key_b = jax.random.split(jax.random.key(ctx.seed))
    a = jax.random.normal(key_a, (n, n), jnp.float32).astype(ctx.jdtype)
    b = jax.random.normal(key_b, (n, n), jnp.float32).astype(ctx.jdtype)
    mm = jax.jit(lambda x, y: x @ y)
    repeats = int(ctx.cfg.matmul.repeats)
    ours, _ = _median_times(lambda: mm(a, b), repeats, jax.block_until_ready)
    ours["device"] = ctx.device
    flops = 2 * n ** 3
    ours["tflops_per_s"] = flops / ours["steady_s"] / 1e12
    ctx.measured_matmul_tflops = ours["tflops_per_s"]
    ref, reason = None, ctx.reference_reason
    if ctx.torch is not None:
        t = ctx.torch
        ta = t.from_numpy(np.array(a.astype(jnp.float32))).to(ctx.torch_device, ctx.torch_dtype())
        tb = t.from_numpy(np.array(b.astype(jnp.float32))).to(ctx.torch_device, ctx.torch_dtype())
        ref, _ = _median_times(lambda: ta @ tb, repeats, ctx.torch_sync)
        ref["device"] = ctx.torch_description()
        ref["tflops_per_s"] = flops / ref["steady_s"] / 1e12
    peak = peak_bf16_tflops(ctx.device_kind)
    return [figure("matmul", "matmul", f"one {n}x{n} @ {n}x{n} matmul (the device's achievable dense rate)",
                   dict(m=n, k=n, n=n), ctx.dtype, ours, ref, reason, flops=flops, peak_bf16_tflops=peak,
                   fraction_of_peak=_fraction_of_peak(ours["tflops_per_s"], peak, ctx.dtype)[0])]


def _fraction_of_peak(tflops: float, peak: float | None, dtype: str):
    if peak is None:
        return None, "the device's peak is not in the table (PEAK_BF16_TFLOPS)"
    if dtype != "bfloat16":
        return None, f"the peak table is for bfloat16; this run is {dtype}"
    return tflops / peak, None


# ----------------------------------------------------------------------------- VLM


def _build_qwen(ctx: BenchContext):
    """(our model, HF model or None, reason): random weights; with the reference, a random
    transformers model saved and loaded by our loader."""
    from .models import qwen2_5_vl as qwen

    c = ctx.cfg.vlm
    model_dict = c.model.to_dict()
    transformers, reason = ctx.require("transformers")
    if transformers is None:
        mcfg = qwen.Qwen2_5_VLConfig.from_hf_dict(model_dict, dtype=ctx.dtype, attn_impl=c.attn_impl)
        return random_model(lambda: qwen.Qwen2_5_VLModel(mcfg, rngs=nnx.Rngs(0)), ctx.seed), None, reason
    hf_cfg = transformers.Qwen2_5_VLConfig(**model_dict)
    hf_cfg._attn_implementation = str(c.reference_attn)
    hf = ctx.to_torch_dtype(transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval())
    path = ctx.tmpdir("qwen")
    hf.save_pretrained(path)
    ours = qwen.from_pretrained(path, dtype=ctx.dtype, attn_impl=c.attn_impl)
    return ours, hf.to(ctx.torch_device), None


@section("vlm")
def bench_vlm(ctx: BenchContext) -> list[dict]:
    from .models import qwen2_5_vl as qwen
    from .models.qwen2_5_vl import processor
    from .vlm_demo import synthetic_clip

    c = ctx.cfg.vlm
    model, hf, reason = ctx.cached("qwen", lambda: _build_qwen(ctx))
    mcfg = model.config
    frames = synthetic_clip(int(c.num_frames), int(c.height), int(c.width), seed=ctx.seed)
    pixels, grid, seconds = processor.preprocess_videos([frames], float(c.fps), min_pixels=int(c.min_pixels),
                                                        max_pixels=int(c.max_pixels))
    n_video = int(processor.num_vision_tokens(grid, mcfg.vision.spatial_merge_size).sum())
    rng = np.random.default_rng(ctx.seed)
    text = lambda n: rng.integers(0, int(c.text_id_max), n)       # ordinary (non-special) token ids
    before, after = (int(x) for x in c.prompt_text_tokens)
    ids = np.concatenate([text(before), [mcfg.vision_start_token_id], np.full(n_video, mcfg.video_token_id),
                          [mcfg.vision_end_token_id], text(after)]).astype(np.int64)[None]
    mask = np.ones_like(ids)
    batch = qwen.prepare_inputs(mcfg, ids, mask, pixels, grid, seconds)
    G, N = int(c.num_return_sequences), int(c.max_new_tokens)
    if N < 2:
        raise ValueError(f"vlm.max_new_tokens must be >= 2 to time decoding, got {N}")

    def ours_generate(n):
        # eos_token_id=-1: never stops early, so every row decodes exactly n tokens (as min_new_tokens)
        return qwen.generate(model, batch, max_new_tokens=n, temperature=1.0, top_p=1.0, top_k=0,
                             num_return_sequences=G, rng=jax.random.key(ctx.seed), eos_token_id=-1).tokens

    prefill, _ = ctx.ours(lambda: ours_generate(1))
    full, tokens = ctx.ours(lambda: ours_generate(N))
    if tokens.shape != (G, N):
        raise RuntimeError(f"generate returned tokens of shape {tokens.shape}, expected {(G, N)}")
    ref_prefill = ref_full = None
    if hf is not None:
        t = ctx.torch
        dev = ctx.torch_device
        types = np.where(ids == mcfg.video_token_id, 2, 0)
        inputs = dict(input_ids=t.from_numpy(ids).to(dev), attention_mask=t.from_numpy(mask).to(dev),
                      mm_token_type_ids=t.from_numpy(types).to(dev),
                      pixel_values_videos=t.from_numpy(pixels).to(dev, ctx.torch_dtype()),
                      video_grid_thw=t.from_numpy(grid).to(dev), second_per_grid_ts=t.from_numpy(seconds).to(dev))

        def hf_generate(n):
            with t.inference_mode():
                out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0,
                                  top_p=1.0, top_k=0, num_return_sequences=G, eos_token_id=mcfg.eos_token_id,
                                  pad_token_id=mcfg.pad_token_id)
            if out.shape != (G, ids.shape[1] + n):
                raise RuntimeError(f"transformers generate returned {tuple(out.shape)}, expected "
                                   f"{(G, ids.shape[1] + n)}")
            return out

        ref_prefill, _ = ctx.reference(lambda: hf_generate(1))
        ref_full, _ = ctx.reference(lambda: hf_generate(N))

    shape = dict(prompt_tokens=int(ids.shape[1]), video_tokens=n_video, video_frames=int(c.num_frames),
                 frame_size=[int(c.height), int(c.width)], video_grid_thw=grid[0].tolist(),
                 num_return_sequences=G, new_tokens=N, vocab=mcfg.text.vocab_size, layers=mcfg.text.num_hidden_layers,
                 hidden=mcfg.text.hidden_size, vision_depth=mcfg.vision.depth)

    def decode(full_stats, prefill_stats):
        if full_stats is None:
            return None
        d = dict(full_stats, times_s=None)   # a difference of medians, not a measured series
        d["steady_s"] = full_stats["steady_s"] - prefill_stats["steady_s"]
        if d["steady_s"] <= 0:
            raise RuntimeError(f"generate({N}) was not slower than generate(1) ({full_stats['steady_s']:.4g} s vs "
                               f"{prefill_stats['steady_s']:.4g} s): decoding is below the timing noise; raise "
                               f"vlm.max_new_tokens or repeats")
        d["tokens_per_s"] = G * (N - 1) / d["steady_s"]
        return d

    for stats in (full, ref_full):
        if stats is not None:
            stats["tokens_per_s"] = G * N / stats["steady_s"]
    note_ref = ("transformers expands the prompt to G rows before prefill (G x the prefill work); "
                "ours prefills once and repeats the KV cache")
    return [
        figure("vlm_prefill", "vlm", "prefill of one video prompt (vision tower + LM) and the first sampled "
               "token", shape, ctx.dtype, prefill, ref_prefill, reason, note=note_ref),
        figure("vlm_decode", "vlm", f"decode of G x (N - 1) = {G} x {N - 1} tokens: generate(N) minus "
               f"generate(1), sampling at temperature 1, EOS suppressed", shape, ctx.dtype, decode(full, prefill),
               decode(ref_full, ref_prefill), reason),
        figure("vlm_generate", "vlm", f"prefill + {G} x {N} new tokens", shape, ctx.dtype, full, ref_full, reason,
               note=note_ref),
    ]


# ----------------------------------------------------------------------------- Wan components


def _t5_tokenizer(transformers):
    """A tiny SentencePiece-style UMT5 tokenizer (pad 0, eos 1) for random text encoders."""
    pieces = ["▁a", "▁the", "▁person", "▁cuts", "▁onion", "▁on", "▁board", "▁then", "▁stirs", "▁pan", "▁red"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(p, -3.0) for p in pieces] + [(ch, -6.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0)


def _build_wan(ctx: BenchContext):
    """(WanModels, torch dict(transformer, vae, pipe) or None, reason). With the reference: random
    diffusers components saved as a diffusers pipeline directory and loaded by our loaders; without:
    our modules initialized directly."""
    import transformers

    from .convert import umt5 as umt5_convert
    from .convert.wan_dit import load_dit
    from .convert.wan_vae import load_vae
    from .models.wan import pipeline as wp
    from .models.wan.dit import WanConfig, WanTransformer3D
    from .models.wan.text import load_tokenizer
    from .models.wan.umt5 import UMT5Config, UMT5Encoder
    from .models.wan.vae import WanVAE, WanVAEConfig

    c = ctx.cfg.wan
    dit_kw, vae_kw, te_kw = c.dit.to_dict(), c.vae.to_dict(), c.text_encoder.to_dict()
    runtime = dict(attn_impl=str(c.attn_impl))
    vae_dtype = str(c.vae_dtype)
    diffusers, reason = ctx.require("diffusers")
    if diffusers is None:
        dit_cfg = WanConfig.from_diffusers_config(dit_kw, dtype=ctx.dtype, param_dtype=ctx.dtype, **runtime)
        vae_cfg = WanVAEConfig.from_diffusers_config(vae_kw, dtype=vae_dtype, param_dtype=vae_dtype, **runtime)
        te_cfg = UMT5Config.from_dict(te_kw, **runtime)
        dit = random_model(lambda: WanTransformer3D(dit_cfg, rngs=nnx.Rngs(0)), ctx.seed)
        vae = random_model(lambda: WanVAE(vae_cfg, rngs=nnx.Rngs(0)), ctx.seed + 1)
        te = random_model(lambda: UMT5Encoder(te_cfg, dtype=ctx.dtype, rngs=nnx.Rngs(0)), ctx.seed + 2)
        models = wp.WanModels(dit=dit, vae=vae, text_encoder=te, tokenizer=_t5_tokenizer(transformers),
                              scheduler=wp.SchedulerSettings(flow_shift=float(ctx.cfg.pipeline.shift)))
        return models, None, reason
    tdit = ctx.to_torch_dtype(diffusers.WanTransformer3DModel(**dit_kw).eval())
    tvae = ctx.to_torch_dtype(diffusers.AutoencoderKLWan(**vae_kw).eval(), vae_dtype)
    tte = ctx.to_torch_dtype(transformers.UMT5EncoderModel(transformers.UMT5Config(**te_kw)).eval())
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=float(ctx.cfg.pipeline.shift))
    pipe = diffusers.WanPipeline(tokenizer=_t5_tokenizer(transformers), text_encoder=tte, transformer=tdit, vae=tvae,
                                 scheduler=sched)
    path = ctx.tmpdir("wan")
    pipe.save_pretrained(path, safe_serialization=True)
    models = wp.WanModels(
        dit=load_dit(os.path.join(path, "transformer"), dtype=ctx.dtype, **runtime),
        vae=load_vae(os.path.join(path, "vae"), vae_dtype, **runtime),
        text_encoder=umt5_convert.from_pretrained(path, ctx.dtype, **runtime),
        tokenizer=load_tokenizer(path),
        scheduler=wp.SchedulerSettings.from_dir(os.path.join(path, "scheduler")))
    pipe.to(ctx.torch_device)
    pipe.set_progress_bar_config(disable=True)
    return models, dict(transformer=tdit, vae=tvae, pipe=pipe), None


def _wan(ctx):
    return ctx.cached("wan", lambda: _build_wan(ctx))


# ----------------------------------------------------------------------------- DiT


@section("dit")
def bench_dit(ctx: BenchContext) -> list[dict]:
    models, torch_parts, reason = _wan(ctx)
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
    ours_fwd, _ = ctx.ours(lambda: fwd(params, xs, ts, cs))
    ours_step, _ = ctx.ours(lambda: step(params, xs, ts, cs, tg))

    flops = dit_forward_flops(cfg, b, frames, h, w, text_len, n_ref)
    tokens = (frames // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    ref_fwd = ref_step = None
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

        ref_fwd, _ = ctx.reference(ref_forward)
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
    for name, what, ours, ref, mult, remat in (
            ("dit_forward", "one DiT forward (velocity on the target frames)", ours_fwd, ref_fwd, 1, cfg.remat),
            ("dit_train_step", "velocity MSE + gradient w.r.t. all DiT parameters (no optimizer update)",
             ours_step, ref_step, 3, str(c.remat))):
        f = flops * mult
        for stats in (ours, ref):
            if stats is not None:
                stats["tflops_per_s"] = f / stats["steady_s"] / 1e12
        frac, frac_reason = _fraction_of_peak(ours["tflops_per_s"], peak, ctx.dtype)
        out.append(figure(
            name, "dit", what, dict(shape, remat=remat), ctx.dtype, ours, ref, reason,
            flops=f, flops_method="analytic matmul count from the shapes (vans_jax.bench.dit_forward_flops"
                                  + (", x3 for forward + backward)" if mult == 3 else ")"),
            peak_bf16_tflops=peak, fraction_of_peak=frac, fraction_of_peak_reason=frac_reason,
            fraction_of_measured_matmul=(ours["tflops_per_s"] / ctx.measured_matmul_tflops
                                         if ctx.measured_matmul_tflops else None)))
    return out


# ----------------------------------------------------------------------------- pipeline


@section("pipeline")
def bench_pipeline(ctx: BenchContext) -> list[dict]:
    from .models.wan import pipeline as wp

    models, torch_parts, reason = _wan(ctx)
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


# ----------------------------------------------------------------------------- VAE


@section("vae")
def bench_vae(ctx: BenchContext) -> list[dict]:
    """The pipeline's VAE steps: clip -> normalized latents (``pipeline.encode_video``: posterior mean,
    normalized) and latents -> uint8 frames on the host (``pipeline.decode_latents``, as ``generate``);
    the reference does the same with ``AutoencoderKLWan`` and WanPipeline's post-processing."""
    from .models.wan import pipeline as wp

    models, torch_parts, reason = _wan(ctx)
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


# ----------------------------------------------------------------------------- run + output


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("jax", "jaxlib", "flax", "torch", "transformers", "diffusers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def run(cfg, output: str | None = None, progress: Callable[[str], None] | None = print) -> dict:
    """Runs the configured sections; writes ``output`` (JSON) and the markdown table next to it."""
    names = list(cfg.sections)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench section(s) {unknown}; available: {sorted(SECTIONS)}")
    if str(cfg.dtype) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    ctx = BenchContext(cfg)
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
        versions=_versions(), sections=names, section_seconds=timings,
        environment={k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                                     "XLA_PYTHON_CLIENT_MEM_FRACTION")},
        total_seconds=time.perf_counter() - started,
        conventions=dict(
            warmup_s="first call: tracing + compilation + one run (ours); first call (reference)",
            steady_s="median of the repeats, outputs blocked on (jax.block_until_ready / torch.cuda.synchronize)",
            speedup="reference steady_s / our steady_s (> 1: we are faster)",
            random_weights="all models are random; shapes and dtypes as in each figure's shape"),
        figures=figures, config=cfg.to_dict())
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
        with open(output, "w") as f:
            json.dump(result, f, indent=2, default=_json_default)
        with open(markdown_path(output), "w") as f:
            f.write(markdown_table(result))
    return result


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (tuple, set)):
        return list(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def markdown_path(output: str) -> str:
    root, ext = os.path.splitext(output)
    return (root if ext == ".json" else output) + ".md"


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _shape_text(shape: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items() if k not in ("vocab",))


def _rate_text(fig: dict) -> str:
    o, r = fig["ours"], fig["reference"] or {}
    parts = []
    for key, unit in (("tokens_per_s", "tok/s"), ("tflops_per_s", "TFLOP/s"), ("dit_tflops_per_s", "DiT TFLOP/s")):
        if key in o:
            parts.append(f"{_fmt(o[key])} {unit}" + (f" (ref {_fmt(r[key])})" if key in r else ""))
    if fig.get("fraction_of_peak") is not None:
        parts.append(f"{100 * fig['fraction_of_peak']:.1f}% of bf16 peak")
    if fig.get("fraction_of_measured_matmul") is not None:
        parts.append(f"{100 * fig['fraction_of_measured_matmul']:.0f}% of measured matmul")
    return "; ".join(parts)


def markdown_table(result: dict) -> str:
    lines = [f"# vans-jax bench ({result['created']})", "",
             f"Ours: {result['device']}, {result['dtype']}. Reference: "
             + (result["reference"]["device"] or f"none ({result['reference']['reason']})") + ". "
             f"Steady = median of {result['repeats']} (reference {result['reference_repeats']}) runs; warm-up = first "
             f"call incl. compilation. Speedup = reference / ours. Random weights.", "",
             "| figure | shape | dtype | ours warm-up s | ours steady s | reference steady s | speedup | rates |",
             "|---|---|---|---|---|---|---|---|"]
    for f in result["figures"]:
        ref = f["reference"]
        lines.append(f"| {f['name']} | {_shape_text(f['shape'])} | {f['dtype']} | {_fmt(f['ours']['warmup_s'])} | "
                     f"{_fmt(f['ours']['steady_s'])} | {_fmt(ref['steady_s']) if ref else '-'} | "
                     f"{_fmt(f['speedup'])} | {_rate_text(f)} |")
    absent = sorted({f["reference_reason"] for f in result["figures"] if f["reference_reason"]})
    if absent:
        lines += [""] + [f"- no reference: {r}" for r in absent]
    return "\n".join(lines) + "\n"
