"""Wan2.1 DiT checkpoints <-> ``WanTransformer3D``.

Two key layouts are understood, both given below as data:

* diffusers (``WanTransformer3DModel``): ``condition_embedder.*``, ``blocks.N.attn1.to_q``,
  ``blocks.N.ffn.net.0.proj``, ``blocks.N.norm2`` (cross-attention norm), ``scale_shift_table``, ``proj_out``;
* the original Wan repo (also the released VANS DiT file, whose keys may carry a ``dit.`` prefix):
  ``time_embedding.0``, ``blocks.N.self_attn.q``, ``blocks.N.ffn.0``, ``blocks.N.norm3`` (cross-attention
  norm; norm2/norm3 are swapped relative to diffusers), ``blocks.N.modulation``, ``head.head``,
  ``head.modulation``.

Loading streams one tensor at a time from safetensors; parameters of the scanned blocks are
stacked on a leading layer axis and filled one layer at a time. Every model parameter must be
mapped and every checkpoint key used; anything else raises ``CheckpointError``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.layers import LoRAParam, resolve_dtype
from ..models.lora import lora_init_fill, merge_lora_copy
from ..models.wan.dit import WanConfig, WanLoRAConfig, WanTransformer3D
from ..parallel import DEFAULT_RULES
from .loading import RenamedCheckpoint, _flat_params, export_tensors, load_into, open_checkpoint, save_sharded
from .safetensors_io import CheckpointError

# ----------------------------------------------------------------------------- tables
# Linear layers: (our module path, diffusers module, original-Wan module). Each expands to
# ``<module>.kernel`` <-> ``<module>.weight`` (transposed) and ``<module>.bias`` <-> ``<module>.bias``.
GLOBAL_LINEARS: tuple[tuple[str, str, str], ...] = (
    ("time_linear_1", "condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("time_linear_2", "condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("time_proj", "condition_embedder.time_proj", "time_projection.1"),
    ("text_linear_1", "condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("text_linear_2", "condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("proj_out", "proj_out", "head.head"),
)
# Other global tensors: (our param path, diffusers key, original key, transform).
GLOBAL_TENSORS: tuple[tuple[str, str, str, str], ...] = (
    ("patch_embedding.kernel", "patch_embedding.weight", "patch_embedding.weight", "conv3d"),
    ("patch_embedding.bias", "patch_embedding.bias", "patch_embedding.bias", "identity"),
    ("scale_shift_table", "scale_shift_table", "head.modulation", "identity"),
)
# Per-block linears; keys are relative to ``blocks.{i}.``.
BLOCK_LINEARS: tuple[tuple[str, str, str], ...] = (
    ("attn1.to_q", "attn1.to_q", "self_attn.q"),
    ("attn1.to_k", "attn1.to_k", "self_attn.k"),
    ("attn1.to_v", "attn1.to_v", "self_attn.v"),
    ("attn1.to_out", "attn1.to_out.0", "self_attn.o"),
    ("attn2.to_q", "attn2.to_q", "cross_attn.q"),
    ("attn2.to_k", "attn2.to_k", "cross_attn.k"),
    ("attn2.to_v", "attn2.to_v", "cross_attn.v"),
    ("attn2.to_out", "attn2.to_out.0", "cross_attn.o"),
    ("ffn_in", "ffn.net.0.proj", "ffn.0"),
    ("ffn_out", "ffn.net.2", "ffn.2"),
)
BLOCK_TENSORS: tuple[tuple[str, str, str, str], ...] = (
    ("attn1.norm_q.weight", "attn1.norm_q.weight", "self_attn.norm_q.weight", "identity"),
    ("attn1.norm_k.weight", "attn1.norm_k.weight", "self_attn.norm_k.weight", "identity"),
    ("attn2.norm_q.weight", "attn2.norm_q.weight", "cross_attn.norm_q.weight", "identity"),
    ("attn2.norm_k.weight", "attn2.norm_k.weight", "cross_attn.norm_k.weight", "identity"),
    ("norm2.weight", "norm2.weight", "norm3.weight", "identity"),   # affine cross-attention LayerNorm
    ("norm2.bias", "norm2.bias", "norm3.bias", "identity"),
    ("scale_shift_table", "scale_shift_table", "modulation", "identity"),
)
LAYOUTS = ("diffusers", "wan")
STRIP_PREFIXES = ("dit.", "model.diffusion_model.")
STACKED = ("blocks.",)   # parameters stacked over the scanned blocks


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint tensor: where it goes in the model and how it is transformed."""
    key: str            # checkpoint key (prefix stripped)
    path: str           # our param path ("blocks.attn1.to_q.kernel")
    layer: int | None   # index on the stacked layer axis, None for global params
    transform: str      # "linear" (transpose), "conv3d" (flatten + transpose) or "identity"


def _expand(linears, tensors, layout: str):
    col = LAYOUTS.index(layout)
    out = []
    for ours, *names in linears:
        out.append((f"{ours}.kernel", f"{names[col]}.weight", "linear"))
        out.append((f"{ours}.bias", f"{names[col]}.bias", "identity"))
    for ours, *rest in tensors:
        out.append((ours, rest[col], rest[2]))
    return out


def key_table(cfg: WanConfig, layout: str = "diffusers") -> dict[str, Entry]:
    """Checkpoint key -> Entry for every tensor of a ``cfg``-shaped DiT in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    table: dict[str, Entry] = {}
    for path, key, tf in _expand(GLOBAL_LINEARS, GLOBAL_TENSORS, layout):
        table[key] = Entry(key, path, None, tf)
    block = _expand(BLOCK_LINEARS, BLOCK_TENSORS, layout)
    for i in range(cfg.num_layers):
        for path, key, tf in block:
            if not cfg.cross_attn_norm and path.startswith("norm2."):
                continue
            k = f"blocks.{i}.{key}"
            table[k] = Entry(k, f"blocks.{path}", i, tf)
    return table


def load_rules(layout: str = "diffusers") -> list[tuple[str, str, str]]:
    """The tables as ``loading.load_into`` rules (regex on the prefix-stripped key, our path, transform)."""
    rules = [(re.escape(key), path, tf) for path, key, tf in _expand(GLOBAL_LINEARS, GLOBAL_TENSORS, layout)]
    rules += [(r"blocks\.(?P<i>\d+)\." + re.escape(key), f"blocks.{path}", tf)
              for path, key, tf in _expand(BLOCK_LINEARS, BLOCK_TENSORS, layout)]
    return rules


# ----------------------------------------------------------------------------- transforms
TRANSFORMS = {
    "identity": lambda a: a,
    "linear": lambda a: a.T,                           # torch (out, in) -> (in, out)
    "conv3d": lambda a: a.reshape(a.shape[0], -1).T,   # (D, C, t, h, w) -> (C*t*h*w, D)
}


def _to_torch(a: np.ndarray, transform: str, cfg: WanConfig) -> np.ndarray:
    if transform == "linear":
        return np.ascontiguousarray(a.T)
    if transform == "conv3d":
        return np.ascontiguousarray(a.T.reshape((a.shape[1], cfg.in_channels) + tuple(cfg.patch_size)))
    return a


def _torch_shape(our_shape: tuple, transform: str, cfg: WanConfig) -> tuple:
    if transform == "linear":
        return tuple(our_shape[::-1])
    if transform == "conv3d":
        return (our_shape[1], cfg.in_channels) + tuple(cfg.patch_size)
    return tuple(our_shape)


# ----------------------------------------------------------------------------- key handling


def strip_prefix(key: str) -> str:
    for p in STRIP_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def detect_layout(keys) -> str:
    keys = set(keys)
    if any(k.startswith("condition_embedder.") for k in keys) or "proj_out.weight" in keys:
        return "diffusers"
    if any(k.startswith(("time_embedding.", "head.head.")) for k in keys):
        return "wan"
    raise CheckpointError("cannot tell the DiT checkpoint layout: neither diffusers keys "
                          "('condition_embedder.*') nor original-Wan keys ('time_embedding.*', 'head.head.*') found")


def infer_config(ckpt, **overrides) -> WanConfig:
    """A WanConfig from tensor shapes (either layout); heads = dim / 128 unless overridden."""
    view = _stripped(ckpt)
    names = view.names
    col = LAYOUTS.index(detect_layout(names))

    def shape(k):
        if k not in names:
            raise CheckpointError(f"cannot infer the DiT config: key {k!r} missing")
        return tuple(view.shape(k))

    pe = shape("patch_embedding.weight")
    dim, in_ch, patch = pe[0], pe[1], tuple(pe[2:])
    t1 = shape(GLOBAL_LINEARS[0][1 + col] + ".weight")
    x1 = shape(GLOBAL_LINEARS[3][1 + col] + ".weight")
    po = shape(GLOBAL_LINEARS[5][1 + col] + ".weight")
    ffn = shape(f"blocks.0.{BLOCK_LINEARS[8][1 + col]}.weight")
    layers = 1 + max(int(k.split(".")[1]) for k in names if k.startswith("blocks."))
    cross_norm = f"blocks.0.{BLOCK_TENSORS[4][1 + col]}" in names
    kw = dict(dim=dim, num_layers=layers, num_heads=max(1, dim // 128), ffn_dim=ffn[0], in_channels=in_ch,
              out_channels=po[0] // int(np.prod(patch)), text_dim=x1[1], freq_dim=t1[1], patch_size=patch,
              cross_attn_norm=cross_norm)
    kw.update(overrides)
    return WanConfig(**kw)


def _stripped(src) -> RenamedCheckpoint:
    """The checkpoint with its ``dit.`` / ``model.diffusion_model.`` prefixes stripped."""
    return RenamedCheckpoint(open_checkpoint(src), strip_prefix)


def _model_params(state) -> dict[str, nnx.Variable]:
    """Flat {path: Variable} of the base (non-LoRA) parameters."""
    return {p: v for p, v in _flat_params(state).items() if not isinstance(v, LoRAParam)}


def check_coverage(ckpt, cfg: WanConfig, layout: str | None = None, *, model_state=None) -> dict[str, tuple]:
    """Checks that the checkpoint and a ``cfg`` model match exactly; returns
    {checkpoint key (as stored): (Entry, stored key)} -- stored keys may carry a prefix.

    Raises CheckpointError listing missing, unexpected and mis-shaped keys."""
    view = _stripped(ckpt)
    stored = view.names
    layout = layout or detect_layout(stored)
    table = key_table(cfg, layout)
    if model_state is None:
        model_state = nnx.state(nnx.eval_shape(lambda: WanTransformer3D(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    params = _model_params(model_state)
    mapped = {e.path for e in table.values()}
    unmapped = sorted(set(params) - mapped)
    if unmapped:
        raise CheckpointError(f"model parameters with no checkpoint mapping: {unmapped}")
    dangling = sorted(mapped - set(params))
    if dangling:
        raise CheckpointError(f"mapping names parameters the model does not have: {dangling}")

    missing = sorted(set(table) - set(stored))
    unexpected = sorted(set(stored) - set(table))
    bad_shape = []
    for k, e in table.items():
        if k not in stored:
            continue
        our = tuple(params[e.path].get_value().shape)
        if e.layer is not None:
            our = our[1:]
        want = _torch_shape(our, e.transform, cfg)
        got = tuple(view.shape(k))
        if got != want:
            bad_shape.append(f"{stored[k]!r}: checkpoint {got}, model expects {want}")
    msgs = []
    if missing:
        msgs.append(f"{len(missing)} missing key(s) ({layout} layout): {missing[:20]}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        msgs.append(f"{len(unexpected)} unexpected key(s): {[stored[k] for k in unexpected[:20]]}"
                    + (" ..." if len(unexpected) > 20 else ""))
    if bad_shape:
        msgs.append(f"{len(bad_shape)} mis-shaped key(s): " + "; ".join(bad_shape[:20]))
    if msgs:
        raise CheckpointError("DiT checkpoint does not fit the model: " + " | ".join(msgs))
    return {k: (table[k], stored[k]) for k in table}


# ----------------------------------------------------------------------------- loading


def load_dit(src, config: WanConfig | None = None, dtype=None, mesh=None, *, rules=DEFAULT_RULES,
             layout: str | None = None, lora: WanLoRAConfig | None = None, lora_seed: int = 0,
             **config_overrides) -> WanTransformer3D:
    """Builds a ``WanTransformer3D`` from a checkpoint without materializing a random init.

    src: a diffusers model directory (config.json + safetensors), a safetensors file or
    directory, a ``Checkpoint``, or an in-memory {key: array} dict, in either key layout
    (``dit.`` / ``model.diffusion_model.`` prefixes are stripped).
    config: defaults to the directory's config.json, else it is inferred from tensor shapes.
    dtype: parameter and compute dtype (the modulation tables, time MLP and norms stay fp32).
    mesh: place each parameter directly with the sharding of its logical axes (``rules``).
    lora: also add (freshly initialized) LoRA adapters.
    """
    ckpt = open_checkpoint(src)
    if config is None:
        cfg_path = os.path.join(os.fspath(src), "config.json") if isinstance(src, (str, os.PathLike)) else None
        if cfg_path and os.path.isfile(cfg_path):
            config = WanConfig.from_diffusers_config(cfg_path)
        else:
            config = infer_config(ckpt)
    if dtype is not None:
        name = jnp.dtype(resolve_dtype(dtype)).name
        config_overrides = {"dtype": name, "param_dtype": name, **config_overrides}
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)

    abstract = nnx.eval_shape(lambda: WanTransformer3D(config, rngs=nnx.Rngs(lora_seed), lora=lora))
    view = _stripped(ckpt)
    layout = layout or detect_layout(view.keys())
    check_coverage(ckpt, config, layout, model_state=nnx.state(abstract, nnx.Param))  # names stored keys
    return load_into(abstract, view, load_rules(layout), TRANSFORMS, mesh=mesh, axis_rules=rules,
                     fill_unloaded=lora_init_fill(lora_seed), stacked_prefixes=STACKED)


# ----------------------------------------------------------------------------- export


def iter_dit_tensors(model: WanTransformer3D, layout: str = "diffusers", dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(key, torch-layout numpy array) for every checkpoint tensor, one at a time (stacked
    parameters per layer); LoRA adapters are merged (``model`` is not changed)."""
    cfg = model.cfg
    table = key_table(cfg, layout).values()
    keys = {(e.path, e.layer): e.key for e in table}   # LoRA adapters have none: not exported
    transform_of = {e.path: e.transform for e in table}
    cast = (lambda a: a) if dtype is None else (lambda a: a.astype(resolve_dtype(dtype)))
    transforms = {name: (lambda a, name=name: cast(_to_torch(a, name, cfg))) for name in TRANSFORMS}
    return export_tensors(merge_lora_copy(model), lambda path, layer: keys.get((path, layer)), transforms,
                          STACKED, transform_of.__getitem__)


def export_dit_diffusers(model: WanTransformer3D, out_dir: str, *, dtype=None,
                         max_shard_bytes: int = 5 * 1024 ** 3) -> str:
    """Writes ``model`` as a diffusers ``WanTransformer3DModel`` directory (config.json +
    diffusion_pytorch_model[-0000i-of-0000n].safetensors [+ index]); returns out_dir."""
    save_sharded(iter_dit_tensors(model, "diffusers", dtype), out_dir, max_shard_bytes=max_shard_bytes,
                 name="diffusion_pytorch_model")
    cfg = model.cfg.to_diffusers_config()
    cfg["_diffusers_version"] = diffusers_version()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


def diffusers_version() -> str:
    """The installed diffusers' version for the ``_diffusers_version`` field of a written diffusers
    config (0.33.0 when diffusers is not installed: it is optional at run time)."""
    try:
        from importlib.metadata import version
        return version("diffusers")
    except Exception:  # noqa: BLE001 - diffusers is optional at runtime
        return "0.33.0"
