"""What the bench sections share: the section registry, the device peaks, the analytic DiT FLOP
count, timing and figures, the run's context (config, the PyTorch reference's status, cached models)
and the random-weight builders (``random_model``; the Wan components of the dit, pipeline, vae and
grpo sections: ``build_wan``, cached per run by ``wan_models``)."""
from __future__ import annotations

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


def fraction_of_peak(tflops: float, peak: float | None, dtype: str):
    """(``tflops`` / the bf16 peak, None), or (None, why not) when the peak is unknown or the run is
    not bfloat16."""
    if peak is None:
        return None, "the device's peak is not in the table (PEAK_BF16_TFLOPS)"
    if dtype != "bfloat16":
        return None, f"the peak table is for bfloat16; this run is {dtype}"
    return tflops / peak, None


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


def spread(times) -> dict:
    """A series of times as the figures report it: median (``steady_s``), min, max, the series."""
    times = [float(t) for t in times]
    if not times:
        raise ValueError("no times to summarize (repeats must be >= 1)")
    return dict(steady_s=statistics.median(times), min_s=min(times), max_s=max(times), times_s=times,
                repeats=len(times))


def relative_spread(stats: dict) -> float:
    """(max - min) / median of a figure's times: the run's noise when taken from the matmul."""
    return (stats["max_s"] - stats["min_s"]) / stats["steady_s"]


def compare(ours: dict, reference: dict) -> dict:
    """Speedup of ``ours`` over ``reference`` (dicts with steady_s, min_s, max_s): the ratio of the
    medians, its range [reference min / our max, reference max / our min], and the verdict: "tie"
    when the two [min, max] intervals overlap, else "faster" (ours entirely below the reference's)
    or "slower"."""
    for side, stats in (("ours", ours), ("reference", reference)):
        if not 0 < stats["min_s"] <= stats["steady_s"] <= stats["max_s"]:
            raise ValueError(f"{side}: need 0 < min_s <= steady_s <= max_s, got {stats['min_s']}, "
                             f"{stats['steady_s']}, {stats['max_s']}")
    if ours["max_s"] < reference["min_s"]:
        verdict = "faster"
    elif reference["max_s"] < ours["min_s"]:
        verdict = "slower"
    else:
        verdict = "tie"
    return dict(speedup=reference["steady_s"] / ours["steady_s"],
                speedup_range=[reference["min_s"] / ours["max_s"], reference["max_s"] / ours["min_s"]],
                verdict=verdict)


def median_times(fn, repeats: int, sync) -> tuple[dict, Any]:
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
    return dict(warmup_s=first, **spread(times)), out


def output_parity(ours, reference) -> dict:
    """max |ours - ref| / max |ref| and mean |ours - ref| / mean |ref| (float64) of two outputs."""
    a, b = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise RuntimeError(f"parity: our output has shape {a.shape}, the reference's {b.shape}")
    d = np.abs(a - b)
    return dict(parity_rel_err=float(d.max() / max(np.abs(b).max(), 1e-30)),
                parity_mean_rel_err=float(d.mean() / max(np.abs(b).mean(), 1e-30)))


def figure(name: str, section_name: str, what: str, shape: dict, dtype: str, ours: dict,
           reference: dict | None = None, reference_reason: str | None = None, **extra) -> dict:
    """One benchmark figure. ``ours`` / ``reference``: dicts with at least steady_s, min_s, max_s,
    warmup_s, repeats, device (and any rates). speedup = reference steady time / our steady time,
    with its range and verdict (``compare``: "tie" when the [min, max] intervals overlap)."""
    if reference is None and reference_reason is None:
        raise ValueError(f"figure {name}: give the reference's timings or the reason it is absent")
    cmp = compare(ours, reference) if reference is not None else dict(speedup=None, speedup_range=None, verdict=None)
    return dict(name=name, section=section_name, what=what, shape=shape, dtype=dtype, device=ours["device"],
                ours=ours, reference=reference, reference_reason=None if reference is not None else reference_reason,
                **cmp, **extra)


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
        from .resources import cores_available, xla_pool_threads
        return (f"cpu: {_cpu_name()}, {cores_available()} cores, {xla_pool_threads()} XLA threads "
                f"(JAX {jax.__version__})")
    return f"{d.platform}: 1 x {d.device_kind} (JAX {jax.__version__})"


# ----------------------------------------------------------------------------- context


class BenchContext:
    """Shared state of one bench run: config, the reference (torch) status, lazily built models."""

    def __init__(self, cfg, threads: int):
        self.cfg = cfg
        self.threads = threads                  # torch's intra- and inter-op threads (XLA's pool: resources)
        self.torch_threads_how: str | None = None
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
        from .resources import set_torch_threads
        self.torch_threads_how = set_torch_threads(torch, self.threads)
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
        return (f"cpu: {_cpu_name()}, {t.get_num_threads()} intra-op / {t.get_num_interop_threads()} inter-op "
                f"threads (torch {t.__version__})")

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
        stats, out = median_times(fn, self.repeats, jax.block_until_ready)
        stats["device"] = self.device
        return stats, out

    def reference(self, fn) -> tuple[dict, Any]:
        stats, out = median_times(fn, self.reference_repeats, self.torch_sync)
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


# ----------------------------------------------------------------------------- Wan components


def _t5_tokenizer(transformers):
    """A tiny SentencePiece-style UMT5 tokenizer (pad 0, eos 1) for random text encoders."""
    pieces = ["▁a", "▁the", "▁person", "▁cuts", "▁onion", "▁on", "▁board", "▁then", "▁stirs", "▁pan", "▁red"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(p, -3.0) for p in pieces] + [(ch, -6.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0)


def build_wan(ctx: BenchContext, with_reference: bool = True):
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


def wan_models(ctx: BenchContext):
    """``build_wan(ctx)``, built once per run (the dit, pipeline and vae sections share it)."""
    return ctx.cached("wan", lambda: build_wan(ctx))
