"""The embedded synthetic VNEP world's tiny VANS models: where they live and how they are built.

The shipped models sit in ``data/models/tiny_world/`` in the real checkpoint layouts:
``vlm/`` (a Hugging Face Qwen2.5-VL directory with its tokenizer), ``vdm/`` (a diffusers Wan
directory: transformer, vae, text_encoder, tokenizer, scheduler), ``clip/`` (a Hugging Face CLIP
directory) and ``defaults.json`` (the generation settings that fit the world: frame size, frame
count, fps, sampler steps, ...). ``VANS_TINY_WORLD`` overrides the location.
"""
from __future__ import annotations

import json
import os

ENV = "VANS_TINY_WORLD"
_REPO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data", "models",
                          "tiny_world")


def tiny_world_dir() -> str:
    return os.environ.get(ENV) or _REPO_DATA


def tiny_world_paths(root: str | None = None) -> dict[str, str]:
    root = root or tiny_world_dir()
    return {k: os.path.join(root, k) for k in ("vlm", "vdm", "clip")} | {"defaults": os.path.join(root, "defaults.json")}


def load_defaults(root: str | None = None) -> dict:
    """The shipped generation settings; a clear error when the models are not there."""
    p = tiny_world_paths(root)
    missing = [k for k in ("vlm", "vdm", "clip", "defaults") if not os.path.exists(p[k])]
    if missing:
        raise FileNotFoundError(
            f"the tiny synthetic-world models are missing under {root or tiny_world_dir()} ({', '.join(missing)}); "
            f"build them with `python -m tools.tiny_world.build` or point {ENV} at a copy")
    with open(p["defaults"]) as f:
        return json.load(f)
