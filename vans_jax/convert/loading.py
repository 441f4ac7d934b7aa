"""Generic streaming loader: checkpoint tensors -> (sharded) device arrays of an NNX model.

A family supplies a rule table ``[(regex on the checkpoint key, our path template, transform)]``.
The regex may capture ``i`` (layer index, for parameters stacked over layers), ``w`` (a torch
Linear's ``weight``/``bias``, which become ``kernel``/``bias``) and any other named groups used
in the path template. The model is built abstractly (no allocation); each
parameter is then created on its devices, with its sharding from the logical-axis rules, and
filled tensor by tensor, so host memory stays near one tensor.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import parallel
from .safetensors_io import Checkpoint, CheckpointError, save_file

Rule = tuple[str, str, str]


def compile_rules(rules: Iterable[Rule]):
    return [(re.compile(pattern + r"\Z"), target, transform) for pattern, target, transform in rules]


def match_key(rules, key: str):
    """(our path, layer index or None, transform) for a checkpoint key, or None if unmapped."""
    for pattern, target, transform in rules:
        m = pattern.match(key)
        if m:
            groups = m.groupdict()
            layer = groups.pop("i", None)
            if "w" in groups:  # torch Linear "weight" is our "kernel"
                groups["w"] = {"weight": "kernel"}.get(groups["w"], groups["w"])
            return target.format(**groups), (None if layer is None else int(layer)), transform
    return None


def _flat_params(state) -> dict[str, nnx.Variable]:
    out = {}
    for path, var in nnx.to_flat_state(state):
        out[".".join(str(p) for p in path)] = var
    return out


def load_into(abstract_model: nnx.Module, ckpt: Checkpoint, rules, transforms: dict[str, Callable], *,
              dtype, mesh=None, axis_rules=parallel.DEFAULT_RULES, skip: Callable[[str], bool] = lambda k: False,
              fill_unloaded: Callable[[str, tuple, jnp.dtype], np.ndarray] | None = None,
              stacked_prefixes: tuple[str, ...] = ()):
    """Fills an abstract NNX model (from ``nnx.eval_shape``) with checkpoint tensors.

    - ``skip(key)``: checkpoint keys to ignore on purpose (e.g. a tied lm_head).
    - ``fill_unloaded(path, shape, dtype)``: values for parameters no checkpoint carries (LoRA
      adapters); any other parameter left unfilled is a missing-key error.
    - ``stacked_prefixes``: paths whose parameters have a leading layer dimension.
    Returns the concrete model.
    """
    graphdef, state = nnx.split(abstract_model)
    params = _flat_params(state)
    compiled = compile_rules(rules)
    mesh = mesh or parallel.make_mesh({"data": 1}, jax.devices()[:1])

    def sharding_for(var):
        shape = var.get_value().shape
        return NamedSharding(mesh, parallel.logical_to_spec(parallel.variable_axes(var), axis_rules, mesh, shape))

    values: dict[str, jax.Array] = {}
    filled: dict[str, set] = {}
    unexpected = []
    for key in ckpt.keys():
        if skip(key):
            continue
        hit = match_key(compiled, key)
        if hit is None or hit[0] not in params:
            unexpected.append(key)
            continue
        path, layer, transform = hit
        var = params[path]
        target_shape = var.get_value().shape
        arr = transforms[transform](ckpt.get(key))
        want = target_shape[1:] if layer is not None else target_shape
        if tuple(arr.shape) != tuple(want):
            raise CheckpointError(f"checkpoint tensor {key!r} has shape {tuple(ckpt.shape(key))} "
                                  f"(-> {tuple(arr.shape)} after conversion); the model expects {tuple(want)} "
                                  f"for {path}")
        arr = np.asarray(arr).astype(dtype)
        sh = sharding_for(var)
        if layer is None:
            if path in filled:
                raise CheckpointError(f"two checkpoint keys map to {path} (second: {key!r})")
            values[path] = jax.device_put(arr, sh)
            filled[path] = {None}
        else:
            n = target_shape[0]
            if not 0 <= layer < n:
                raise CheckpointError(f"checkpoint key {key!r} names layer {layer}, the model has {n}")
            if path not in values:
                values[path] = jax.jit(lambda: jnp.zeros(target_shape, dtype), out_shardings=sh)()
                filled[path] = set()
            if layer in filled[path]:
                raise CheckpointError(f"two checkpoint keys map to {path}[{layer}] (second: {key!r})")
            values[path] = _set_layer(values[path], jnp.asarray(arr), layer)
            filled[path].add(layer)
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected checkpoint key(s), e.g. {unexpected[:5]}")
    missing = []
    for path, var in params.items():
        shape = var.get_value().shape
        if path in filled:
            if path.startswith(stacked_prefixes) and len(filled[path]) != shape[0]:
                gone = sorted(set(range(shape[0])) - filled[path])
                missing.append(f"{path} (layers {gone[:8]})")
            continue
        if fill_unloaded is not None:
            value = fill_unloaded(path, shape, dtype)
            if value is not None:
                values[path] = jax.device_put(np.asarray(value).astype(dtype), sharding_for(var))
                continue
        missing.append(path)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} parameter(s): {missing[:8]}")
    for path, var in params.items():
        var.set_value(values[path])
    return nnx.merge(graphdef, state)


# Writes one layer into a stacked parameter in place (the old buffer is donated).
_set_layer = jax.jit(lambda big, small, i: jax.lax.dynamic_update_index_in_dim(big, small.astype(big.dtype), i, 0),
                     donate_argnums=0)


def export_tensors(model: nnx.Module, rules_out: Callable[[str, int | None], str | None],
                   transforms_out: dict[str, Callable], stacked_prefixes: tuple[str, ...],
                   out_transform: Callable[[str], str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (checkpoint key, host array) one tensor at a time (stacked params per layer)."""
    _, state = nnx.split(model)
    for path, var in _flat_params(state).items():
        value = var.get_value()
        if path.startswith(stacked_prefixes):
            for i in range(value.shape[0]):
                key = rules_out(path, i)
                if key is not None:
                    yield key, transforms_out[out_transform(path)](np.asarray(jax.device_get(value[i])))
        else:
            key = rules_out(path, None)
            if key is not None:
                yield key, transforms_out[out_transform(path)](np.asarray(jax.device_get(value)))


def save_sharded(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str, *, max_shard_bytes: int = 2 << 30,
                 name: str = "model"):
    """Writes ``{name}.safetensors`` (one shard) or ``{name}-0000k-of-0000n.safetensors`` + index."""
    os.makedirs(out_dir, exist_ok=True)
    shards, current, size = [], {}, 0
    for key, arr in tensors:
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(_write_temp_shard(current, out_dir, len(shards)))
            current, size = {}, 0
        current[key] = arr
        size += arr.nbytes
    if current or not shards:
        shards.append(_write_temp_shard(current, out_dir, len(shards)))
    n = len(shards)
    if n == 1:
        os.replace(shards[0][0], os.path.join(out_dir, f"{name}.safetensors"))
        return
    weight_map, total = {}, 0
    for k, (tmp, keys, nbytes) in enumerate(shards):
        fname = f"{name}-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, os.path.join(out_dir, fname))
        weight_map.update({key: fname for key in keys})
        total += nbytes
    with open(os.path.join(out_dir, f"{name}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _write_temp_shard(tensors, out_dir, k):
    path = os.path.join(out_dir, f".shard{k}.safetensors.part")
    save_file(tensors, path)
    return path, list(tensors), sum(a.nbytes for a in tensors.values())
