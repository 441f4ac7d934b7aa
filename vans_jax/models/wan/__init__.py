"""Wan2.1 in Flax NNX: the video diffusion transformer (T2V, with VANS reference-frame
conditioning), the causal 3D VAE and the UMT5 text encoder.

The generation pipeline (``WanModels``, ``from_pretrained``, ``generate``, ``reference_latents``)
lives in ``vans_jax.sampling.wan`` and is re-exported lazily under these public names."""
from ..._lazy import lazy_exports
from .dit import (WanAttention, WanBlock, WanConfig, WanLoRAConfig, WanTransformer3D, apply_rope_interleaved,
                  patchify, rope_angles, timestep_sinusoid, trim_text_context, unpatchify)
from .umt5 import UMT5Config, UMT5Encoder
from .vae import DiagonalGaussian, WanVAE, WanVAEConfig

FACADE = {"vans_jax.sampling.wan": ("WanModels", "from_pretrained", "generate", "reference_latents")}
__getattr__, _facade_dir, _facade = lazy_exports(__name__, FACADE)


def __dir__():
    return sorted(set(globals()) | set(_facade))


__all__ = ["WanAttention", "WanBlock", "WanConfig", "WanLoRAConfig", "WanTransformer3D", "apply_rope_interleaved",
           "patchify", "rope_angles", "timestep_sinusoid", "trim_text_context", "unpatchify", "UMT5Config",
           "UMT5Encoder",
           "DiagonalGaussian", "WanVAE", "WanVAEConfig", *_facade]
