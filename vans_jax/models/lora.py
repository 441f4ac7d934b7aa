"""LoRA utilities shared by every model: which parameters train, the LoRA-disabled reference
policy, and merging adapters into the base weights.

Adapters live inside ``layers.Linear`` as ``LoRAParam`` variables (A random, B zero), so a model
with fresh adapters computes exactly the base model.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .layers import Linear, LoRAParam

__all__ = ["LoRAParam", "lora_state", "without_lora", "merge_lora", "merge_lora_copy", "has_lora"]


def lora_state(model: nnx.Module) -> nnx.State:
    """The trainable (LoRA) part of a model's state."""
    return nnx.state(model, LoRAParam)


def has_lora(model: nnx.Module) -> bool:
    return len(jax.tree.leaves(lora_state(model))) > 0


def without_lora(state: nnx.State) -> nnx.State:
    """The same state with every LoRA B matrix zeroed: the model then computes the base model
    exactly (the GRPO reference policy), from the same graphdef and inside the same jit."""

    def zero(path, x):
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return jnp.zeros_like(x) if "lora_b" in names else x

    return jax.tree_util.tree_map_with_path(zero, state)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its base kernel (W += scale * A @ B, stacked layers included)
    and removes the adapters, in place."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and node.lora_a is not None:
            node.merge_lora()
    return model


def merge_lora_copy(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every LoRA adapter merged into its base kernel (``model`` is
    not changed)."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    return merge_lora(copy)


def lora_init_fill(seed: int = 0):
    """``fill_unloaded`` for ``convert.loading.load_into``: fresh adapters for a loaded model with
    PEFT's init (as ``Linear.add_lora``): A ~ U(+-1/sqrt(in)), B = 0, stacked layers included;
    deterministic per parameter path. None for any other parameter."""
    key = jax.random.key(seed)

    def fill(path, shape, dtype):
        if path.endswith(".lora_b"):
            return np.zeros(shape, np.float32)
        if not path.endswith(".lora_a"):
            return None
        bound = 1.0 / np.sqrt(shape[-2])
        k = jax.random.fold_in(key, zlib.crc32(path.encode()) % (2 ** 31))
        return np.asarray(jax.random.uniform(k, shape, jnp.float32, -bound, bound))

    return fill
