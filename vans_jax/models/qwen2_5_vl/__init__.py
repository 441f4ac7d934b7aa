"""Qwen2.5-VL in Flax NNX: ``from_pretrained(path)`` loads a local Hugging Face checkpoint."""
from .config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from .generation import GenerationOutput, generate, score_completions
from .modeling import LoRAConfig, Qwen2_5_VLModel, prepare_inputs


def from_pretrained(path, dtype="float32", mesh=None, **kwargs) -> Qwen2_5_VLModel:
    """Loads a local Hugging Face Qwen2.5-VL directory; see ``vans_jax.convert.qwen2_5_vl``."""
    from ...convert.qwen2_5_vl import from_pretrained as _load

    return _load(path, dtype=dtype, mesh=mesh, **kwargs)


def export_pretrained(model, out_dir, **kwargs):
    """Writes a Hugging Face directory (LoRA merged) that transformers loads."""
    from ...convert.qwen2_5_vl import export_pretrained as _export

    return _export(model, out_dir, **kwargs)


__all__ = ["Qwen2_5_VLConfig", "TextConfig", "VisionConfig", "Qwen2_5_VLModel", "LoRAConfig", "prepare_inputs",
           "generate", "score_completions", "GenerationOutput", "from_pretrained", "export_pretrained"]
