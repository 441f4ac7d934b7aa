"""Qwen2.5-VL in Flax NNX: ``from_pretrained(path)`` loads a local Hugging Face checkpoint.

The module and its configs live here; loading/export (``vans_jax.convert.qwen2_5_vl``) and text
generation (``vans_jax.sampling.text``) live in their layers and are re-exported lazily under their
public names."""
from ..._lazy import lazy_exports
from .config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from .modeling import LoRAConfig, Qwen2_5_VLModel, prepare_inputs

FACADE = {"vans_jax.convert.qwen2_5_vl": ("from_pretrained", "export_pretrained"),
          "vans_jax.sampling.text": ("GenerationOutput", "generate", "score_completions")}
__getattr__, _facade_dir, _facade = lazy_exports(__name__, FACADE)


def __dir__():
    return sorted(set(globals()) | set(_facade))


__all__ = ["Qwen2_5_VLConfig", "TextConfig", "VisionConfig", "Qwen2_5_VLModel", "LoRAConfig", "prepare_inputs",
           *_facade]
