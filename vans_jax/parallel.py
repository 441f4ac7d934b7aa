"""Device mesh, logical-axis rules and sharding helpers.

Every parameter carries a tuple of *logical* axis names in its ``axes`` metadata
(e.g. ``("embed", "mlp")``). One rules table maps logical names to mesh axes; the
sharding of any state follows from it. Parameters stacked over layers (scanned
blocks) have one more dimension than names; that leading dimension is the logical
axis ``"layers"``, which is never sharded by default.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("lora_rank", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("patch", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("text_embed", "fsdp"),
    ("time_embed", None),
    ("modulation", None),
    ("cache_length", None),
)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh. One axis may be -1 (= all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Iterable[str | None] | None, rules=DEFAULT_RULES, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for logical axis names. With ``mesh`` and ``shape`` given, a mesh axis
    that does not divide its dimension (or is already used) is dropped, so odd sizes replicate
    instead of failing."""
    if axes is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        keep = []
        for t in targets:
            if t in used:
                continue
            if mesh is not None:
                size = mesh.shape[t]
                if size == 1:
                    continue
                if shape is not None and shape[i] % (size * int(np.prod([mesh.shape[k] for k in keep] or [1]))):
                    continue
            keep.append(t)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def variable_axes(var: nnx.Variable) -> tuple | None:
    """Logical axes of a variable, with ``layers`` prepended for scanned (stacked) params."""
    axes = var.get_metadata().get("axes")
    if axes is None:
        return None
    ndim = np.ndim(var.get_value()) if hasattr(var, "get_value") else np.ndim(var.value)
    axes = tuple(axes)
    while len(axes) < ndim:
        axes = ("layers",) + axes
    return axes


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """A pytree of NamedSharding matching ``state`` (Variables replaced by shardings)."""

    def one(v):
        if _is_var(v):
            shape = np.shape(v.get_value())
            spec = logical_to_spec(variable_axes(v), rules, mesh, shape)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=_is_var)


def shard_state(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """Places every array of ``state`` on ``mesh`` according to its logical axes."""
    shardings = state_shardings(state, mesh, rules)
    return jax.device_put(state, shardings)


def shard_module(module: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, shard_state(state, mesh, rules))


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None = None, rules=DEFAULT_RULES) -> jax.Array:
    """Activation sharding constraint by logical names; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape)))
