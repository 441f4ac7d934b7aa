"""Qwen2.5-VL weights: Hugging Face checkpoint <-> our NNX model.

Both key layouts load: the Hub's (``visual.*``, ``model.*``, ``lm_head.weight``) and newer
transformers' (``model.visual.*``, ``model.language_model.*``). Keys are normalized to the
Hub layout, then mapped by the table below. Export writes the Hub layout (which every
transformers version reads), with LoRA merged.
"""
from __future__ import annotations

import os

import numpy as np
from flax import nnx

from ..models.layers import resolve_dtype
from ..models.lora import lora_init_fill, merge_lora_copy
from ..models.qwen2_5_vl.config import Qwen2_5_VLConfig
from ..models.qwen2_5_vl.modeling import LoRAConfig, Qwen2_5_VLModel
from .loading import RenamedCheckpoint, export_tensors, load_into, save_sharded
from .safetensors_io import Checkpoint

_LIN = r"(?P<w>weight|bias)"
# (checkpoint key regex, our parameter path, transform)
RULES = [
    (r"visual\.patch_embed\.proj\.weight", "visual.patch_embed.kernel", "conv_flat"),
    (r"visual\.blocks\.(?P<i>\d+)\.norm(?P<n>[12])\.weight", "visual.blocks.norm{n}.weight", "id"),
    (r"visual\.blocks\.(?P<i>\d+)\.attn\.qkv\." + _LIN, "visual.blocks.qkv.{w}", "linear"),
    (r"visual\.blocks\.(?P<i>\d+)\.attn\.proj\." + _LIN, "visual.blocks.proj.{w}", "linear"),
    (r"visual\.blocks\.(?P<i>\d+)\.mlp\.(?P<p>gate_proj|up_proj|down_proj)\." + _LIN, "visual.blocks.{p}.{w}",
     "linear"),
    (r"visual\.merger\.ln_q\.weight", "visual.merger_norm.weight", "id"),
    (r"visual\.merger\.mlp\.0\." + _LIN, "visual.merger_fc1.{w}", "linear"),
    (r"visual\.merger\.mlp\.2\." + _LIN, "visual.merger_fc2.{w}", "linear"),
    (r"model\.embed_tokens\.weight", "embed_tokens.embedding", "id"),
    (r"model\.layers\.(?P<i>\d+)\.(?P<n>input_layernorm|post_attention_layernorm)\.weight", "layers.{n}.weight",
     "id"),
    (r"model\.layers\.(?P<i>\d+)\.self_attn\.(?P<p>q_proj|k_proj|v_proj|o_proj)\." + _LIN, "layers.{p}.{w}",
     "linear"),
    (r"model\.layers\.(?P<i>\d+)\.mlp\.(?P<p>gate_proj|up_proj|down_proj)\." + _LIN, "layers.{p}.{w}", "linear"),
    (r"model\.norm\.weight", "norm.weight", "id"),
    (r"lm_head\.weight", "lm_head.kernel", "linear"),
]

STACKED = ("visual.blocks.", "layers.")


def _linear_in(a):
    return a.T if a.ndim == 2 else a


TRANSFORMS = {
    "id": lambda a: a,
    "linear": _linear_in,  # torch (out, in) -> (in, out); biases unchanged
    "conv_flat": lambda a: a.reshape(a.shape[0], -1).T,  # (D, C, T, P, P) -> (C*T*P*P, D)
}


def normalize_key(key: str) -> str:
    """Maps newer transformers' layout onto the Hub layout."""
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def from_pretrained(path: str, dtype="float32", mesh=None, *, lora: LoRAConfig | None = None,
                    attn_impl: str = "xla", remat: str = "none", seed: int = 0,
                    axis_rules=None) -> Qwen2_5_VLModel:
    """Loads a local Hugging Face Qwen2.5-VL directory (config.json + safetensors, single or
    sharded) into our model, streaming each tensor onto its devices.

    dtype: parameter dtype ("float32" / "bfloat16"). mesh: a ``jax.sharding.Mesh`` (see
    ``vans_jax.parallel.make_mesh``); parameters are sharded by their logical axes.
    lora: add fresh LoRA adapters (B = 0, so the output equals the base model's).
    """
    jdtype = resolve_dtype(dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    cfg = Qwen2_5_VLConfig.from_pretrained(path, dtype=str(np.dtype(jdtype)), attn_impl=attn_impl, remat=remat)
    ckpt = RenamedCheckpoint(Checkpoint(path), normalize_key)
    if "lm_head.weight" not in ckpt.names:
        cfg.tie_word_embeddings = True  # absent lm_head = tied, as the 3B checkpoint
    abstract = nnx.eval_shape(lambda: Qwen2_5_VLModel(cfg, rngs=nnx.Rngs(seed), lora=lora))
    extra = {}
    if axis_rules is not None:
        extra["axis_rules"] = axis_rules
    return load_into(abstract, ckpt, RULES, TRANSFORMS, dtype=jdtype, mesh=mesh,
                     skip=lambda k: k == "lm_head.weight" and cfg.tie_word_embeddings and abstract.lm_head is None,
                     fill_unloaded=lora_init_fill(seed), stacked_prefixes=STACKED, **extra)


def _export_key(path: str, layer):
    """Our parameter path (+ layer) -> Hub-layout checkpoint key; LoRA params are not exported."""
    if ".lora_" in path:
        return None
    parts = path.split(".")
    leaf = {"kernel": "weight", "bias": "bias", "weight": "weight", "embedding": "weight"}[parts[-1]]
    name = parts[-2] if len(parts) >= 2 else ""
    if path == "visual.patch_embed.kernel":
        return "visual.patch_embed.proj.weight"
    if path.startswith("visual.blocks."):
        sub = {"norm1": "norm1", "norm2": "norm2", "qkv": "attn.qkv", "proj": "attn.proj",
               "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}[name]
        return f"visual.blocks.{layer}.{sub}.{leaf}"
    if path.startswith("visual."):
        return {"merger_norm": "visual.merger.ln_q", "merger_fc1": "visual.merger.mlp.0",
                "merger_fc2": "visual.merger.mlp.2"}[name] + "." + leaf
    if path == "embed_tokens.embedding":
        return "model.embed_tokens.weight"
    if path.startswith("layers."):
        sub = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
               "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
               "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
               "down_proj": "mlp.down_proj"}[name]
        return f"model.layers.{layer}.{sub}.{leaf}"
    if path == "norm.weight":
        return "model.norm.weight"
    if path == "lm_head.kernel":
        return "lm_head.weight"
    raise KeyError(f"no export rule for parameter {path}")


def _export_transform(path: str) -> str:
    if path == "visual.patch_embed.kernel":
        return "conv_out"
    return "linear" if path.endswith(".kernel") else "id"


def export_pretrained(model: Qwen2_5_VLModel, out_dir: str, *, dtype=None, max_shard_bytes: int = 2 << 30):
    """Writes a Hugging Face directory (config.json + safetensors) that transformers loads.
    LoRA adapters, if any, are merged into the exported weights (the model is not changed)."""
    import json

    cfg = model.config
    merged = merge_lora_copy(model)
    v = cfg.vision
    patch_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out_dtype = None if dtype is None else np.dtype(resolve_dtype(dtype))
    cast = (lambda a: a) if out_dtype is None else (lambda a: a.astype(out_dtype))
    transforms = {"id": lambda a: cast(a), "linear": lambda a: cast(np.ascontiguousarray(_linear_in(a))),
                  "conv_out": lambda a: cast(np.ascontiguousarray(a.T.reshape(patch_shape)))}
    tensors = export_tensors(merged, _export_key, transforms, STACKED, _export_transform)
    save_sharded(tensors, out_dir, max_shard_bytes=max_shard_bytes)
    hf = cfg.to_hf_dict()
    if out_dtype is not None:
        hf["dtype"] = "bfloat16" if out_dtype == np.dtype(resolve_dtype("bf16")) else str(out_dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
