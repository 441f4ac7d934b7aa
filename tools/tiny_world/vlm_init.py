"""A fresh (random) Qwen2.5-VL directory with a tokenizer trained on given texts: the starting point
of the tiny world's VLM SFT, and of tests."""
from __future__ import annotations

from typing import Iterable

from flax import nnx

from vans_jax.models import qwen2_5_vl as qwen
from vans_jax.models.qwen2_5_vl import tokenizer as qtok
from vans_jax.rl.format import TAGS


def init_vlm_dir(out_dir: str, model: dict, texts: Iterable[str], *, vocab_size: int = 512, seed: int = 0,
                 dtype: str = "float32") -> dict:
    """Writes ``out_dir`` (tokenizer files + config.json + model.safetensors) for a random Qwen2.5-VL
    with the architecture in ``model`` (an HF config dict without the token ids, which come from the
    tokenizer). Returns the tokenizer ids."""
    ids = qtok.build_tiny_tokenizer(out_dir, vocab_texts=list(texts), vocab_size=vocab_size, added_tokens=TAGS)
    d = dict(model)
    d.update(vocab_size=ids["vocab_size"], image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
             vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
             eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    cfg = qwen.Qwen2_5_VLConfig.from_hf_dict(d, dtype=dtype)
    qwen.export_pretrained(qwen.Qwen2_5_VLModel(cfg, rngs=nnx.Rngs(seed)), out_dir)
    return ids
