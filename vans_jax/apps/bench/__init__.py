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
- ``pipeline``: a full N-step CFG generation (``sampling.wan.generate``: text encoding,
  UniPC sampling, VAE decode) vs diffusers' ``WanPipeline`` from the same components and initial
  noise; plus our VANS generation with reference frames (no reference counterpart).
- ``vae``: Wan VAE encode / decode vs diffusers' ``AutoencoderKLWan``.
- ``grpo``: one Joint-GRPO Stage-1 and one Stage-2 step (``train.grpo.JointGRPO.step``, the
  trainer's code and settings from the ``grpo.recipe`` block) at a stated batch: median, spread and
  the step's rollout-text / rollout-video / update split. No reference: the official VANS release is
  inference-only. Runs last: it releases the reference models the other sections cached.

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


def random_model(make: Callable[[], nnx.Module], seed: int, fill_first: Callable | None = None) -> nnx.Module:
    """``make()``'s module with random weights drawn on the host, without running its initializers
    (eager or jitted threefry init of the Wan VAE alone takes about a minute on a 2-core CPU):
    the structure from ``nnx.eval_shape``, then every parameter filled through the loader
    (``convert.loading.load_into``): matrices and kernels N(0, 0.02^2), 1-D biases 0 and other
    1-D parameters (norm scales) 1. ``fill_first(path, shape, dtype)``: asked first for every
    parameter (None: the rule above), e.g. ``models.lora.lora_init_fill`` for fresh LoRA adapters."""
    from vans_jax.convert.loading import load_into

    rng = np.random.default_rng(seed)

    def fill(path, shape, dtype):
        first = fill_first(path, shape, dtype) if fill_first is not None else None
        if first is not None:
            return first
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
    from vans_jax.models import qwen2_5_vl as qwen

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
    from vans_jax.models import qwen2_5_vl as qwen
    from vans_jax.models.qwen2_5_vl import processor
    from vans_jax.apps.vlm_demo import synthetic_clip

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


def _build_wan(ctx: BenchContext, with_reference: bool = True):
    """(WanModels, torch dict(transformer, vae, pipe) or None, reason). With the reference: random
    diffusers components saved as a diffusers pipeline directory and loaded by our loaders; without
    (or ``with_reference=False``): our modules with random weights built directly."""
    import transformers

    from vans_jax.convert import umt5 as umt5_convert
    from vans_jax.convert.wan_dit import load_dit
    from vans_jax.convert.wan_vae import load_vae
    from vans_jax.sampling import wan as wp
    from vans_jax.models.wan.dit import WanConfig, WanTransformer3D
    from vans_jax.models.wan.text import load_tokenizer
    from vans_jax.models.wan.umt5 import UMT5Config, UMT5Encoder
    from vans_jax.models.wan.vae import WanVAE, WanVAEConfig

    c = ctx.cfg.wan
    dit_kw, vae_kw, te_kw = c.dit.to_dict(), c.vae.to_dict(), c.text_encoder.to_dict()
    runtime = dict(attn_impl=str(c.attn_impl))
    vae_dtype = str(c.vae_dtype)
    diffusers, reason = ctx.require("diffusers") if with_reference else (None, None)
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
            flops=f, flops_method="analytic matmul count from the shapes (vans_jax.apps.bench.dit_forward_flops"
                                  + (", x3 for forward + backward)" if mult == 3 else ")"),
            peak_bf16_tflops=peak, fraction_of_peak=frac, fraction_of_peak_reason=frac_reason,
            fraction_of_measured_matmul=(ours["tflops_per_s"] / ctx.measured_matmul_tflops
                                         if ctx.measured_matmul_tflops else None)))
    return out


# ----------------------------------------------------------------------------- pipeline


@section("pipeline")
def bench_pipeline(ctx: BenchContext) -> list[dict]:
    from vans_jax.sampling import wan as wp

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
    from vans_jax.sampling import wan as wp

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


# ----------------------------------------------------------------------------- Joint-GRPO

GRPO_NO_REFERENCE = ("no PyTorch reference: the official VANS release is inference-only (no Joint-GRPO training "
                     "code); the rollout's parts are compared with theirs in the vlm, dit, pipeline and vae sections")

GRPO_WHAT = {
    "grpo_stage1": "one Joint-GRPO Stage-1 step (JointGRPO.step): G captions per prompt from one prefill of the "
                   "policy VLM (LoRA), each rendered by the frozen VDM (ODE sampler with CFG) and VAE-decoded, CLIP "
                   "features, rewards r_format + r_t1 + r_v1, group advantages, old and reference log-probs, the "
                   "LoRA policy update(s)",
    "grpo_stage2": "one Joint-GRPO Stage-2 step: one anchor caption per prompt from the frozen Stage-1 VLM (LoRA "
                   "merged), resampled while ROUGE-L < threshold; G videos per anchor from the SDE sampler with "
                   "stored trajectories, VAE-decoded, CLIP features, rewards r_v2 + r_c2, group advantages, the DiT "
                   "policy update(s) accumulated timestep by timestep",
}
# the step's own timers (JointGRPO.step metrics): rollout text, rollout video, rewards + log-probs + update
GRPO_PHASES = (("text_s", "time/text_s"), ("video_s", "time/video_s"), ("update_s", "time/update_s"))


def _grpo_recipe(ctx: BenchContext):
    """The training recipe block (``configs/vans.py``-shaped: vlm, vdm, clip, generation, video,
    train.batch_size / pad_multiple / grpo) with the run's dtype for the VLM, DiT and UMT5
    (``train.grpo.group_size`` is set per stage from ``grpo.group_size``)."""
    import ml_collections

    recipe = ml_collections.ConfigDict(ctx.cfg.grpo.recipe.to_dict())
    recipe.vlm.dtype = recipe.vdm.dtype = ctx.dtype
    return recipe


def _grpo_vlm(ctx: BenchContext, recipe):
    """(Qwen2.5-VL with fresh LoRA adapters, its tokenizer): ``recipe.vlm.path`` through the trainer's
    loader, else random weights of ``vlm.model``'s architecture and a tiny tokenizer trained on the
    synthetic world's texts (the special-token ids follow the tokenizer; the vocabulary size stays,
    so the LM head and sampling cost what they cost at that size)."""
    from vans_jax.data import synthetic
    from vans_jax.models import qwen2_5_vl as qwen
    from vans_jax.models.lora import lora_init_fill
    from vans_jax.models.qwen2_5_vl import tokenizer as qtok
    from vans_jax.rl.format import TAGS
    from vans_jax.train import loop

    if recipe.vlm.path:
        return loop.load_vlm(recipe, None, lora=True)
    arch = ctx.cfg.vlm.model.to_dict()
    path = ctx.tmpdir("grpo_vlm_tokenizer")
    ids = qtok.build_tiny_tokenizer(path, synthetic.world_texts(), vocab_size=min(512, arch["vocab_size"] - 16),
                                   added_tokens=TAGS)
    if ids["vocab_size"] > arch["vocab_size"]:
        raise ValueError(f"vlm.model.vocab_size {arch['vocab_size']} is smaller than the tiny tokenizer's "
                         f"{ids['vocab_size']} ids")
    arch.update(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    mcfg = qwen.Qwen2_5_VLConfig.from_hf_dict(arch, dtype=ctx.dtype, attn_impl=str(recipe.vlm.attn_impl),
                                              remat=str(recipe.vlm.remat))
    lora = loop._lora_config(recipe)
    model = random_model(lambda: qwen.Qwen2_5_VLModel(mcfg, rngs=nnx.Rngs(0), lora=lora), ctx.seed + 10,
                         fill_first=lora_init_fill(ctx.seed))
    return model, qtok.load_tokenizer(path)


def _grpo_clip(ctx: BenchContext, recipe):
    """(CLIP reward model, tokenizer): ``recipe.clip.path``, else random fp32 weights of ``grpo.clip``
    (a Hugging Face CLIPConfig dict; {} = ViT-B/32) with the character-level tiny tokenizer."""
    from vans_jax.models import clip
    from vans_jax.train import loop

    if recipe.clip.path:
        return loop.load_clip(recipe, None)
    d = ctx.cfg.grpo.clip.to_dict()
    d["text_config"] = dict(d.get("text_config") or {}, **{k: v for k, v in clip.TINY_TOKENIZER_IDS.items()
                                                          if k != "vocab_size"})
    cfg = clip.CLIPConfig.from_dict(d)
    model = random_model(lambda: clip.CLIPModel(cfg, dtype="float32", rngs=nnx.Rngs(0)), ctx.seed + 20)
    return model, clip.build_tiny_tokenizer(cfg.text.max_position_embeddings)


def _grpo_vdm(ctx: BenchContext, recipe):
    """Our Wan models: ``recipe.vdm.path``, else those of the Wan sections (``wan.*``; built without
    torch when they did not run). The reference's torch models cached by the other sections are
    released first (Joint-GRPO has no reference; on an accelerator they would hold its memory)."""
    import gc

    from vans_jax.train import loop

    ctx._cache.pop("qwen", None)
    cached = ctx._cache.pop("wan", None)
    if cached is not None:
        ctx._cache["wan_ours"] = (cached[0], None, None)
    del cached
    gc.collect()
    if ctx.torch is not None and ctx.torch_device.startswith("cuda"):
        ctx.torch.cuda.empty_cache()
    if recipe.vdm.path:
        return loop.load_vdm(recipe, None)
    return ctx.cached("wan_ours", lambda: _build_wan(ctx, with_reference=False))[0]


def _with_dit_config(models, *, copy_weights: bool, **changes):
    """``models`` with a DiT whose config has ``changes`` (remat, text_len); the weights are copied
    when a trainer will donate them, so the shared models stay intact."""
    graphdef, state = nnx.split(models.dit)
    dit = nnx.merge(graphdef, jax.tree.map(jnp.copy, state) if copy_weights else state)
    dit.cfg = dataclasses.replace(dit.cfg, **changes)
    return dataclasses.replace(models, dit=dit, _negative={})


def _grpo_examples(ctx: BenchContext, recipe):
    """``train.batch_size`` samples of the synthetic world's RL split at the recipe's video size and
    rate (``grpo.world``: input clip length, event segment, events), written as videos and read back
    through the training data pipeline (``data.pipeline.VNEPSource``), as ``vans-jax train`` reads them."""
    from vans_jax.data import synthetic
    from vans_jax.data.pipeline import PipelineConfig, VNEPSource

    v, w = recipe.video, ctx.cfg.grpo.world
    world = synthetic.WorldConfig(height=int(v.height), width=int(v.width), fps=float(v.fps),
                                  input_frames=int(w.input_frames), segment=int(w.segment),
                                  target_frames=int(v.num_frames), events=tuple(w.events) or synthetic.EVENTS)
    n = int(recipe.train.batch_size)
    split = synthetic.generate_world(ctx.tmpdir("grpo_world"), "rl", n, config=world)
    pc = PipelineConfig(**dict(world.pipeline_kwargs(), reference_frames=int(v.num_frames)))
    source = VNEPSource(split.csv_path, split.video_root, pc)
    return [source.load(i) for i in range(n)]


def _param_summary(module: nnx.Module) -> dict:
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    dtypes: dict[str, int] = {}
    for x in leaves:
        dtypes[str(x.dtype)] = dtypes.get(str(x.dtype), 0) + int(x.size)
    return dict(params=sum(dtypes.values()), param_dtypes=dtypes)


def _time_grpo_steps(ctx: BenchContext, runner, examples, steps: int):
    """One warm-up step (compilation included), then ``steps`` timed steps on the same prompts
    (fresh rollouts: the step index folds into the RNG). ``JointGRPO.step`` returns host floats
    (the rollout's tokens, frames and rewards and the update's metrics are fetched), so its wall
    time is the device time of the whole step."""
    base = jax.random.key(ctx.seed)

    def one(i):
        t0 = time.perf_counter()
        m = runner.step(examples, i, jax.random.fold_in(base, i))
        dt = time.perf_counter() - t0
        if m.get("skipped_rewards"):
            raise RuntimeError(f"{runner.s.mode} step {i}: non-finite rewards, the step was skipped")
        return dt, m

    warmup, _ = one(1)
    runs = [one(i) for i in range(2, 2 + max(1, int(steps)))]
    times = [t for t, _ in runs]
    med = lambda key: statistics.median(m[key] for _, m in runs)
    ours = dict(warmup_s=warmup, steady_s=statistics.median(times), times_s=times, repeats=len(times),
                min_s=min(times), max_s=max(times), device=ctx.device,
                phases_s={name: med(key) for name, key in GRPO_PHASES},
                frames_per_s=med("throughput/frames_per_s"))
    if runner.s.mode == "grpo_stage1":
        ours["tokens_per_s"] = med("throughput/tokens_per_s")
    last = {k: float(v) for k, v in runs[-1][1].items() if isinstance(v, (int, float, np.floating, np.integer))}
    return ours, last


@section("grpo")
def bench_grpo(ctx: BenchContext) -> list[dict]:
    """Joint-GRPO Stage-1 and Stage-2 step times with the trainer's own code (``vans-jax train``'s
    ``JointGRPO`` built from the recipe block through ``train.loop.grpo_settings`` /
    ``render_settings``) on random models: the VLM of ``vlm.model``, the Wan models of ``wan.*``, the
    CLIP of ``grpo.clip`` (or checkpoints: ``grpo.recipe.{vlm,vdm,clip}.path``)."""
    from vans_jax.models.lora import merge_lora_copy
    from vans_jax.sampling import wan as wp
    from vans_jax.parallel import make_mesh
    from vans_jax.train import loop
    from vans_jax.train.grpo import JointGRPO
    from vans_jax.rl.rollouts import build_prompt_batch

    c = ctx.cfg.grpo
    unknown = [m for m in c.stages if m not in GRPO_WHAT]
    if unknown:
        raise ValueError(f"grpo.stages: unknown stage(s) {unknown}; expected some of {list(GRPO_WHAT)}")
    stages = [m for m in GRPO_WHAT if m in c.stages]      # Stage 2 starts from Stage 1's VLM
    recipe = _grpo_recipe(ctx)
    vdm = _grpo_vdm(ctx, recipe)
    vlm, tokenizer = _grpo_vlm(ctx, recipe)
    clip_model, clip_tokenizer = _grpo_clip(ctx, recipe)
    examples = _grpo_examples(ctx, recipe)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    render = loop.render_settings(recipe)
    g = recipe.train.grpo
    text_len = int(c.text_len) if c.text_len else vdm.text_len
    n_prompts = len(examples)

    prompt_ids = np.asarray(build_prompt_batch(examples, tokenizer, vlm.config, recipe.vlm,
                                               int(recipe.train.pad_multiple))["input_ids"])
    t_lat, h_lat, w_lat = wp.check_generation_size(vdm, render.height, render.width, render.num_frames)
    lo, hi = render.sde_window or (0, render.num_steps - 1)
    models = dict(vlm=dict(_param_summary(vlm), layers=vlm.config.text.num_hidden_layers,
                           hidden=vlm.config.text.hidden_size, vocab=vlm.config.text.vocab_size,
                           vision_depth=vlm.config.vision.depth, lora_rank=int(recipe.vlm.lora.rank),
                           remat=vlm.config.remat),
                  dit=dict(_param_summary(vdm.dit), dim=vdm.dit.cfg.dim, layers=vdm.dit.cfg.num_layers,
                           heads=vdm.dit.cfg.num_heads, ffn=vdm.dit.cfg.ffn_dim),
                  text_encoder=dict(_param_summary(vdm.text_encoder), d_model=vdm.text_encoder.config.d_model,
                                    layers=vdm.text_encoder.config.num_layers),
                  vae=dict(_param_summary(vdm.vae), base_dim=vdm.vae.cfg.base_dim),
                  clip=dict(_param_summary(clip_model), vision_hidden=clip_model.config.vision.hidden_size,
                            vision_layers=clip_model.config.vision.num_hidden_layers,
                            image_size=clip_model.config.vision.image_size,
                            patch_size=clip_model.config.vision.patch_size))
    common = dict(prompts=n_prompts, prompt_tokens=int(prompt_ids.shape[1]),
                  video_tokens=int((prompt_ids[0] == vlm.config.video_token_id).sum()),
                  vlm_frames=int(np.asarray(examples[0]["vlm_frames"]).shape[0]),
                  video=[render.num_frames, render.height, render.width],
                  latent_frames=[render.n_ref, t_lat], latent_hw=[h_lat, w_lat],
                  sampler_steps=render.num_steps, cfg_scale=render.cfg_scale, text_len=text_len)

    out, stage1_vlm = [], None
    for mode in stages:
        recipe.train.grpo.group_size = int(c.group_size[mode])
        s = loop.grpo_settings(recipe, mode)
        if mode == "grpo_stage1":
            policy = vlm
            vdm_run = _with_dit_config(vdm, copy_weights=False, text_len=text_len)
            shape = dict(common, group_size=s.group_size, videos=n_prompts * s.group_size,
                         new_tokens=s.max_new_tokens, sampler=f"{render.mode} (ODE)", num_updates=s.num_updates)
        else:
            # the Stage-1 VLM, frozen with its LoRA merged, as `vans-jax train` exports it for Stage 2
            policy = merge_lora_copy(stage1_vlm if stage1_vlm is not None else vlm)
            vlm = stage1_vlm = None              # only the merged copy stays in memory
            vdm_run = _with_dit_config(vdm, copy_weights=True, text_len=text_len, remat=str(c.dit_remat))
            shape = dict(common, group_size=s.group_size, videos=n_prompts * s.group_size,
                         anchor_new_tokens=s.max_new_tokens, anchor_max_tries=s.anchor_max_tries,
                         sampler="sde", trained_timesteps=hi - lo, dit_remat=str(c.dit_remat),
                         num_updates=s.num_updates)
        runner = JointGRPO(s, render, vlm=policy, vlm_tokenizer=tokenizer, vlm_vcfg=recipe.vlm, vdm=vdm_run,
                           clip_model=clip_model, clip_tokenizer=clip_tokenizer, vlm_trainable=str(g.vlm_trainable),
                           dit_trainable=str(g.dit_trainable), optim_cfg=g, seed=ctx.seed, mesh=mesh)
        ours, metrics = _time_grpo_steps(ctx, runner, examples, int(c.steps))
        if mode == "grpo_stage1":
            stage1_vlm = runner.vlm.model()      # the trained adapters (the state `vlm` held was donated)
        del runner, policy, vdm_run
        dtypes = {name: max(m["param_dtypes"], key=m["param_dtypes"].get) for name, m in models.items()}
        out.append(figure(
            f"{mode}_step", "grpo", GRPO_WHAT[mode], shape, ctx.dtype, ours, None, GRPO_NO_REFERENCE,
            dtypes=dtypes, models=models, metrics=metrics,
            phases="text_s: VLM sampling (Stage 1: the G captions; Stage 2: the anchors, every attempt) and "
                   "decoding; video_s: rendering (text encoding, sampler, VAE decode) and CLIP frame features; "
                   "update_s: rewards, advantages, log-probs and the policy update(s) (JointGRPO.step's timers)",
            note="random weights: captions rarely parse and rows decode up to the token cap (EOS has ~1/vocab "
                 "chance a token); no anchor reaches the ROUGE-L threshold, so Stage 2 makes every allowed "
                 "attempt (metrics['anchor/resamples']). Trained checkpoints stop earlier."))
    return out


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
    for key, unit in (("tokens_per_s", "tok/s"), ("tflops_per_s", "TFLOP/s"), ("dit_tflops_per_s", "DiT TFLOP/s"),
                      ("frames_per_s", "frames/s")):
        if key in o:
            parts.append(f"{_fmt(o[key])} {unit}" + (f" (ref {_fmt(r[key])})" if key in r else ""))
    if fig.get("fraction_of_peak") is not None:
        parts.append(f"{100 * fig['fraction_of_peak']:.1f}% of bf16 peak")
    if fig.get("fraction_of_measured_matmul") is not None:
        parts.append(f"{100 * fig['fraction_of_measured_matmul']:.0f}% of measured matmul")
    if "phases_s" in o:
        parts.append(", ".join(f"{k[:-2]} {_fmt(v)} s" for k, v in o["phases_s"].items())
                     + f" (spread {_fmt(o['min_s'])}-{_fmt(o['max_s'])} s)")
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
