"""CLIP checkpoints: the table from Hugging Face ``CLIPModel`` keys to ``vans_jax.models.clip``'s
parameters, ``from_pretrained`` (streams each tensor onto its devices through
``convert.loading.load_into``, checks coverage both ways, raises ``CheckpointError`` naming a missing,
unexpected or mis-shaped key) and ``export_state_dict`` (the inverse, for round trips)."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
from flax import nnx

from ..models.clip import CLIPConfig, CLIPModel
from ..parallel import DEFAULT_RULES
from .loading import export_tensors, load_into
from .safetensors_io import Checkpoint, CheckpointError



# per-layer entries: (checkpoint key suffix after "encoder.layers.{i}.", param path suffix, transform)
_LAYER_TABLE: tuple[tuple[str, str, str], ...] = tuple(
    (f"self_attn.{p}.{w}", f"self_attn.{p}.{ours}", t)
    for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    for w, ours, t in (("weight", "kernel", "linear"), ("bias", "bias", "none"))
) + tuple(
    (f"mlp.{p}.{w}", f"mlp.{p}.{ours}", t)
    for p in ("fc1", "fc2")
    for w, ours, t in (("weight", "kernel", "linear"), ("bias", "bias", "none"))
) + tuple(
    (f"{ln}.{w}", f"{ln}.{w}", "none") for ln in ("layer_norm1", "layer_norm2") for w in ("weight", "bias")
)

# non-layer entries: (checkpoint key, param path, transform)
_GLOBAL_TABLE: tuple[tuple[str, str, str], ...] = (
    ("text_model.embeddings.token_embedding.weight", "text_model.token_embedding.embedding", "none"),
    ("text_model.embeddings.position_embedding.weight", "text_model.position_embedding", "none"),
    ("text_model.final_layer_norm.weight", "text_model.final_layer_norm.weight", "none"),
    ("text_model.final_layer_norm.bias", "text_model.final_layer_norm.bias", "none"),
    ("vision_model.embeddings.class_embedding", "vision_model.class_embedding", "none"),
    ("vision_model.embeddings.patch_embedding.weight", "vision_model.patch_embedding.kernel", "conv"),
    ("vision_model.embeddings.position_embedding.weight", "vision_model.position_embedding", "none"),
    ("vision_model.pre_layrnorm.weight", "vision_model.pre_layrnorm.weight", "none"),
    ("vision_model.pre_layrnorm.bias", "vision_model.pre_layrnorm.bias", "none"),
    ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.weight", "none"),
    ("vision_model.post_layernorm.bias", "vision_model.post_layernorm.bias", "none"),
    ("visual_projection.weight", "visual_projection.kernel", "linear"),
    ("text_projection.weight", "text_projection.kernel", "linear"),
    ("logit_scale", "logit_scale", "scalar"),
)

# checkpoint keys that may be present and carry no parameter (old non-persistent buffers)
IGNORED_KEY_SUFFIXES = ("embeddings.position_ids",)


@dataclasses.dataclass(frozen=True)
class MappingEntry:
    param: str                    # dotted parameter path in CLIPModel
    keys: tuple[str, ...]         # checkpoint keys, one per layer for stacked parameters
    transform: str                # a ``TRANSFORMS`` name: "none" | "linear" | "conv" | "scalar"

    @property
    def stacked(self) -> bool:
        """Stacked over layers (a new leading axis), even when there is only one layer."""
        return ".layers." in self.param


def weight_mapping(config: CLIPConfig) -> list[MappingEntry]:
    """The table from Hugging Face ``CLIPModel`` keys to this module's parameters."""
    out = [MappingEntry(p, (k,), t) for k, p, t in _GLOBAL_TABLE]
    for tower, n in (("text_model", config.text.num_hidden_layers), ("vision_model", config.vision.num_hidden_layers)):
        for suffix, ours, t in _LAYER_TABLE:
            keys = tuple(f"{tower}.encoder.layers.{i}.{suffix}" for i in range(n))
            out.append(MappingEntry(f"{tower}.layers.{ours}", keys, t))
    return out


# ``load_into`` rules (regex on the checkpoint key, parameter path, transform) from the tables
RULES = [(re.escape(k), p, t) for k, p, t in _GLOBAL_TABLE] + [
    (r"(?P<tower>text_model|vision_model)\.encoder\.layers\.(?P<i>\d+)\." + re.escape(k), "{tower}.layers." + p, t)
    for k, p, t in _LAYER_TABLE]
STACKED = ("text_model.layers.", "vision_model.layers.")
TRANSFORMS = {
    "none": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.reshape(a.shape[0], -1).T,        # OIHW -> (I*H*W, O)
    "scalar": lambda a: a.reshape(()) if a.shape == (1,) else a,  # some writers store a scalar as (1,)
}


def from_pretrained(local_dir: str, dtype="float32", mesh=None, *, rules=DEFAULT_RULES, remat="none",
                    attn_impl: str | None = None) -> CLIPModel:
    """Builds a CLIPModel from a local Hugging Face CLIP directory (config.json + safetensors),
    streaming each tensor onto its devices (sharded by ``rules`` on ``mesh``)."""
    overrides = {} if attn_impl is None else {"attn_impl": attn_impl}
    config = CLIPConfig.from_pretrained(local_dir, **overrides)
    ckpt = Checkpoint(local_dir)
    present = set(ckpt.keys())
    missing = [k for e in weight_mapping(config) for k in e.keys if k not in present]
    if missing:
        raise CheckpointError(f"missing key {missing[0]!r} in CLIP checkpoint ({len(missing)} missing in all)")
    abstract = nnx.eval_shape(lambda: CLIPModel(config, dtype=dtype, rngs=nnx.Rngs(0), remat=remat))
    return load_into(abstract, ckpt, RULES, TRANSFORMS, mesh=mesh, axis_rules=rules,
                     skip=lambda k: k.endswith(IGNORED_KEY_SUFFIXES), stacked_prefixes=STACKED)


def export_state_dict(model: CLIPModel) -> dict[str, np.ndarray]:
    """The inverse of the mapping table: Hugging Face keys -> numpy arrays (for round trips)."""
    c, p = model.config.vision.num_channels, model.config.vision.patch_size
    keys, transform_of = {}, {}
    for e in weight_mapping(model.config):
        transform_of[e.param] = e.transform
        keys.update({(e.param, i if e.stacked else None): k for i, k in enumerate(e.keys)})
    transforms = {"none": lambda a: a, "scalar": lambda a: a, "linear": lambda a: np.ascontiguousarray(a.T),
                  "conv": lambda a: np.ascontiguousarray(a.T.reshape(a.shape[1], c, p, p))}
    return dict(export_tensors(model, lambda path, layer: keys[(path, layer)], transforms, STACKED,
                               transform_of.__getitem__))
