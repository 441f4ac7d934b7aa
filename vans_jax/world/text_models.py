"""The synthetic world's VDM text side and the assembly of its diffusers Wan directory.

* ``build_umt5_tokenizer``: a T5/UMT5 Unigram tokenizer (no SentencePiece model file) whose
  pieces are the words and punctuation of the world's texts (``▁word``), plus single characters
  as a fallback, saved as ``tokenizer.json`` + ``tokenizer_config.json`` (``T5Tokenizer``). Every
  world text is tokenized losslessly, one token per word.
* ``build_umt5_encoder``: a tiny ``UMT5Encoder`` with random weights (the text encoder is frozen in
  VANS) whose token embeddings are N(0, 1) (as transformers' T5 init) so that every token's
  output is dominated by the token itself: different captions give clearly different embedding
  sequences. Saved in the transformers ``UMT5EncoderModel`` layout.
* ``write_vdm_dir``: a complete diffusers Wan pipeline directory (``model_index.json``,
  ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that
  ``models.wan.pipeline.from_pretrained`` and ``diffusers.WanPipeline`` load.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import string
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vans_jax.convert.safetensors_io import save_file
from vans_jax.convert.umt5 import expected_keys
from vans_jax.models.wan.umt5 import UMT5Config, UMT5Encoder

PAD, EOS, UNK, SPACE = "<pad>", "</s>", "<unk>", "▁"
WORD_SCORE, CHAR_SCORE, SPACE_SCORE = -1.0, -10.0, -5.0
_WORDS = re.compile(r"[^\W\d_]+|\d|[^\w\s]")


# --------------------------------------------------------------------------------------------
# tokenizer


def world_pieces(texts: Sequence[str]) -> list[str]:
    """The tokenizer's word pieces for ``texts``: ``▁word`` for every word (case kept, as T5) and
    every punctuation mark both alone and with ``▁`` (sorted)."""
    pieces = set()
    for t in texts:
        for chunk in t.split():
            for j, m in enumerate(_WORDS.finditer(chunk)):
                tok = m.group(0)
                pieces.add(SPACE + tok if j == 0 else tok)
                if not tok.isalpha():
                    pieces.add(tok)
    return sorted(pieces)


def build_umt5_tokenizer(out_dir: str, texts: Sequence[str]):
    """Writes the world's T5 tokenizer to ``out_dir`` and returns it (loaded back from disk).

    Vocabulary: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 (T5's ids), ``▁``, the pieces of
    ``world_pieces(texts)``, then the ASCII letters, digits and punctuation (alone and after ``▁``)
    not already there, with lower scores: any text tokenizes, world texts one piece per word."""
    from transformers import T5Tokenizer

    from vans_jax.models.wan.text import load_tokenizer

    words = world_pieces(texts)
    if not words:
        raise ValueError("build_umt5_tokenizer: no words in the given texts")
    chars = [c for c in string.ascii_letters + string.digits + string.punctuation]
    vocab = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), (SPACE, SPACE_SCORE)]
    seen = {p for p, _ in vocab}
    for p in words:
        if p not in seen:
            vocab.append((p, WORD_SCORE))
            seen.add(p)
    for c in chars:
        for p in (c, SPACE + c):
            if p not in seen:
                vocab.append((p, CHAR_SCORE))
                seen.add(p)
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return load_tokenizer(out_dir)


# --------------------------------------------------------------------------------------------
# encoder


def tiny_umt5_config(vocab_size: int, d_model: int = 64, *, num_layers: int = 2, num_heads: int = 4,
                     d_ff: int | None = None) -> UMT5Config:
    if d_model % num_heads:
        raise ValueError(f"d_model {d_model} is not a multiple of num_heads {num_heads}")
    return UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff or 2 * d_model,
                      num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu")


def build_umt5_encoder(config: UMT5Config, seed: int = 0) -> UMT5Encoder:
    """A random ``UMT5Encoder`` with N(0, 1) token embeddings (transformers' T5 init for ``shared``)."""
    enc = UMT5Encoder(config, rngs=nnx.Rngs(seed))
    emb = jax.random.normal(jax.random.key(seed + 1), enc.embed_tokens.embedding.shape, jnp.float32)
    enc.embed_tokens.embedding.set_value(emb)
    return enc


def umt5_state_dict(encoder: UMT5Encoder) -> dict[str, np.ndarray]:
    """transformers ``UMT5EncoderModel`` state dict (the embedding as ``shared.weight``, the tied
    ``encoder.embed_tokens.weight`` left out as transformers saves it)."""
    cfg = encoder.config
    get = lambda v: np.asarray(jax.device_get(v[...]), np.float32)
    out = {"shared.weight": get(encoder.embed_tokens.embedding),
           "encoder.final_layer_norm.weight": get(encoder.final_norm.weight)}
    layers = encoder.layers
    stacked = {"0.SelfAttention.q.weight": (layers.q.kernel, True), "0.SelfAttention.k.weight": (layers.k.kernel, True),
               "0.SelfAttention.v.weight": (layers.v.kernel, True), "0.SelfAttention.o.weight": (layers.o.kernel, True),
               "0.SelfAttention.relative_attention_bias.weight": (layers.relative_attention_bias, False),
               "0.layer_norm.weight": (layers.attn_norm.weight, False),
               "1.DenseReluDense.wi_0.weight" if cfg.is_gated_act else "1.DenseReluDense.wi.weight":
                   (layers.wi_0.kernel, True),
               "1.DenseReluDense.wo.weight": (layers.wo.kernel, True),
               "1.layer_norm.weight": (layers.ffn_norm.weight, False)}
    if cfg.is_gated_act:
        stacked["1.DenseReluDense.wi_1.weight"] = (layers.wi_1.kernel, True)
    for suffix, (var, transpose) in stacked.items():
        a = get(var)
        for i in range(cfg.num_layers):
            out[f"encoder.block.{i}.layer.{suffix}"] = np.ascontiguousarray(a[i].T if transpose else a[i])
    want = expected_keys(cfg)
    if set(want) != set(out) or any(tuple(out[k].shape) != tuple(s) for k, s in want.items()):
        raise AssertionError("UMT5 export does not match convert.umt5.expected_keys")
    return out


def save_umt5_encoder(encoder: UMT5Encoder, out_dir: str) -> str:
    """``config.json`` + ``model.safetensors`` in the transformers ``UMT5EncoderModel`` layout."""
    os.makedirs(out_dir, exist_ok=True)
    save_file(umt5_state_dict(encoder), os.path.join(out_dir, "model.safetensors"))
    cfg = encoder.config.to_hf_dict() | {"dropout_rate": 0.0, "tie_word_embeddings": False,
                                         "decoder_start_token_id": 0, "is_encoder_decoder": True,
                                         "scalable_attention": True, "dtype": "float32"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


def build_text_side(vdm_dir: str, text_dim: int, *, texts: Sequence[str] | None = None, seed: int = 0,
                    num_layers: int = 2, num_heads: int = 4) -> dict:
    """Writes ``<vdm_dir>/tokenizer`` (``build_umt5_tokenizer`` on ``texts``, default
    ``data.synthetic.world_texts()``) and ``<vdm_dir>/text_encoder`` (a random tiny UMT5 with
    ``d_model = text_dim``, the DiT's ``text_dim``). Returns facts about them, including
    ``min_caption_distance``: over all pairs of distinct world captions, the smallest max-over-
    positions L2 distance between their (RMS-normalized, so ~sqrt(d) per token) embedding
    sequences -- how clearly the encoder separates the captions."""
    from vans_jax.data.synthetic import world_texts
    from vans_jax.models.wan.text import encode_prompts

    texts = list(world_texts() if texts is None else texts)
    tok = build_umt5_tokenizer(os.path.join(vdm_dir, "tokenizer"), texts)
    cfg = tiny_umt5_config(len(tok), text_dim, num_layers=num_layers, num_heads=num_heads)
    enc = build_umt5_encoder(cfg, seed)
    save_umt5_encoder(enc, os.path.join(vdm_dir, "text_encoder"))
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    return {"vocab_size": len(tok), "max_tokens": max(lengths), "d_model": cfg.d_model,
            "num_params": int(sum(x.size for x in jax.tree.leaves(nnx.state(enc, nnx.Param)))),
            **caption_separation(enc, tok, texts)}


def caption_separation(encoder: UMT5Encoder, tokenizer, texts: Sequence[str], max_length: int = 64) -> dict:
    """How different the encoder's embeddings of distinct texts are: for every pair, the max over
    positions of the L2 distance between the two (B, L, d) embedding sequences (zero after each
    text's end, as the pipeline feeds the DiT); the minimum and mean over pairs, and the typical
    per-token norm for scale. (Mean-pooled embeddings would not do: "the red ball and the blue
    ball ..." and "the blue ball and the red ball ..." hold the same words.)"""
    from vans_jax.models.wan.text import encode_prompts

    texts = sorted(set(texts))
    e = np.asarray(encode_prompts(encoder, tokenizer, texts, max_length), np.float64)       # (N, L, d)
    norms = np.linalg.norm(e, axis=-1)
    mins, means = [], []
    for i in range(len(texts) - 1):
        d = np.linalg.norm(e[i + 1:] - e[i], axis=-1).max(-1)                              # (N - i - 1,)
        mins.append(d.min())
        means.append(d.mean())
    return {"num_texts": len(texts), "token_norm": float(norms[norms > 0].mean()),
            "min_caption_distance": float(min(mins)) if mins else float("nan"),
            "mean_caption_distance": float(np.mean(means)) if means else float("nan")}


# --------------------------------------------------------------------------------------------
# scheduler, model index, the whole directory


def scheduler_config(flow_shift: float = 3.0) -> dict:
    """diffusers ``UniPCMultistepScheduler`` config of Wan2.1 (flow prediction, flow sigmas), with
    ``flow_shift``: what ``sampling.flow.sample(mode="unipc")`` computes."""
    return {"_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear",
            "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
            "final_sigmas_type": "zero", "flow_shift": float(flow_shift), "lower_order_final": True,
            "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
            "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
            "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
            "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False,
            "use_flow_sigmas": True, "use_karras_sigmas": False}


MODEL_INDEX = {"_class_name": "WanPipeline", "boundary_ratio": None, "expand_timesteps": False,
               "scheduler": ["diffusers", "UniPCMultistepScheduler"],
               "text_encoder": ["transformers", "UMT5EncoderModel"],
               "tokenizer": ["transformers", "T5Tokenizer"],
               "transformer": ["diffusers", "WanTransformer3DModel"],
               "transformer_2": [None, None],
               "vae": ["diffusers", "AutoencoderKLWan"]}


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version
        return version("diffusers")
    except Exception:  # noqa: BLE001 - diffusers is optional at run time
        return "0.33.0"


def write_vdm_dir(out_dir: str, dit, *, vae_dir: str | None = None, flow_shift: float = 3.0, seed: int = 0,
                  texts: Sequence[str] | None = None, rebuild_text: bool = False) -> dict:
    """Assembles the diffusers Wan directory ``out_dir`` and returns what it wrote.

    dit: the transformer -- a ``WanTransformer3D`` (exported with
    ``convert.wan_dit.export_dit_diffusers``; LoRA merged), a ``WanConfig`` or a diffusers config
    dict (a random one, seeded by ``seed``: e.g. the starting point of SFT), or the path of a
    diffusers transformer directory (copied).
    vae_dir: a diffusers ``AutoencoderKLWan`` directory (``vae_train.train_vae``'s output), copied to
    ``out_dir/vae`` unless it is that already; without it ``out_dir/vae`` must exist.
    The text side (``build_text_side`` with ``d_model`` = the DiT's ``text_dim``) is built when
    ``text_encoder/`` or ``tokenizer/`` is missing, or always with ``rebuild_text``; an existing
    encoder whose ``d_model`` differs from the DiT's ``text_dim`` is an error.
    ``scheduler/`` gets ``scheduler_config(flow_shift)``; ``model_index.json`` names the classes.
    """
    from vans_jax.convert.wan_dit import export_dit_diffusers
    from vans_jax.models.wan.dit import WanConfig, WanTransformer3D

    # check everything first: nothing is written when the parts do not fit together
    tdir = os.path.join(out_dir, "transformer")
    if isinstance(dit, (str, os.PathLike)):
        src = os.fspath(dit)
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise FileNotFoundError(f"write_vdm_dir: {src} is not a diffusers transformer directory (no config.json)")
        dit_cfg = WanConfig.from_diffusers_config(src)
    else:
        if isinstance(dit, dict):
            dit = WanConfig.from_diffusers_config(dit) if "num_attention_heads" in dit else WanConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in dit.items()})
        if not isinstance(dit, (WanConfig, WanTransformer3D)):
            raise TypeError(f"write_vdm_dir: dit must be a WanTransformer3D, WanConfig, config dict or a "
                            f"directory, got {type(dit).__name__}")
        dit_cfg = dit if isinstance(dit, WanConfig) else dit.cfg
    vdir = os.path.join(out_dir, "vae")
    vae_src = vdir if vae_dir is None else os.fspath(vae_dir)
    if not os.path.isfile(os.path.join(vae_src, "config.json")):
        raise FileNotFoundError(f"write_vdm_dir: no VAE in {vae_src} (no config.json); train one "
                                f"(vae_train.train_vae(world, '{vdir}')) or pass vae_dir=")
    with open(os.path.join(vae_src, "config.json")) as f:
        z_dim = json.load(f).get("z_dim", 16)
    if z_dim != dit_cfg.in_channels:
        raise ValueError(f"write_vdm_dir: the VAE has z_dim={z_dim}, the DiT takes {dit_cfg.in_channels} channels")
    have_text = all(os.path.isfile(os.path.join(out_dir, s, f)) for s, f in
                    (("text_encoder", "config.json"), ("tokenizer", "tokenizer_config.json")))
    if have_text and not rebuild_text:
        d_model = UMT5Config.from_pretrained(os.path.join(out_dir, "text_encoder")).d_model
        if d_model != dit_cfg.text_dim:
            raise ValueError(f"write_vdm_dir: the text encoder has d_model={d_model}, the DiT's text_dim is "
                             f"{dit_cfg.text_dim}; pass rebuild_text=True")

    os.makedirs(out_dir, exist_ok=True)
    if isinstance(dit, (str, os.PathLike)):
        if os.path.abspath(dit) != os.path.abspath(tdir):
            shutil.rmtree(tdir, ignore_errors=True)
            shutil.copytree(dit, tdir)
    else:
        if isinstance(dit, WanConfig):
            dit = WanTransformer3D(dit, rngs=nnx.Rngs(seed))
        shutil.rmtree(tdir, ignore_errors=True)
        export_dit_diffusers(dit, tdir)
    if os.path.abspath(vae_src) != os.path.abspath(vdir):
        shutil.rmtree(vdir, ignore_errors=True)
        shutil.copytree(vae_src, vdir)
    text = None
    if rebuild_text or not have_text:
        text = build_text_side(out_dir, dit_cfg.text_dim, texts=texts, seed=seed)

    sdir = os.path.join(out_dir, "scheduler")
    os.makedirs(sdir, exist_ok=True)
    with open(os.path.join(sdir, "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config(flow_shift) | {"_diffusers_version": _diffusers_version()}, f, indent=2)
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(MODEL_INDEX | {"_diffusers_version": _diffusers_version()}, f, indent=2)
    size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(out_dir) for n in ns)
    return {"dir": out_dir, "text": text, "bytes": int(size)}
