"""Text generation and completion scoring for Qwen2.5-VL.

``generate``: one jitted program = prefill over the (left-padded) prompt into a preallocated KV
cache, then a ``lax.while_loop`` decode (no recompilation per token, no host round-trip per
token). ``num_return_sequences`` samples G continuations per prompt from ONE prefill (the cache
is repeated). Returns tokens and the per-token log-probs of the sampled tokens.

Log-prob convention: ``log_softmax(logits / temperature)`` at the sampled token, i.e. the
temperature-scaled distribution before top-k/top-p truncation (as TRL / tunix GRPO); greedy
decoding reports temperature-1 log-probs. ``score_completions`` computes the same quantity for
given completions, for the GRPO ratio and KL.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vans_jax.models.qwen2_5_vl.modeling import Qwen2_5_VLModel


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    num_return_sequences: int = 1
    eos_token_id: int | tuple[int, ...] = 151645
    pad_token_id: int = 151643


@dataclasses.dataclass
class GenerationOutput:
    tokens: jax.Array     # (B*G, max_new_tokens) int32, pad after EOS
    logprobs: jax.Array   # (B*G, max_new_tokens) float32, 0 where masked
    mask: jax.Array       # (B*G, max_new_tokens) bool, True for generated tokens (EOS included)
    lengths: jax.Array    # (B*G,) int32


def left_pad(batch: dict[str, Any]) -> dict[str, Any]:
    """Moves each row's padding to the left (generation appends at the right end). Row order and
    the order of vision tokens within a row are unchanged, so vision features still match."""
    mask = np.asarray(batch["attention_mask"]).astype(bool)
    if mask[:, -1].all():
        return batch
    out = dict(batch)
    n_pad = mask.shape[1] - mask.sum(-1)
    idx = np.stack([np.roll(np.arange(mask.shape[1]), int(k)) for k in n_pad])
    rows = np.arange(mask.shape[0])[:, None]
    # position ids of pads are 1, as after get_rope_index
    for key in ("input_ids", "attention_mask"):
        out[key] = jnp.asarray(np.asarray(batch[key])[rows, idx])
    pos = np.asarray(batch["position_ids"])
    out["position_ids"] = jnp.asarray(pos[:, rows, idx])
    shifted = mask[rows, idx]
    if not shifted[:, -1].all() or not (np.diff(shifted.astype(int), axis=1) >= 0).all():
        raise ValueError("attention_mask rows must be one contiguous block of ones (left or right padding)")
    return out


def _filter_logits(logits, top_k: int, top_p: float):
    if top_k and top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep_sorted = before < top_p
        keep_sorted = keep_sorted.at[..., 0].set(True)
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def _sample(logits, rng, s: SamplingSettings):
    """logits (N, V) fp32 -> (token, log-prob of token)."""
    if s.greedy:
        tok = jnp.argmax(logits, axis=-1)
        return tok, jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], -1)[:, 0]
    scaled = logits / s.temperature
    tok = jax.random.categorical(rng, _filter_logits(scaled, s.top_k, s.top_p), axis=-1)
    return tok, jnp.take_along_axis(jax.nn.log_softmax(scaled), tok[:, None], -1)[:, 0]


def _is_eos(tok, eos):
    eos = (eos,) if isinstance(eos, int) else tuple(eos)
    return functools.reduce(jnp.logical_or, [tok == e for e in eos])


def generate_arrays(model: Qwen2_5_VLModel, batch, rng, s: SamplingSettings) -> GenerationOutput:
    """Traceable generation on a prepared, left-padded batch (see ``prepare_inputs``)."""
    ids, amask, pos = batch["input_ids"], batch["attention_mask"].astype(bool), batch["position_ids"]
    b, p = ids.shape
    n, g = s.max_new_tokens, s.num_return_sequences
    total = p + n
    hidden, (kc, vc) = model.hidden_states(ids, amask, pos, batch.get("video"), batch.get("image"),
                                           cache_len=total)
    last_logits = model.logits(hidden[:, -1])
    next_pos = jnp.max(jnp.where(amask, pos.max(0), -1), axis=-1) + 1  # (B,) rope position of token 0
    rep = lambda x, axis: jnp.repeat(x, g, axis=axis)
    kc, vc = rep(kc, 1), rep(vc, 1)
    last_logits, next_pos = rep(last_logits, 0), rep(next_pos, 0)
    key_valid = jnp.concatenate([rep(amask, 0), jnp.zeros((b * g, n), bool)], axis=1)
    rng, sub = jax.random.split(rng)
    tok0, lp0 = _sample(last_logits, sub, s)
    tokens = jnp.full((b * g, n), s.pad_token_id, jnp.int32).at[:, 0].set(tok0.astype(jnp.int32))
    logps = jnp.zeros((b * g, n), jnp.float32).at[:, 0].set(lp0)
    done = _is_eos(tok0, s.eos_token_id)
    lengths = jnp.ones((b * g,), jnp.int32)

    def cond(state):
        step, _, _, _, done, *_ = state
        return (step < n) & ~jnp.all(done)

    def body(state):
        step, tokens, logps, lengths, done, kc, vc, key_valid, rng = state
        prev = jax.lax.dynamic_index_in_dim(tokens, step - 1, axis=1, keepdims=True)  # (BG, 1)
        slot = p + step - 1
        key_valid = jax.lax.dynamic_update_slice_in_dim(key_valid, jnp.ones((b * g, 1), bool), slot, axis=1)
        x = model.embed_tokens(prev)
        positions = jnp.broadcast_to((next_pos + step - 1)[None, :, None], (3, b * g, 1))
        mask = key_valid[:, None, :] & (jnp.arange(total) <= slot)[None, None, :]
        h, (kc, vc) = model.decoder(x, positions, mask, (kc, vc), slot)
        rng, sub = jax.random.split(rng)
        tok, lp = _sample(model.logits(h[:, -1]), sub, s)
        tok = jnp.where(done, s.pad_token_id, tok).astype(jnp.int32)
        lp = jnp.where(done, 0.0, lp)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, axis=1)
        logps = jax.lax.dynamic_update_slice_in_dim(logps, lp[:, None], step, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | _is_eos(tok, s.eos_token_id)
        return step + 1, tokens, logps, lengths, done, kc, vc, key_valid, rng

    state = (jnp.int32(1), tokens, logps, lengths, done, kc, vc, key_valid, rng)
    _, tokens, logps, lengths, done, *_ = jax.lax.while_loop(cond, body, state)
    mask = jnp.arange(n)[None, :] < lengths[:, None]
    return GenerationOutput(tokens=tokens, logprobs=jnp.where(mask, logps, 0.0), mask=mask, lengths=lengths)


jax.tree_util.register_dataclass(GenerationOutput, data_fields=["tokens", "logprobs", "mask", "lengths"],
                                 meta_fields=[])


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def _generate_jit(graphdef, state, batch, rng, settings):
    return generate_arrays(nnx.merge(graphdef, state), batch, rng, settings)


def generate(model: Qwen2_5_VLModel, batch: dict, *, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, greedy: bool | None = None, num_return_sequences: int = 1,
             rng=None, eos_token_id=None, pad_token_id=None) -> GenerationOutput:
    """Samples continuations for a batch from ``prepare_inputs`` (any padding side).
    ``greedy`` defaults to True when temperature == 0."""
    cfg = model.config
    if greedy is None:
        greedy = temperature == 0
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    settings = SamplingSettings(
        max_new_tokens=int(max_new_tokens), temperature=float(temperature) if not greedy else 1.0,
        top_p=float(top_p), top_k=int(top_k), greedy=bool(greedy), num_return_sequences=int(num_return_sequences),
        eos_token_id=tuple(np.atleast_1d(cfg.eos_token_id if eos_token_id is None else eos_token_id).tolist()),
        pad_token_id=int(cfg.pad_token_id if pad_token_id is None else pad_token_id))
    batch = left_pad(batch)
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate_jit(graphdef, state, _arrays(batch), rng, settings)


def _arrays(batch):
    return {k: v for k, v in batch.items() if k != "rope_deltas"}


def completion_logprobs(model: Qwen2_5_VLModel, batch, completions, completion_mask, temperature: float = 1.0,
                        rng=None):
    """Traceable: per-token log-probs (N, C) of ``completions`` (N = B*G rows, G continuations
    per prompt, in the order ``generate`` returns) given the left-padded prompt batch.
    The vision tower and prompt embeddings are computed once per prompt."""
    ids, amask, pos = batch["input_ids"], batch["attention_mask"].astype(bool), batch["position_ids"]
    b, p = ids.shape
    nrows, c = completions.shape
    if nrows % b:
        raise ValueError(f"{nrows} completion rows are not a multiple of the {b} prompts")
    g = nrows // b
    r_vis, r_txt = (None, None) if rng is None else jax.random.split(rng)
    vid = model.vision_features(batch.get("video"), r_vis)
    img = model.vision_features(batch.get("image"), r_vis)
    x_prompt = jnp.repeat(model.embed(ids, vid, img), g, axis=0)
    x = jnp.concatenate([x_prompt, model.embed_tokens(completions)], axis=1)
    next_pos = jnp.repeat(jnp.max(jnp.where(amask, pos.max(0), -1), axis=-1) + 1, g)
    comp_pos = jnp.broadcast_to((next_pos[:, None] + jnp.arange(c))[None], (3, nrows, c))
    positions = jnp.concatenate([jnp.repeat(pos, g, axis=1), comp_pos], axis=2)
    full_mask = jnp.concatenate([jnp.repeat(amask, g, 0), completion_mask.astype(bool)], axis=1)
    h, _ = model.decoder(x, positions, full_mask, rng=r_txt)   # causal over the valid tokens
    logits = model.logits(h[:, p - 1:p + c - 1]) / temperature
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), completions[..., None].astype(jnp.int32), -1)[..., 0]
    return jnp.where(completion_mask.astype(bool), lp, 0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature"))
def _score_jit(graphdef, state, batch, completions, completion_mask, temperature):
    return completion_logprobs(nnx.merge(graphdef, state), batch, completions, completion_mask, temperature)


def score_completions(model: Qwen2_5_VLModel, batch: dict, completions, completion_mask=None,
                      temperature: float = 1.0):
    """Per-token log-probs of given completions under the model (for the policy ratio / KL)."""
    batch = left_pad(batch)
    completions = jnp.asarray(completions, jnp.int32)
    completion_mask = jnp.ones_like(completions, bool) if completion_mask is None else jnp.asarray(completion_mask)
    graphdef, state = nnx.split(model)
    return _score_jit(graphdef, state, _arrays(batch), completions, completion_mask, float(temperature))
