"""Wan2.1 video diffusion transformer (T2V) in Flax NNX."""
from .dit import (WanAttention, WanBlock, WanConfig, WanLoRAConfig, WanTransformer3D, apply_rope_interleaved,
                  layer_norm, patchify, rope_angles, timestep_sinusoid, unpatchify)

__all__ = ["WanAttention", "WanBlock", "WanConfig", "WanLoRAConfig", "WanTransformer3D", "apply_rope_interleaved",
           "layer_norm", "patchify", "rope_angles", "timestep_sinusoid", "unpatchify"]
