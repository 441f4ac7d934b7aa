"""Prompt -> Wan text embeddings with the UMT5 encoder, as diffusers'
``WanPipeline._get_t5_prompt_embeds``:

1. each prompt is cleaned (``prompt_clean``: ``ftfy.fix_text`` when ftfy is installed, HTML
   unescaped twice, whitespace runs collapsed to one space, stripped);
2. tokenized with ``padding="max_length"``, ``truncation=True``, special tokens (UMT5 appends
   ``</s>``), ``max_length`` (Wan: 512);
3. encoded with the attention mask; ``seq_len = attention_mask.sum()``;
4. each row keeps its FIRST ``seq_len`` positions, the rest (up to ``max_length``) are zeros.

The encoder may be run on fewer positions than ``max_length`` (``bucket=True``, the default):
with right padding and a key-padding mask, a real token's output does not depend on how many
padding positions follow (UMT5 has only relative positions), so the batch is encoded at the
smallest power of two (>= 16) covering its longest prompt and zero-padded to ``max_length``
afterwards. With any other padding layout the full ``max_length`` is encoded.
"""
from __future__ import annotations

import html
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .umt5 import UMT5Encoder

DEFAULT_MAX_LENGTH = 512


def basic_clean(text: str) -> str:
    try:
        import ftfy  # optional, as in diffusers
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def whitespace_clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def prompt_clean(text: str) -> str:
    """diffusers ``pipelines.wan.pipeline_wan.prompt_clean``."""
    return whitespace_clean(basic_clean(text))


def load_tokenizer(path: str):
    """The UMT5 tokenizer (google/umt5-xxl, SentencePiece) from a local directory: a tokenizer
    directory, or a diffusers Wan pipeline directory (its ``tokenizer/``). Never downloads."""
    from transformers import AutoTokenizer

    candidates = [path, os.path.join(path, "tokenizer")]
    tok_dir = next((c for c in candidates if os.path.isdir(c) and any(
        os.path.isfile(os.path.join(c, f)) for f in ("tokenizer.json", "spiece.model", "tokenizer_config.json"))),
        None)
    if tok_dir is None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer path {path} does not exist")
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json / spiece.model / tokenizer_config.json) in "
                                f"{path} or {os.path.join(path, 'tokenizer')}")
    try:
        return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... with long messages
        raise ValueError(f"could not load a tokenizer from {tok_dir}: {type(e).__name__}: {e}") from e


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH):
    """(input_ids, attention_mask), both (B, max_length) int32 numpy, as diffusers tokenizes
    (after ``prompt_clean``)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    enc = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_length,
                    truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="np")
    ids, mask = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
    if ids.shape != (len(prompts), max_length):
        raise ValueError(f"tokenizer returned shape {ids.shape}, expected {(len(prompts), max_length)}")
    return ids, mask


@nnx.jit
def _encode(encoder: UMT5Encoder, ids, mask):
    return encoder(ids, mask)


def _run_length(mask, max_length: int) -> int:
    """The bucketed encode length of a right-padded (B, L) mask (numpy, or a jax.Array, possibly
    global across processes: only replicated scalars come back to the host)."""
    lens = mask.sum(axis=1)
    is_prefix = bool(((mask > 0) == (np.arange(mask.shape[1])[None, :] < lens[:, None])).all())
    if not is_prefix:
        return max_length
    n = 16
    while n < int(lens.max()):
        n *= 2
    return min(n, max_length)


def encode_prompts(encoder: UMT5Encoder, tokenizer, prompts: Sequence[str] | str,
                   max_length: int = DEFAULT_MAX_LENGTH, *, dtype=None, bucket: bool = True,
                   to_device=None) -> jax.Array:
    """(B, max_length, d) text embeddings, zero after each prompt's real length (incl. ``</s>``),
    as ``WanPipeline._get_t5_prompt_embeds``. ``dtype``: output dtype (default: the encoder's).
    ``to_device``: see ``encode_tokens``."""
    ids, mask = tokenize(tokenizer, prompts, max_length)
    return encode_tokens(encoder, ids, mask, dtype=dtype, bucket=bucket, to_device=to_device)


def encode_tokens(encoder: UMT5Encoder, input_ids, attention_mask, *, dtype=None, bucket: bool = True,
                  to_device=None):
    """As ``encode_prompts`` from already tokenized (B, max_length) ids and mask. ``to_device``:
    how the host's (ids, mask) become device arrays (default ``jnp.asarray``); multi-host training
    passes ``parallel.host_local_batch_to_global`` so each process encodes its own rows of one
    global batch (the bucketed length is then the whole batch's)."""
    ids, mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32)
    ids, mask = (jnp.asarray(ids), jnp.asarray(mask)) if to_device is None else to_device((ids, mask))
    max_length = ids.shape[1]
    seq_lens = mask.sum(axis=1)
    n = _run_length(mask, max_length) if bucket else max_length
    out = _encode(encoder, ids[:, :n], mask[:, :n])
    keep = jnp.arange(n)[None, :] < seq_lens[:, None]   # the first seq_len positions
    out = jnp.where(keep[..., None], out, jnp.zeros((), out.dtype))
    if n < max_length:
        out = jnp.pad(out, ((0, 0), (0, max_length - n), (0, 0)))
    return out if dtype is None else out.astype(dtype)


class NegativePromptCache:
    """Encodes a negative prompt once and hands out the cached (B, max_length, d) embeddings
    (broadcast over the batch; Wan reuses one negative prompt for every sample).

    diffusers' ``WanPipeline`` default negative prompt is ``""`` (the empty string, i.e. ``</s>``
    alone), which is the default here too.
    """

    def __init__(self, encoder: UMT5Encoder, tokenizer, negative_prompt: str = "",
                 max_length: int = DEFAULT_MAX_LENGTH, *, dtype=None):
        self.encoder, self.tokenizer = encoder, tokenizer
        self.negative_prompt, self.max_length, self.dtype = negative_prompt, max_length, dtype
        self._cached: jax.Array | None = None

    @property
    def embeddings(self) -> jax.Array:
        """(1, max_length, d), computed on first use."""
        if self._cached is None:
            self._cached = encode_prompts(self.encoder, self.tokenizer, [self.negative_prompt], self.max_length,
                                          dtype=self.dtype)
        return self._cached

    def get(self, batch_size: int = 1) -> jax.Array:
        """(batch_size, max_length, d) view of the cached embeddings."""
        e = self.embeddings
        return e if batch_size == 1 else jnp.broadcast_to(e, (batch_size,) + e.shape[1:])

    def clear(self):
        self._cached = None
