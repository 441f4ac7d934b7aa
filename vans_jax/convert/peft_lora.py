"""PEFT LoRA adapters for the Qwen2.5-VL VLM: read a PEFT adapter directory and merge it into a
loaded model; write our own adapters as one.

A PEFT adapter directory (what ``peft.PeftModel.save_pretrained`` writes)::

    adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 32, "use_rslora": false,
                                "rank_pattern": {}, "alpha_pattern": {}, "target_modules": ..., ...}
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight  (r, in)
                               base_model.model.<module>.lora_B.weight  (out, r)

``<module>`` is the module name inside ``Qwen2_5_VLForConditionalGeneration``, in either
transformers layout (``model.layers.N.self_attn.q_proj`` / ``visual.blocks.N.attn.qkv``, or the
newer ``model.language_model.layers.N...`` / ``model.visual.blocks.N...``). The update of a
module is ``W += scale * B @ A`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``), ``r`` and ``alpha`` taken per module from ``rank_pattern`` / ``alpha_pattern``
when a pattern matches (PEFT's rule: the pattern matches the module name or a dotted suffix of it).

Supported: plain LoRA on any Linear the checkpoint loader maps (language model and vision tower).
Rejected with a clear error: DoRA, LoRA biases, ``fan_in_fan_out``, embedding adapters, extra
(``modules_to_save``) tensors, pickled ``adapter_model.bin`` (convert it to safetensors).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.layers import Linear, LoRAParam
from .loading import compile_rules, match_key
from .qwen2_5_vl import RULES, _export_key, normalize_key
from .safetensors_io import CheckpointError, SafetensorsFile, save_file

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PeftAdapter", "is_peft_adapter", "read_peft_adapter",
           "merge_peft_adapter", "export_peft_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight\Z")


@dataclasses.dataclass
class PeftAdapter:
    """A read adapter: ``modules[name] = (A (r, in), B (out, r), scale)``, names as stored
    (without ``base_model.model.``)."""
    path: str
    config: dict
    modules: dict

    @property
    def num_modules(self) -> int:
        return len(self.modules)


def is_peft_adapter(path) -> bool:
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: a pattern applies when it matches the module name or a dotted
    suffix of it; the first matching pattern wins."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return default


def read_peft_adapter(path) -> PeftAdapter:
    """Reads and checks a PEFT LoRA adapter directory (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"LoRA adapter directory {path} does not exist")
    cfg_file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory: no {ADAPTER_CONFIG} "
                                f"(for a merged model, pass the exported Hugging Face directory as the VLM instead)")
    try:
        with open(cfg_file) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        hint = (" (only adapter_model.bin found: re-save it with safe_serialization=True)"
                if os.path.isfile(os.path.join(path, "adapter_model.bin")) else "")
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS}{hint}")
    problems = []
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type={cfg.get('peft_type')!r} (only LORA is supported)")
    if cfg.get("use_dora"):
        problems.append("use_dora=true (DoRA is not supported)")
    if cfg.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=true (not used by Qwen2.5-VL's Linear layers)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r} (only 'none' is supported)")
    if problems:
        raise ValueError(f"{cfg_file}: unsupported adapter: " + "; ".join(problems))
    if "r" not in cfg or "lora_alpha" not in cfg:
        raise ValueError(f"{cfg_file}: missing 'r' or 'lora_alpha'")

    ckpt = SafetensorsFile(weights)
    parts: dict[str, dict] = {}
    bad = []
    for key in ckpt.keys():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _KEY_RE.match(name)
        if m is None:
            bad.append(key)
            continue
        parts.setdefault(m["module"], {})[m["ab"]] = key
    if bad:
        raise ValueError(f"{weights}: tensors that are not plain LoRA A/B weights (modules_to_save, biases, "
                         f"embedding adapters or DoRA magnitudes are not supported): {bad[:8]}")
    if not parts:
        raise ValueError(f"{weights}: no LoRA tensors")
    modules = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights}: module {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a = np.asarray(ckpt.get(ab["A"]), np.float32)
        b = np.asarray(ckpt.get(ab["B"]), np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{weights}: module {module}: lora_A {a.shape} and lora_B {b.shape} do not form "
                             f"a rank-r pair (expected (r, in) and (out, r))")
        rank = int(_pattern_value(cfg.get("rank_pattern"), module, cfg["r"]))
        if a.shape[0] != rank:
            raise ValueError(f"{weights}: module {module} has rank {a.shape[0]} but the config says r={rank}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        modules[module] = (a, b, scale)
    return PeftAdapter(path=path, config=cfg, modules=modules)


@jax.jit
def _add_delta(kernel, delta):
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


@jax.jit
def _add_delta_layer(kernel, delta, layer):
    updated = (kernel[layer].astype(jnp.float32) + delta).astype(kernel.dtype)
    return jax.lax.dynamic_update_index_in_dim(kernel, updated, layer, 0)


def merge_peft_adapter(model: nnx.Module, adapter) -> list[str]:
    """Folds a PEFT adapter (a path or a ``PeftAdapter``) into a loaded Qwen2.5-VL model, in place
    (``kernel += scale * A^T B^T`` in fp32, cast back to the kernel's dtype). Returns the merged
    module names. Every adapter module must map onto a Linear of the model, else ``CheckpointError``
    naming it (nothing is changed then)."""
    adapter = adapter if isinstance(adapter, PeftAdapter) else read_peft_adapter(adapter)
    rules = compile_rules(RULES)
    params = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    plan, unknown = [], []
    for module, (a, b, scale) in adapter.modules.items():
        hit = match_key(rules, normalize_key(module) + ".weight")
        if hit is None or hit[2] != "linear" or not hit[0].endswith(".kernel") or hit[0] not in params:
            unknown.append(module)
            continue
        path, layer, _ = hit
        shape = params[path].get_value().shape
        want = shape[1:] if layer is not None else shape
        if layer is not None and not 0 <= layer < shape[0]:
            unknown.append(f"{module} (layer {layer}; the model has {shape[0]})")
            continue
        if (a.shape[1], b.shape[0]) != tuple(want):
            raise CheckpointError(f"{adapter.path}: module {module} adapts a ({b.shape[0]}, {a.shape[1]}) weight; "
                                  f"the model's {path} is (out, in) = ({want[1]}, {want[0]})")
        plan.append((module, path, layer, a, b, scale))
    if unknown:
        raise CheckpointError(f"{adapter.path}: {len(unknown)} adapter module(s) match no Linear layer of this "
                              f"Qwen2.5-VL model: {unknown[:8]}")
    for module, path, layer, a, b, scale in plan:
        var = params[path]
        delta = jnp.asarray(scale * (a.T @ b.T), jnp.float32)        # (in, out), our kernel layout
        if layer is None:
            var.set_value(_add_delta(var.get_value(), delta))
        else:
            var.set_value(_add_delta_layer(var.get_value(), delta, jnp.int32(layer)))
    return [p[0] for p in plan]


def _new_layout(hub_key: str) -> str:
    """Hub-layout module name -> the module name in transformers >= 4.52 (``model.language_model.*``,
    ``model.visual.*``), which is what PEFT sees on a current transformers."""
    if hub_key.startswith("model."):
        return "model.language_model." + hub_key[len("model."):]
    if hub_key.startswith("visual."):
        return "model." + hub_key
    return hub_key


def export_peft_adapter(model: nnx.Module, out_dir, *, base_model_name_or_path: str = "") -> str:
    """Writes the model's LoRA adapters (``LoRAConfig``) as a PEFT adapter directory that
    ``read_peft_adapter`` / ``merge_peft_adapter`` (and ``peft.PeftModel.from_pretrained`` on a
    transformers with the ``model.language_model.*`` layout) load. Returns ``out_dir``."""
    lora = nnx.to_flat_state(nnx.state(model, LoRAParam))
    if not lora:
        raise ValueError("export_peft_adapter: the model has no LoRA adapters (load it with lora=LoRAConfig(...))")
    modules = {}
    for p, var in lora:
        *owner, leaf = map(str, p)
        modules.setdefault(".".join(owner), {})[leaf] = np.asarray(jax.device_get(var.get_value()), np.float32)
    tensors, ranks, alphas, dropouts, names = {}, Counter(), Counter(), Counter(), []
    for owner, ab in modules.items():
        node = model
        for part in owner.split("."):
            node = getattr(node, part)
        if not isinstance(node, Linear):
            raise TypeError(f"export_peft_adapter: LoRA parameters under {owner} do not belong to a Linear")
        a, b = ab["lora_a"], ab["lora_b"]
        stacked = a.ndim == 3
        for layer in range(a.shape[0]) if stacked else [None]:
            hub = _export_key(owner + ".kernel", layer)
            name = _new_layout(hub[: -len(".weight")])
            la, lb = (a[layer], b[layer]) if stacked else (a, b)
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(la.T)
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(lb.T)
            names.append(name)
        rank = a.shape[-1]
        ranks[rank] += 1
        alphas[float(node.lora_scale) * rank] += 1
        dropouts[float(node.lora_dropout)] += 1
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"export_peft_adapter: adapters with different ranks {dict(ranks)} / alphas {dict(alphas)} "
                         f"are not supported")
    # a regex (PEFT full-matches a string target), so that e.g. the language model's "gate_proj"
    # does not also catch the vision tower's
    groups: dict[str, set] = {}
    for n in names:
        parent, leaf = n.rsplit(".", 1)
        pattern = r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in parent.split("."))
        groups.setdefault(pattern, set()).add(leaf)
    target = "|".join(f"{pattern}\\.(?:{'|'.join(sorted(leaves))})" for pattern, leaves in sorted(groups.items()))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": int(next(iter(ranks))), "lora_alpha": float(next(iter(alphas))),
        "lora_dropout": float(next(iter(dropouts))), "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "target_modules": target, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
    }
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ADAPTER_WEIGHTS + ".part")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, ADAPTER_WEIGHTS))
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir
