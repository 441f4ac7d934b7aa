"""Wan2.1 in Flax NNX: the video diffusion transformer (T2V, with VANS reference-frame
conditioning), the causal 3D VAE and the UMT5 text encoder."""
from .dit import (WanAttention, WanBlock, WanConfig, WanLoRAConfig, WanTransformer3D, apply_rope_interleaved,
                  patchify, rope_angles, timestep_sinusoid, unpatchify)
from .umt5 import UMT5Config, UMT5Encoder
from .vae import DiagonalGaussian, WanVAE, WanVAEConfig
from .pipeline import WanModels, from_pretrained, generate, reference_latents

__all__ = ["WanAttention", "WanBlock", "WanConfig", "WanLoRAConfig", "WanTransformer3D", "apply_rope_interleaved",
           "patchify", "rope_angles", "timestep_sinusoid", "unpatchify", "UMT5Config", "UMT5Encoder",
           "DiagonalGaussian", "WanVAE", "WanVAEConfig", "WanModels", "from_pretrained", "generate",
           "reference_latents"]
