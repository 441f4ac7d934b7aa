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
from typing import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from .. import parallel
from .safetensors_io import Checkpoint, CheckpointError, save_file

Rule = tuple[str, str, str]


class DictCheckpoint:
    """A {key: array} mapping (an in-memory state dict) with the Checkpoint interface."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def shape(self, key):
        return tuple(np.shape(self.tensors[key]))

    def get(self, key):
        return np.asarray(self.tensors[key])


def open_checkpoint(src):
    """A path (safetensors file or directory) -> ``Checkpoint``; a {key: array} mapping ->
    ``DictCheckpoint``; anything else (already keys()/get()/shape()) as is."""
    if isinstance(src, (str, os.PathLike)):
        return Checkpoint(os.fspath(src))
    if isinstance(src, Mapping):
        return DictCheckpoint(src)
    return src


class RenamedCheckpoint:
    """A checkpoint seen through ``rename(stored key) -> key`` (layout normalization, prefix
    stripping); ``names`` maps each new key to its stored key. Two stored keys that rename to the
    same key raise ``CheckpointError``."""

    def __init__(self, ckpt, rename: Callable[[str], str]):
        self.ckpt = ckpt
        self.names: dict[str, str] = {}
        for k in ckpt.keys():
            n = rename(k)
            if n in self.names:
                raise CheckpointError(f"checkpoint holds both {self.names[n]!r} and {k!r} (both read as {n!r})")
            self.names[n] = k

    def keys(self):
        return list(self.names)

    def get(self, k):
        return self.ckpt.get(self.names[k])

    def shape(self, k):
        return self.ckpt.shape(self.names[k])


def check_keys(ckpt, expected: dict, what: str, ignore: Callable[[str], bool] = lambda k: False, limit: int = 20):
    """Compares a checkpoint's keys with ``expected`` ({key: (..., shape)}: the shape last) and
    raises one ``CheckpointError`` naming every missing, unexpected and mis-shaped key."""
    keys = {k for k in ckpt.keys() if not ignore(k)}
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    bad = [f"{k}: checkpoint {tuple(ckpt.shape(k))}, model expects {tuple(expected[k][-1])}"
           for k in sorted(keys & set(expected)) if tuple(ckpt.shape(k)) != tuple(expected[k][-1])]
    more = lambda xs: " ..." if len(xs) > limit else ""
    msgs = []
    if missing:
        msgs.append(f"{len(missing)} missing key(s): {missing[:limit]}{more(missing)}")
    if unexpected:
        msgs.append(f"{len(unexpected)} unexpected key(s): {unexpected[:limit]}{more(unexpected)}")
    if bad:
        msgs.append(f"{len(bad)} mis-shaped key(s): " + "; ".join(bad[:limit]) + more(bad))
    if msgs:
        raise CheckpointError(f"{what} checkpoint does not fit the model: " + " | ".join(msgs))


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
              dtype=None, mesh=None, axis_rules=parallel.DEFAULT_RULES, skip: Callable[[str], bool] = lambda k: False,
              fill_unloaded: Callable[[str, tuple, jnp.dtype], np.ndarray] | None = None,
              stacked_prefixes: tuple[str, ...] = ()):
    """Fills an abstract NNX model (from ``nnx.eval_shape``) with checkpoint tensors.

    - ``skip(key)``: checkpoint keys to ignore on purpose (e.g. a tied lm_head).
    - ``fill_unloaded(path, shape, dtype)``: values for parameters no checkpoint carries (LoRA
      adapters); any other parameter left unfilled is a missing-key error.
    - ``stacked_prefixes``: paths whose parameters have a leading layer dimension.
    - ``dtype``: every parameter's dtype; None keeps each one's dtype in the abstract model.
    Returns the concrete model.
    """
    graphdef, state = nnx.split(abstract_model)
    params = _flat_params(state)
    compiled = compile_rules(rules)
    mesh = mesh or parallel.make_mesh({"data": 1}, jax.devices()[:1])

    def dtype_for(var):
        return var.get_value().dtype if dtype is None else dtype

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
        target_shape, dt = var.get_value().shape, dtype_for(var)
        if layer is not None and not 0 <= layer < target_shape[0]:
            unexpected.append(f"{key} (layer {layer}; the model has {target_shape[0]})")
            continue
        arr = transforms[transform](ckpt.get(key))
        want = target_shape[1:] if layer is not None else target_shape
        if tuple(arr.shape) != tuple(want):
            raise CheckpointError(f"checkpoint tensor {key!r} has shape {tuple(ckpt.shape(key))} "
                                  f"(-> {tuple(arr.shape)} after conversion); the model expects {tuple(want)} "
                                  f"for {path}")
        arr = np.asarray(arr).astype(dt)
        sh = sharding_for(var)
        if layer is None:
            if path in filled:
                raise CheckpointError(f"two checkpoint keys map to {path} (second: {key!r})")
            values[path] = parallel.device_put_global(arr, sh)
            filled[path] = {None}
        else:
            if path not in values:
                values[path] = jax.jit(lambda: jnp.zeros(target_shape, dt), out_shardings=sh)()
                filled[path] = set()
            if layer in filled[path]:
                raise CheckpointError(f"two checkpoint keys map to {path}[{layer}] (second: {key!r})")
            values[path] = _set_layer(values[path], jnp.asarray(arr), layer)
            filled[path].add(layer)
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected key(s) in checkpoint, e.g. {unexpected[:5]}")
    missing = []
    for path, var in params.items():
        shape, dt = var.get_value().shape, dtype_for(var)
        if path in filled:
            if path.startswith(stacked_prefixes) and len(filled[path]) != shape[0]:
                gone = sorted(set(range(shape[0])) - filled[path])
                missing.append(f"{path} (layers {gone[:8]})")
            continue
        if fill_unloaded is not None:
            value = fill_unloaded(path, shape, dt)
            if value is not None:
                values[path] = parallel.device_put_global(np.asarray(value).astype(dt), sharding_for(var))
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
    """Writes ``{name}.safetensors`` (one shard) or ``{name}-0000k-of-0000n.safetensors`` + index,
    replacing any such files already in ``out_dir``."""
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
    stale = re.compile(re.escape(name) + r"(-\d+-of-\d+)?\.safetensors(\.index\.json)?")
    for f in os.listdir(out_dir):
        if stale.fullmatch(f):
            os.remove(os.path.join(out_dir, f))
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
