"""Experiment configs as code: a Python file whose ``get_config()`` returns an
``ml_collections.ConfigDict``, plus command-line overrides ``--config.a.b=value``."""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os

import ml_collections

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def resolve_config_path(path: str) -> str:
    """A config path as given, or a bare name (``tiny``) looked up in the repo's ``configs/``."""
    if os.path.isfile(path):
        return path
    candidate = os.path.join(REPO_CONFIGS, path if path.endswith(".py") else path + ".py")
    if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(f"config file {path!r} not found (also looked in {REPO_CONFIGS})")


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    path = resolve_config_path(path)
    spec = importlib.util.spec_from_file_location(f"_vans_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config()")
    cfg = module.get_config()
    apply_overrides(cfg, overrides)
    return cfg


def _parse_value(text: str, current):
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, bool) and isinstance(value, str):
        low = value.lower()
        if low in ("true", "false"):
            return low == "true"
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    return value


class UnknownConfigKey(KeyError):
    """An override names a field the config does not have (the message suggests the nearest one)."""

    def __str__(self):
        return str(self.args[0])


def _dotted_keys(node, prefix: str = "") -> list[str]:
    out = []
    for k in node.keys():
        out.append(prefix + k)
        if isinstance(node[k], ml_collections.ConfigDict):
            out += _dotted_keys(node[k], prefix + k + ".")
    return out


def _unknown(cfg, key: str, missing: str) -> UnknownConfigKey:
    near = difflib.get_close_matches(key, _dotted_keys(cfg), n=1, cutoff=0.6)
    hint = f"; did you mean --config.{near[0]}?" if near else ""
    return UnknownConfigKey(f"config has no field {key!r}{f' (no {missing!r})' if missing != key else ''}{hint}")


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """Applies ``--config.a.b=value`` (or ``a.b=value``) strings. An unknown key is an
    ``UnknownConfigKey`` (a ``KeyError``) suggesting the nearest known one; a value that does not fit
    the field's type a one-line ``ValueError`` naming the key, the value and the type expected."""
    for item in overrides:
        item = item[len("--config."):] if item.startswith("--config.") else item
        if "=" not in item:
            raise ValueError(f"config override {item!r} must look like --config.a.b=value")
        key, text = item.split("=", 1)
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                raise _unknown(cfg, key, p)
            node = node[p]
        if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
            raise _unknown(cfg, key, key)
        current = node[parts[-1]]
        value = _parse_value(text, current)
        try:
            with cfg.unlocked():
                node[parts[-1]] = value
        except TypeError:
            raise ValueError(f"--config.{key}={text}: expected {type(current).__name__} (the field holds "
                             f"{current!r}), got {value!r} ({type(value).__name__})") from None
    return cfg
