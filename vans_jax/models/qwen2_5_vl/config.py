"""Qwen2.5-VL configuration, mirroring the Hugging Face ``config.json``.

Both config layouts are read: the Hub's (text fields at the top level, ``rope_scaling``)
and newer transformers' (``text_config`` / ``rope_parameters``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


@dataclasses.dataclass(eq=False)  # hashable by identity: configs live in the graphdef
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 2048
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    tokens_per_second: float = 2
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(eq=False)  # hashable by identity: configs live in the graphdef
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(eq=False)  # hashable by identity: configs live in the graphdef
class Qwen2_5_VLConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    tie_word_embeddings: bool = True
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int = 151645
    pad_token_id: int = 151643
    # Runtime options (not part of the checkpoint).
    dtype: str = "float32"
    attn_impl: str = "xla"          # layers.attention: "xla", "cudnn", "chunked", "splash" or "auto"
    attn_block_size: int | None = None  # splash block (queries and keys); None: layers.SPLASH_BLOCK
    remat: str = "none"
    hf_config: dict[str, Any] | None = None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **runtime) -> "Qwen2_5_VLConfig":
        mt = d.get("model_type")
        if mt not in ("qwen2_5_vl",):
            raise ValueError(f"config model_type is {mt!r}; expected 'qwen2_5_vl' (a Qwen2.5-VL checkpoint)")
        t = dict(d)
        t.update(d.get("text_config") or {})
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        section = rope.get("mrope_section", [16, 24, 24])
        text = TextConfig(
            vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
            num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", t.get("rope_theta", 1000000.0)),
            mrope_section=tuple(section), max_position_embeddings=t.get("max_position_embeddings", 128000),
            hidden_act=t.get("hidden_act", "silu"))
        if text.hidden_act != "silu":
            raise ValueError(f"text hidden_act {text.hidden_act!r} is not supported (Qwen2.5-VL uses 'silu')")
        if 2 * sum(text.mrope_section) != text.head_dim:
            raise ValueError(f"mrope_section {text.mrope_section} must sum to head_dim/2 = {text.head_dim // 2}")
        v = d.get("vision_config") or {}
        vrope = v.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=v.get("depth", 32), hidden_size=v.get("hidden_size", 1280), num_heads=v.get("num_heads", 16),
            intermediate_size=v.get("intermediate_size", 3420),
            out_hidden_size=v.get("out_hidden_size", text.hidden_size), patch_size=v.get("patch_size", 14),
            temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge_size=v.get("spatial_merge_size", 2),
            window_size=v.get("window_size", 112),
            fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            in_channels=v.get("in_channels", 3), tokens_per_second=v.get("tokens_per_second", 2),
            rope_theta=vrope.get("rope_theta", 10000.0), hidden_act=v.get("hidden_act", "silu"))
        if vision.hidden_act != "silu":
            raise ValueError(f"vision hidden_act {vision.hidden_act!r} is not supported (Qwen2.5-VL uses 'silu')")
        tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", True))
        eos = t.get("eos_token_id", d.get("eos_token_id", 151645))
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        pad = t.get("pad_token_id", d.get("pad_token_id"))
        return cls(vision=vision, text=text, tie_word_embeddings=bool(tie),
                   image_token_id=d.get("image_token_id", 151655), video_token_id=d.get("video_token_id", 151656),
                   vision_start_token_id=d.get("vision_start_token_id", 151652),
                   vision_end_token_id=d.get("vision_end_token_id", 151653),
                   eos_token_id=eos, pad_token_id=pad if pad is not None else 151643, hf_config=dict(d), **runtime)

    @classmethod
    def from_pretrained(cls, path: str, **runtime) -> "Qwen2_5_VLConfig":
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json in {path}")
        with open(file) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: invalid JSON ({e})") from None
        return cls.from_hf_dict(d, **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers reads as this model."""
        if self.hf_config is not None:
            d = json.loads(json.dumps(self.hf_config))
        else:
            d = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl"}
        t, v = self.text, self.vision
        d["text_config"] = {
            **(d.get("text_config") or {}),
            "model_type": "qwen2_5_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": t.hidden_act, "eos_token_id": self.eos_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
        }
        d["vision_config"] = {
            **(d.get("vision_config") or {}),
            "model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
            "num_heads": v.num_heads, "intermediate_size": v.intermediate_size,
            "out_hidden_size": v.out_hidden_size, "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "in_channels": v.in_channels, "tokens_per_second": v.tokens_per_second, "hidden_act": v.hidden_act,
        }
        for k in ("rope_scaling", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "rope_theta"):
            d.pop(k, None)
        d.update(model_type="qwen2_5_vl", tie_word_embeddings=self.tie_word_embeddings,
                 image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                 vision_start_token_id=self.vision_start_token_id, vision_end_token_id=self.vision_end_token_id)
        return d
