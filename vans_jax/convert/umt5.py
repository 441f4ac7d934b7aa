"""UMT5 encoder weights (transformers ``UMT5EncoderModel`` layout) -> ``UMT5Encoder``.

Accepted directories: a transformers ``save_pretrained`` directory (config.json + safetensors,
single or sharded), or a diffusers Wan pipeline directory, whose ``text_encoder/`` holds a
``UMT5EncoderModel``. Keys:

* ``shared.weight`` and/or ``encoder.embed_tokens.weight`` (tied: the same tensor; when both are
  present they are compared on a sample of rows and the duplicate is skipped);
* ``encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight``,
  ``encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight`` (one table per block),
  ``encoder.block.N.layer.0.layer_norm.weight``;
* ``encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight`` (``wi`` when not gated),
  ``encoder.block.N.layer.1.layer_norm.weight``;
* ``encoder.final_layer_norm.weight``.

Before anything is placed on a device the checkpoint is checked against the table both ways:
missing, unexpected and mis-shaped keys are all reported in one ``CheckpointError``.
``ignore_decoder=True`` skips ``decoder.*``/``lm_head.weight`` (to take the encoder out of a full
UMT5 checkpoint).
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from ..models.layers import resolve_dtype
from ..models.wan.umt5 import UMT5Config, UMT5Encoder, resolve_encoder_dir
from .loading import load_into
from .safetensors_io import Checkpoint, CheckpointError

EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
_B = r"encoder\.block\.(?P<i>\d+)\.layer\."
# (checkpoint key regex, our parameter path, transform)
RULES = [
    (r"(?:shared|encoder\.embed_tokens)\.weight", "embed_tokens.embedding", "id"),
    (_B + r"0\.SelfAttention\.(?P<p>q|k|v|o)\.weight", "layers.{p}.kernel", "linear"),
    (_B + r"0\.SelfAttention\.relative_attention_bias\.weight", "layers.relative_attention_bias", "id"),
    (_B + r"0\.layer_norm\.weight", "layers.attn_norm.weight", "id"),
    (_B + r"1\.DenseReluDense\.(?P<p>wi_0|wi_1|wo)\.weight", "layers.{p}.kernel", "linear"),
    (_B + r"1\.DenseReluDense\.wi\.weight", "layers.wi_0.kernel", "linear"),
    (_B + r"1\.layer_norm\.weight", "layers.ffn_norm.weight", "id"),
    (r"encoder\.final_layer_norm\.weight", "final_norm.weight", "id"),
]
STACKED = ("layers.",)
TRANSFORMS = {"id": lambda a: a, "linear": lambda a: a.T}  # torch Linear (out, in) -> (in, out)


def expected_keys(cfg: UMT5Config) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> torch shape for every tensor of a ``cfg``-shaped UMT5EncoderModel
    (the embedding under ``shared.weight``)."""
    d, inner, ff, h = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.num_heads
    out = {"shared.weight": (cfg.vocab_size, d), "encoder.final_layer_norm.weight": (d,)}
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer."
        for n in "qkv":
            out[f"{p}0.SelfAttention.{n}.weight"] = (inner, d)
        out[f"{p}0.SelfAttention.o.weight"] = (d, inner)
        out[f"{p}0.SelfAttention.relative_attention_bias.weight"] = (cfg.relative_attention_num_buckets, h)
        out[f"{p}0.layer_norm.weight"] = (d,)
        if cfg.is_gated_act:
            out[f"{p}1.DenseReluDense.wi_0.weight"] = (ff, d)
            out[f"{p}1.DenseReluDense.wi_1.weight"] = (ff, d)
        else:
            out[f"{p}1.DenseReluDense.wi.weight"] = (ff, d)
        out[f"{p}1.DenseReluDense.wo.weight"] = (d, ff)
        out[f"{p}1.layer_norm.weight"] = (d,)
    return out


def _is_decoder_key(k: str) -> bool:
    return k.startswith("decoder.") or k == "lm_head.weight"


def check_checkpoint(ckpt, cfg: UMT5Config, *, ignore_decoder: bool = False) -> set[str]:
    """Checks ``ckpt`` against ``cfg`` both ways; returns the checkpoint keys to skip (a tied
    duplicate of the embedding, decoder keys with ``ignore_decoder``). Raises ``CheckpointError``
    naming every missing, unexpected and mis-shaped key."""
    want = expected_keys(cfg)
    keys = list(ckpt.keys())
    present = set(keys)
    skip: set[str] = set()
    if ignore_decoder:
        skip |= {k for k in keys if _is_decoder_key(k)}
    problems = []
    emb = [k for k in EMBED_KEYS if k in present]
    if len(emb) == 2:
        a, b = (ckpt.shape(k) for k in emb)
        if a != b:
            problems.append(f"tied embedding keys differ in shape: shared.weight {a}, encoder.embed_tokens.weight {b}")
        else:
            rows = np.unique(np.linspace(0, a[0] - 1, num=min(64, a[0])).astype(np.int64))
            if not np.array_equal(np.asarray(ckpt.get(emb[0])[rows]), np.asarray(ckpt.get(emb[1])[rows])):
                problems.append("shared.weight and encoder.embed_tokens.weight hold different values; UMT5 ties "
                                "them (an untied input embedding is not supported)")
        skip.add("encoder.embed_tokens.weight")
    elif emb == ["encoder.embed_tokens.weight"]:  # only the encoder's copy: use it as shared
        want["encoder.embed_tokens.weight"] = want.pop("shared.weight")
    missing = [k for k in want if k not in present]
    if "shared.weight" in missing:
        missing[missing.index("shared.weight")] = "shared.weight (or encoder.embed_tokens.weight)"
    unexpected = [k for k in keys if k not in want and k not in skip]
    misshaped = [f"{k}: checkpoint {tuple(ckpt.shape(k))}, model expects {want[k]}"
                 for k in keys if k in want and tuple(ckpt.shape(k)) != tuple(want[k])]
    if missing:
        problems.append(f"{len(missing)} missing key(s): {missing[:8]}")
    if unexpected:
        hint = " (a full UMT5 checkpoint? pass ignore_decoder=True)" if any(map(_is_decoder_key, unexpected)) else ""
        problems.append(f"{len(unexpected)} unexpected key(s){hint}: {unexpected[:8]}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped key(s): {misshaped[:8]}")
    if problems:
        raise CheckpointError(f"UMT5 checkpoint does not fit config (d_model={cfg.d_model}, "
                              f"num_layers={cfg.num_layers}, num_heads={cfg.num_heads}, d_kv={cfg.d_kv}, "
                              f"d_ff={cfg.d_ff}, vocab_size={cfg.vocab_size}): " + "; ".join(problems))
    return skip


def from_pretrained(path: str, dtype="float32", mesh=None, *, attn_impl: str = "xla", remat: str = "none",
                    ignore_decoder: bool = False, axis_rules=None, seed: int = 0) -> UMT5Encoder:
    """Loads a local UMT5 encoder (transformers directory or diffusers Wan pipeline directory)
    into ``UMT5Encoder``, streaming one tensor at a time onto its devices.

    dtype: parameter dtype ("float32" / "bfloat16"); mesh: a ``jax.sharding.Mesh`` (parameters
    sharded by their logical axes, see ``vans_jax.parallel``)."""
    enc_dir = resolve_encoder_dir(path)
    jdtype = resolve_dtype(dtype)
    cfg = UMT5Config.from_pretrained(enc_dir, attn_impl=attn_impl, remat=remat)
    ckpt = Checkpoint(enc_dir)
    skip = check_checkpoint(ckpt, cfg, ignore_decoder=ignore_decoder)
    abstract = nnx.eval_shape(lambda: UMT5Encoder(cfg, dtype=jdtype, rngs=nnx.Rngs(seed)))
    extra = {} if axis_rules is None else {"axis_rules": axis_rules}
    return load_into(abstract, ckpt, RULES, TRANSFORMS, dtype=jdtype, mesh=mesh, skip=lambda k: k in skip,
                     stacked_prefixes=STACKED, **extra)
