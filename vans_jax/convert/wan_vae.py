"""diffusers ``AutoencoderKLWan`` checkpoints -> ``WanVAE``.

Module paths are the same on both sides (``encoder.down_blocks.3.conv1``,
``decoder.up_blocks.0.upsamplers.0.time_conv``, ``decoder.mid_block.attentions.0``...); only the leaf
names and layouts differ, as listed in ``PARAM_RULES`` (data). The full key table is derived from the
model's parameters, checked against the checkpoint (missing, unexpected and mis-shaped keys are all
reported in one ``CheckpointError``), then loaded tensor by tensor with ``loading.load_into``.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
from flax import nnx

from ..models.layers import resolve_dtype
from ..models.wan.vae import WanVAE, WanVAEConfig
from .loading import check_keys, load_into, open_checkpoint
from .safetensors_io import CheckpointError

# (regex on our parameter path, diffusers key template, transform); first match wins.
PARAM_RULES: tuple[tuple[str, str, str], ...] = (
    # WanResample: nn.Sequential(Upsample|ZeroPad2d, Conv2d) -> the conv is ``resample.1``
    (r"(?P<m>.+\.resample)\.kernel", "{m}.1.weight", "conv2d"),
    (r"(?P<m>.+\.resample)\.bias", "{m}.1.bias", "identity"),
    # WanAttentionBlock: 1x1 Conv2d
    (r"(?P<m>.+\.(?:to_qkv|proj))\.kernel", "{m}.weight", "conv1x1"),
    (r"(?P<m>.+\.(?:to_qkv|proj))\.bias", "{m}.bias", "identity"),
    # WanRMS_norm gamma: (C, 1, 1) in the attention block (images=True), else (C, 1, 1, 1)
    (r"(?P<m>.+\.norm)\.weight", "{m}.gamma", "gamma_image"),
    (r"(?P<m>.+\.(?:norm1|norm2|norm_out))\.weight", "{m}.gamma", "gamma_video"),
    # WanCausalConv3d
    (r"(?P<m>.+)\.kernel", "{m}.weight", "conv3d"),
    (r"(?P<m>.+)\.bias", "{m}.bias", "identity"),
)

# torch layout -> ours
TRANSFORMS = {
    "identity": lambda a: a,
    "conv3d": lambda a: np.transpose(a, (2, 3, 4, 1, 0)),        # (O, I, T, H, W) -> (T, H, W, I, O)
    "conv2d": lambda a: np.transpose(a, (2, 3, 1, 0)),           # (O, I, H, W) -> (H, W, I, O)
    "conv1x1": lambda a: np.transpose(a.reshape(a.shape[:2])),   # (O, I, 1, 1) -> (I, O)
    "gamma_image": lambda a: a.reshape(-1),
    "gamma_video": lambda a: a.reshape(-1),
}


def _torch_shape(shape: tuple, transform: str) -> tuple:
    if transform == "conv3d":
        t, h, w, i, o = shape
        return (o, i, t, h, w)
    if transform == "conv2d":
        h, w, i, o = shape
        return (o, i, h, w)
    if transform == "conv1x1":
        return (shape[1], shape[0], 1, 1)
    if transform == "gamma_image":
        return (shape[0], 1, 1)
    if transform == "gamma_video":
        return (shape[0], 1, 1, 1)
    return tuple(shape)


_COMPILED = [(re.compile(p + r"\Z"), t, tf) for p, t, tf in PARAM_RULES]


def diffusers_key(path: str) -> tuple[str, str]:
    """(diffusers key, transform) for one of our parameter paths."""
    for pattern, template, transform in _COMPILED:
        m = pattern.match(path)
        if m:
            return template.format(**m.groupdict()), transform
    raise CheckpointError(f"no diffusers key rule for parameter {path!r}")


def _abstract(cfg: WanVAEConfig) -> WanVAE:
    return nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))


def key_table(cfg: WanVAEConfig, model: WanVAE | None = None) -> dict[str, tuple[str, str, tuple]]:
    """diffusers key -> (our param path, transform, torch shape) for every tensor of a ``cfg`` VAE."""
    model = model if model is not None else _abstract(cfg)
    table = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = ".".join(str(p) for p in path)
        key, transform = diffusers_key(path)
        if key in table:
            raise CheckpointError(f"two parameters map to diffusers key {key!r}: {table[key][0]}, {path}")
        table[key] = (path, transform, _torch_shape(tuple(var.get_value().shape), transform))
    return table


def check_coverage(ckpt, cfg: WanVAEConfig, model: WanVAE | None = None) -> dict:
    """Raises ``CheckpointError`` naming every missing, unexpected and mis-shaped key; returns the table."""
    table = key_table(cfg, model)
    check_keys(ckpt, table, "Wan VAE")
    return table


def load_vae(path_or_dir, dtype="float32", mesh=None, *, config: WanVAEConfig | None = None,
             **config_overrides) -> WanVAE:
    """A ``WanVAE`` from a diffusers ``AutoencoderKLWan`` checkpoint, without a random init.

    path_or_dir: a diffusers model directory (config.json + safetensors), a safetensors file (its
    directory's config.json is used if present), a ``Checkpoint`` or a {key: array} dict.
    config: overrides config.json; without either, the Wan2.1 defaults.
    dtype: parameter and activation dtype. mesh: place parameters with their logical-axis sharding.
    """
    ckpt = open_checkpoint(path_or_dir)
    if isinstance(path_or_dir, (str, os.PathLike)):
        src = os.fspath(path_or_dir)
        cfg_file = os.path.join(src if os.path.isdir(src) else os.path.dirname(src), "config.json")
        if config is None and os.path.isfile(cfg_file):
            config = WanVAEConfig.from_diffusers_config(cfg_file)
    config = config if config is not None else WanVAEConfig()
    if dtype is not None:
        name = np.dtype(resolve_dtype(dtype)).name
        config_overrides = {"dtype": name, "param_dtype": name, **config_overrides}
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    abstract = _abstract(config)
    table = check_coverage(ckpt, config, abstract)
    rules = [(re.escape(key), path, transform) for key, (path, transform, _) in table.items()]
    return load_into(abstract, ckpt, rules, TRANSFORMS, dtype=resolve_dtype(config.param_dtype), mesh=mesh)
