"""The synthetic world's tiny CLIP: a CLIP BPE tokenizer learned from the world's texts and a
``models.clip.CLIPModel`` trained contrastively on the world's frames, so that the CLIP rewards
(CLIP-V: frame-i-vs-frame-i cosine between a generated and the ground-truth video; CLIP-T /
CLIPScore: frame-vs-caption cosine) mean something on this world.

Objective (one step, ``batch_size`` training target clips, ``frames_per_clip`` frames of each,
every frame degraded at random: blur, noise, brightness/contrast jitter, what an imperfect
generator and the codec produce):

* clip <-> caption: cross-entropy of each clip's embedding -- the mean of its L2-normalized frame
  embeddings, exactly what the video -> caption retrieval and CLIP-T / CLIPScore use -- against
  every distinct training caption (the world has 180; the model's learned ``logit_scale``), so the
  confusable captions (up / down, grow / shrink, colours) are negatives at every step;
* frame <-> caption (``frame_loss_weight``): the same for every frame alone;
* frame <-> degraded frame: symmetric InfoNCE between a clean frame of each clip and its degraded
  view, the other clips' frames as negatives, with its own learned temperature (a training-only
  scalar). This is what makes CLIP-V sensitive to position, size and colour, not only to the
  caption's words.

Preprocessing is exactly the one the rewards use (``models.clip.preprocess_frames``: resize to
``image_size``, OpenAI mean / std), so the trained model is used as is by ``models.clip.encode_frames``.

The output directory is a Hugging Face CLIP directory (config.json, model.safetensors, the
tokenizer's vocab.json / merges.txt / tokenizer.json / tokenizer_config.json, a
preprocessor_config.json) that ``convert.clip.from_pretrained`` + ``models.clip.load_tokenizer`` and
``transformers.CLIPModel`` / ``transformers.CLIPTokenizer`` load.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vans_jax.convert.safetensors_io import save_file
from vans_jax.convert import clip as clip_ckpt
from vans_jax.models import clip as C
from vans_jax.rl.rewards import clip_score, clip_video_similarity
from tools.tiny_world.clips import WorldClips, load_world_clips

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# transformers.CLIPTokenizer's pre-tokenizer split (kept words, numbers and punctuation runs)
CLIP_SPLIT_REGEX = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclasses.dataclass(frozen=True)
class TinyCLIPSpec:
    """The tiny CLIP's architecture (a ViT-style image tower on the world's 64x64 frames)."""
    image_size: int = 64
    patch_size: int = 16          # 4x4 patches: 4x cheaper than 8 and faster to learn (measured)
    vision_width: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_text_len: int = 32
    projection_dim: int = 64
    hidden_act: str = "quick_gelu"

    def config(self, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> C.CLIPConfig:
        return C.CLIPConfig(
            text=C.CLIPTextConfig(vocab_size=vocab_size, hidden_size=self.text_width,
                                  intermediate_size=4 * self.text_width, num_hidden_layers=self.text_layers,
                                  num_attention_heads=self.text_heads, max_position_embeddings=self.max_text_len,
                                  hidden_act=self.hidden_act, pad_token_id=pad_id, bos_token_id=bos_id,
                                  eos_token_id=eos_id),
            vision=C.CLIPVisionConfig(hidden_size=self.vision_width, intermediate_size=4 * self.vision_width,
                                      num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                                      image_size=self.image_size, patch_size=self.patch_size,
                                      hidden_act=self.hidden_act),
            projection_dim=self.projection_dim)


# --------------------------------------------------------------------------------------------
# tokenizer


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte -> printable character table, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = {b: b for b in bs}, 0
    for b in range(256):
        if b not in cs:
            cs[b] = 256 + n
            n += 1
    return [chr(cs[b]) for b in range(256)]


def build_clip_tokenizer(out_dir: str, texts: Sequence[str], *, max_length: int = 32):
    """Learns CLIP byte-level BPE merges (``</w>`` word ends, lower-cased, CLIP's pre-tokenizer) on
    ``texts`` until every word is one token, and writes a Hugging Face CLIP tokenizer to ``out_dir``:
    ``vocab.json`` + ``merges.txt`` (the original CLIP format) and ``tokenizer.json`` +
    ``tokenizer_config.json`` (``transformers.CLIPTokenizer``). The vocabulary is laid out as
    OpenAI's: the 256 byte symbols, the same with ``</w>``, the merges, then ``<|startoftext|>`` and
    ``<|endoftext|>`` (the largest id; also the padding token). Returns the loaded tokenizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("build_clip_tokenizer: no texts to learn the vocabulary from")
    trainer_tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    trainer_tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_REGEX), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=1 << 16, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix=END_OF_WORD, special_tokens=[])
    trainer_tok.train_from_iterator(texts, trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trainer_tok.to_str())["model"]["merges"]]
    symbols = _bytes_to_unicode()
    vocab_list = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(set(vocab_list)) != len(vocab_list):
        raise AssertionError("duplicate entries in the learned CLIP vocabulary")
    vocab = {t: i for i, t in enumerate(vocab_list)}

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tok.save_pretrained(out_dir)
    return C.load_tokenizer(out_dir)


# --------------------------------------------------------------------------------------------
# export


def hf_config_dict(config: C.CLIPConfig) -> dict:
    """``config.json`` of a ``transformers.CLIPModel`` with this configuration."""
    t, v = config.text, config.vision
    text = dict(model_type="clip_text_model", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads, max_position_embeddings=t.max_position_embeddings,
                hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps, attention_dropout=0.0,
                initializer_range=0.02, initializer_factor=1.0, projection_dim=config.projection_dim,
                pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id)
    vision = dict(model_type="clip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                  num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                  hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps, attention_dropout=0.0,
                  initializer_range=0.02, initializer_factor=1.0, projection_dim=config.projection_dim)
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.projection_dim,
            "logit_scale_init_value": config.logit_scale_init_value, "initializer_factor": 1.0,
            "text_config": text, "vision_config": vision, "dtype": "float32"}


def preprocessor_config_dict(image_size: int) -> dict:
    """``preprocessor_config.json`` (``CLIPImageProcessor``) matching ``models.clip.preprocess_frames``."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(C.OPENAI_CLIP_MEAN), "image_std": list(C.OPENAI_CLIP_STD), "do_convert_rgb": True}


def save_clip(model: C.CLIPModel, out_dir: str) -> str:
    """Writes ``model``'s config.json, model.safetensors (fp32, via ``convert.clip.export_state_dict``)
    and preprocessor_config.json to ``out_dir`` (the tokenizer is written by ``build_clip_tokenizer``)."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: np.asarray(v, np.float32) for k, v in clip_ckpt.export_state_dict(model).items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(model.config), f, indent=2)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config_dict(model.config.vision.image_size), f, indent=2)
    return out_dir


# --------------------------------------------------------------------------------------------
# degradations (what an imperfect generator does to a frame)

_BLUR_1D = np.array([0.0545, 0.2442, 0.4026, 0.2442, 0.0545], np.float32)   # Gaussian, sigma = 1


def _blur(x):
    """(B, H, W, 3) -> separable 5-tap Gaussian blur (edge padding)."""
    k = jnp.asarray(_BLUR_1D)
    xp = jnp.pad(x, ((0, 0), (2, 2), (0, 0), (0, 0)), mode="edge")
    x = sum(k[i] * xp[:, i:i + x.shape[1]] for i in range(5))
    xp = jnp.pad(x, ((0, 0), (0, 0), (2, 2), (0, 0)), mode="edge")
    return sum(k[i] * xp[:, :, i:i + x.shape[2]] for i in range(5))


def degrade(key, x, strength: float = 1.0):
    """Random degradation of frames x (B, H, W, 3) in [0, 1]: blur of random strength (0-2
    passes blended), Gaussian noise (std up to 0.06), brightness/contrast jitter (+-10% / +-0.04),
    then clipped to [0, 1]. ``strength`` scales every amount."""
    b = x.shape[0]
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    u = lambda k, lo, hi: jax.random.uniform(k, (b, 1, 1, 1), minval=lo, maxval=hi)
    once = _blur(x)
    twice = _blur(once)
    a = u(k1, 0.0, 2.0 * strength)
    x = jnp.where(a < 1.0, (1 - a) * x + a * once, (2 - a) * once + (a - 1) * twice)
    x = x * u(k2, 1 - 0.1 * strength, 1 + 0.1 * strength) + u(k3, -0.04 * strength, 0.04 * strength)
    x = x + u(k4, 0.0, 0.06 * strength) * jax.random.normal(k5, x.shape)
    return jnp.clip(x, 0.0, 1.0)


def degrade_uint8(frames: np.ndarray, seed: int = 0, strength: float = 1.0) -> np.ndarray:
    """``degrade`` on uint8 frames (..., H, W, 3), returning uint8."""
    a = np.asarray(frames)
    flat = jnp.asarray(a.reshape((-1,) + a.shape[-3:]), jnp.float32) / 255.0
    out = degrade(jax.random.key(seed), flat, strength)
    return np.asarray(jnp.round(out * 255.0)).astype(np.uint8).reshape(a.shape)


def _normalize(x):
    """[0, 1] frames (B, H, W, 3) -> CLIP pixel_values (B, 3, H, W), as ``preprocess_frames``."""
    mean = jnp.asarray(C.OPENAI_CLIP_MEAN, jnp.float32)
    std = jnp.asarray(C.OPENAI_CLIP_STD, jnp.float32)
    return ((x - mean) / std).transpose(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# training


def _soft_ce(logits, targets):
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def video_caption_losses(model: C.CLIPModel, img_log_scale, video, clean, frame_index, cap_ids, cap_mask, labels):
    """The video objective: (video loss, frame loss, image loss, video top-1 accuracy) for

    * ``video`` (B, F, H, W, 3) in [0, 1]: F frames of each of B target clips (degraded views);
    * ``clean`` (B, H, W, 3): the clean frame ``frame_index`` (B,) of each clip;
    * ``cap_ids`` / ``cap_mask`` (K, L): every distinct training caption, ``labels`` (B,) each
      clip's caption index.

    video loss: cross-entropy of the clip embedding (the mean of its L2-normalized frame
    embeddings, what the retrieval and CLIP-T use) against all K captions (logit scale learned);
    frame loss: the same for every frame alone; image loss: symmetric InfoNCE between each clean
    frame and its degraded view (the other clips' frames as negatives, own learned temperature)."""
    b, f = video.shape[:2]
    size = model.config.vision.image_size
    pix = jnp.concatenate([video.reshape((b * f,) + video.shape[2:]), clean])
    if pix.shape[1] != size:
        pix = jax.image.resize(pix, (pix.shape[0], size, size, 3), "bicubic")
    img = C.l2_normalize(model.get_image_features(_normalize(pix)))
    frames, clean_f = img[:b * f].reshape(b, f, -1), img[b * f:]
    txt = C.l2_normalize(model.get_text_features(cap_ids, cap_mask))                   # (K, D)
    scale = jnp.exp(jnp.minimum(model.logit_scale[...], np.log(100.0)))
    onehot = jax.nn.one_hot(labels, txt.shape[0], dtype=jnp.float32)
    vlogits = scale * C.l2_normalize(frames.mean(1)) @ txt.T                           # (B, K)
    vloss = _soft_ce(vlogits, onehot)
    floss = _soft_ce(scale * frames @ txt.T, jnp.broadcast_to(onehot[:, None], (b, f, txt.shape[0])))
    deg = frames[jnp.arange(b), frame_index]
    il = jnp.exp(jnp.minimum(img_log_scale, np.log(100.0))) * clean_f @ deg.T          # (B, B)
    eye = jnp.eye(b, dtype=jnp.float32)
    iloss = 0.5 * (_soft_ce(il, eye) + _soft_ce(il.T, eye))
    acc = jnp.mean((vlogits.argmax(-1) == labels).astype(jnp.float32))
    k = txt.shape[0]
    sloss = _soft_ce(10.0 * txt @ txt.T, jnp.eye(k, dtype=jnp.float32))
    return vloss, floss, iloss, acc, sloss


@dataclasses.dataclass(frozen=True)
class CLIPTrainConfig:
    steps: int = 1800
    batch_size: int = 32            # clips per step
    frames_per_clip: int = 9        # target frames per clip in the clip embedding (<= the clip's)
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    frame_loss_weight: float = 0.5
    image_loss_weight: float = 1.0
    text_spread_weight: float = 1.0  # caption vs caption InfoNCE: keeps the 180 captions apart
    degrade_strength: float = 1.0


def _make_step(graphdef, tx, cfg: CLIPTrainConfig):
    def loss_fn(params, rest, img_log_scale, batch, key):
        model = nnx.merge(graphdef, params, rest)
        video = batch["video"].astype(jnp.float32) / 255.0                              # (B, F, H, W, 3)
        b, f = video.shape[:2]
        degraded = degrade(key, video.reshape((b * f,) + video.shape[2:]), cfg.degrade_strength).reshape(video.shape)
        clean = video[jnp.arange(b), batch["frame_index"]]
        vl, fl, il, acc, sl = video_caption_losses(model, img_log_scale, degraded, clean, batch["frame_index"],
                                                   batch["cap_ids"], batch["cap_mask"], batch["labels"])
        loss = vl + cfg.frame_loss_weight * fl + cfg.image_loss_weight * il + cfg.text_spread_weight * sl
        return loss, {"video_loss": vl, "frame_loss": fl, "image_loss": il, "train_top1": acc, "text_spread_loss": sl}

    def step(params, rest, img_log_scale, opt_state, batch, key):
        (loss, aux), (g, gs) = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)(
            params, rest, img_log_scale, batch, key)
        updates, opt_state = tx.update((g, gs), opt_state, (params, img_log_scale))
        params, img_log_scale = optax.apply_updates((params, img_log_scale), updates)
        return params, img_log_scale, opt_state, dict(aux, loss=loss)

    return jax.jit(step, donate_argnums=(0, 2, 3))


def resolve_train_config(train_config: CLIPTrainConfig | None = None, **overrides) -> CLIPTrainConfig:
    """``train_config``, or ``CLIPTrainConfig()`` (the recipe) with the given non-None fields
    (``steps``, ``batch_size``, ``lr``: ``train_clip``'s shortcuts) replaced; both at once is an error."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if train_config is not None:
        if given:
            raise ValueError(f"train_clip: pass either train_config or {sorted(given)}, not both")
        return train_config
    bad = sorted(set(given) - {f.name for f in dataclasses.fields(CLIPTrainConfig)})
    if bad:
        raise ValueError(f"train_clip: unknown CLIPTrainConfig fields {bad}")
    return CLIPTrainConfig(**given)


def train_clip(world_dir: str, out_dir: str, *, steps: int | None = None, seed: int = 0,
               batch_size: int | None = None, lr: float | None = None, spec: TinyCLIPSpec = TinyCLIPSpec(), train_config: CLIPTrainConfig | None = None,
               train_clips: WorldClips | None = None, eval_clips: WorldClips | None = None,
               max_train_samples: int | None = None, max_eval_samples: int | None = 200,
               tokenizer_texts: Sequence[str] | None = None, eval_untrained: bool = False,
               train_source: str = "render", log: Callable[[str], None] | None = print) -> dict:
    """Builds the tokenizer, trains the tiny CLIP on ``<world_dir>``'s train split, evaluates it on
    the eval split (``evaluate_clip``) and writes the Hugging Face CLIP directory ``out_dir``.

    The training frames are rendered from the scenes (``train_source="render"``, ~25x faster than
    decoding; the degradations cover the codec's blur) or decoded (``"video"``); the eval clips are
    the decoded mp4s, as the rewards see them. ``train_clips`` / ``eval_clips``
    (``clips.load_world_clips``) skip loading.
    ``tokenizer_texts`` defaults to ``data.synthetic.world_texts()`` (every text of the world).
    Returns the metrics: losses (first / last 10-step means), eval metrics, timings, sizes.
    """
    from vans_jax.data.synthetic import world_texts

    t0 = time.time()
    log = log or (lambda s: None)
    cfg = resolve_train_config(train_config, steps=steps, batch_size=batch_size, lr=lr)
    train = (train_clips if train_clips is not None
             else load_world_clips(world_dir, "train", max_train_samples, source=train_source))
    evalc = eval_clips if eval_clips is not None else load_world_clips(world_dir, "eval", max_eval_samples)
    t_data = time.time() - t0

    tok = build_clip_tokenizer(out_dir, world_texts() if tokenizer_texts is None else tokenizer_texts,
                               max_length=spec.max_text_len)
    eos, bos = tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(BOS)
    config = spec.config(len(tok), bos, eos, eos)
    model = C.CLIPModel(config, rngs=nnx.Rngs(seed))
    metrics: dict = {}
    if eval_untrained:
        metrics["untrained"] = evaluate_clip(model, tok, evalc, seed=seed)

    captions = sorted(set(train.captions))
    cap_index = {c: i for i, c in enumerate(captions)}
    cap_ids, cap_mask = C.tokenize(tok, captions, spec.max_text_len)
    width = int(cap_mask.sum(1).max())      # causal text tower pooled at the first EOS: padding is inert
    cap_ids, cap_mask = jnp.asarray(cap_ids[:, :width]), jnp.asarray(cap_mask[:, :width])
    sample_cap = np.asarray([cap_index[c] for c in train.captions])
    n, f = train.targets.shape[:2]
    b = min(cfg.batch_size, n)
    fpc = min(cfg.frames_per_clip, f)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    img_log_scale = jnp.asarray(np.log(10.0), jnp.float32)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(cfg.warmup_steps, max(cfg.steps - 1, 1)),
                                                  max(cfg.steps, 2), cfg.lr * 0.05)
    decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)     # no decay on norms, biases, scales
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask))
    opt_state = tx.init((params, img_log_scale))
    step_fn = _make_step(graphdef, tx, cfg)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    history = []
    t1 = time.time()
    for i in range(cfg.steps):
        idx = rng.choice(n, b, replace=False)
        fi = np.sort(np.argsort(rng.random((b, f)), axis=1)[:, :fpc], axis=1)      # fpc distinct frames per clip
        batch = {"video": jnp.asarray(train.targets[idx[:, None], fi]), "frame_index": jnp.asarray(rng.integers(0, fpc, b)),
                 "cap_ids": cap_ids, "cap_mask": cap_mask, "labels": jnp.asarray(sample_cap[idx])}
        params, img_log_scale, opt_state, m = step_fn(params, rest, img_log_scale, opt_state, batch,
                                                      jax.random.fold_in(key, i))
        history.append({k: float(v) for k, v in m.items()})
        if log and (i == 0 or (i + 1) % 50 == 0 or i + 1 == cfg.steps):
            el = time.time() - t1
            h = history[-1]
            log(f"[clip] step {i + 1}/{cfg.steps} loss {h['loss']:.3f} (video {h['video_loss']:.3f}, frame "
                f"{h['frame_loss']:.3f}, image {h['image_loss']:.3f}, text spread {h['text_spread_loss']:.3f}; train top-1 {h['train_top1']:.2f})  "
                f"{el:.0f}s, eta {el / (i + 1) * (cfg.steps - i - 1):.0f}s")
    t_train = time.time() - t1
    model = nnx.merge(graphdef, params, rest)

    save_clip(model, out_dir)
    w = max(1, min(10, len(history) // 3))     # means over the first / last min(10, steps // 3) steps
    mean = lambda k, sl: float(np.mean([h[k] for h in history[sl]])) if history else float("nan")
    ev = evaluate_clip(model, tok, evalc, seed=seed)
    conf = ev.pop("confusion")
    metrics.update({
        "loss_first": mean("loss", slice(0, w)), "loss_last": mean("loss", slice(-w, None)),
        "video_loss_first": mean("video_loss", slice(0, w)),
        "video_loss_last": mean("video_loss", slice(-w, None)),
        "frame_loss_first": mean("frame_loss", slice(0, w)),
        "frame_loss_last": mean("frame_loss", slice(-w, None)),
        "train_top1_last": mean("train_top1", slice(-w, None)),
        "image_loss_first": mean("image_loss", slice(0, w)),
        "image_loss_last": mean("image_loss", slice(-w, None)),
        "logit_scale": float(np.exp(model.logit_scale[...])),
        "eval": ev, "eval_confusion": conf,
        "steps": cfg.steps, "batch_size": b, "frames_per_clip": fpc, "train_samples": n,
        "train_config": dataclasses.asdict(cfg), "spec": dataclasses.asdict(spec),
        "num_params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "file_bytes": int(sum(os.path.getsize(os.path.join(out_dir, p)) for p in os.listdir(out_dir))),
        "seconds_data": t_data, "seconds_train": t_train, "seconds_total": time.time() - t0,
    })
    if log:
        e = metrics["eval"]
        log(f"[clip] eval: retrieval top-1 frame {e['retrieval_top1_frame']:.3f} video {e['retrieval_top1_video']:.3f} "
            f"(chance {e['retrieval_chance']:.3f}); CLIP-V self-degraded {e['clip_v_degraded']:.3f} / same caption "
            f"{e['clip_v_same_caption']:.3f} / other caption {e['clip_v_other_caption']:.3f} / static "
            f"{e['clip_v_static']:.3f}; CLIP-T match {e['clip_t_match']:.3f} / mismatch {e['clip_t_mismatch']:.3f}"
            f"  ({metrics['seconds_total']:.0f}s)")
        conf = metrics["eval_confusion"]
        log("[clip] eval video top-1 by event: " + ", ".join(f"{k} {v['top1']:.2f} (n={v['n']})"
                                                          for k, v in conf["by_event"].items())
            + f"; wrong: {conf['wrong_same_event']} same event, {conf['wrong_other_event']} other event")
    return metrics


# --------------------------------------------------------------------------------------------
# evaluation


def _partner(keys: Sequence[str], same: bool, rng: np.random.Generator) -> np.ndarray:
    """For each i, a random j != i with keys[j] == keys[i] (same=True) or != (same=False); -1 if none."""
    keys = np.asarray(keys)
    out = np.full(len(keys), -1)
    for i in range(len(keys)):
        cand = np.flatnonzero((keys == keys[i]) == same)
        cand = cand[cand != i]
        if cand.size:
            out[i] = rng.choice(cand)
    return out


def evaluate_clip(model: C.CLIPModel, tokenizer, clips: WorldClips, *, seed: int = 0, batch_size: int = 256) -> dict:
    """How well a CLIP separates the world's scenes, measured through the reward functions
    (``models.clip.encode_frames`` / ``encode_texts``, ``rl.rewards.clip_video_similarity`` /
    ``clip_score``) on ``clips`` (an eval split):

    * ``retrieval_top1_frame``: each target frame vs every distinct caption of the split, top-1 is
      its own caption; ``retrieval_top1_video``: the same with the mean of a clip's frame
      embeddings; ``retrieval_chance`` = 1 / number of distinct captions;
    * ``clip_t_match`` / ``clip_t_mismatch``: CLIPScore of a ground-truth video with its caption /
      with another sample's (different) caption;
    * CLIP-V of the ground-truth video vs: ``clip_v_degraded`` a degraded copy of itself (a near
      perfect generation), ``clip_v_same_caption`` another sample with the same caption (right
      event, other layout), ``clip_v_other_caption`` another sample with another caption,
      ``clip_v_static`` its input clip's last frame repeated (a generator that does not move);
    * ``confusion``: where the video retrieval goes wrong (``retrieval_confusion``).
    """
    rng = np.random.default_rng(seed)
    gt = clips.targets
    n, f = gt.shape[:2]
    frames = np.asarray(C.encode_frames(model, gt, batch_size=batch_size))                      # (N, F, D)
    degraded = np.asarray(C.encode_frames(model, degrade_uint8(gt, seed), batch_size=batch_size))
    static = np.repeat(np.asarray(C.encode_frames(model, clips.inputs[:, -1], batch_size=batch_size))[:, None], f, 1)
    distinct = sorted(set(clips.captions))
    text = np.asarray(C.encode_texts(model, tokenizer, distinct))
    own = np.asarray([distinct.index(c) for c in clips.captions])

    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
    sims = unit(frames) @ unit(text).T                                                         # (N, F, K)
    top1_frame = float(np.mean(sims.argmax(-1) == own[:, None]))
    vid = unit(unit(frames).mean(1))
    pred = (vid @ unit(text).T).argmax(-1)
    top1_video = float(np.mean(pred == own))

    same, other = _partner(clips.captions, True, rng), _partner(clips.captions, False, rng)
    cv = lambda a, b: np.asarray(clip_video_similarity(a, b))
    has_same = same >= 0
    return {
        "num_videos": int(n), "num_captions": len(distinct), "retrieval_chance": 1.0 / len(distinct),
        "retrieval_top1_frame": top1_frame, "retrieval_top1_video": top1_video,
        "confusion": retrieval_confusion(clips, [distinct[j] for j in pred]),
        "clip_t_match": float(np.mean(np.asarray(clip_score(frames, text[own])))),
        "clip_t_mismatch": float(np.mean(np.asarray(clip_score(frames, text[own[other]])))),
        "clip_v_degraded": float(np.mean(cv(degraded, frames))),
        "clip_v_same_caption": float(np.mean(cv(frames[same[has_same]], frames[has_same]))) if has_same.any() else float("nan"),
        "clip_v_other_caption": float(np.mean(cv(frames[other], frames))),
        "clip_v_static": float(np.mean(cv(static, frames))),
    }


def retrieval_confusion(clips: WorldClips, retrieved: Sequence[str], top: int = 10) -> dict:
    """Where the video -> caption retrieval (``retrieved``: the caption retrieved for each clip, as
    ``evaluate_clip`` does it) goes wrong: top-1 per event, the wrong answers split into "same event"
    (right event, another colour / direction / place) and "other event", and the ``top`` most
    frequent (true caption, retrieved caption) pairs."""
    from collections import Counter

    got = list(retrieved)
    event_of = dict(zip(clips.captions, clips.events))
    by_event = {}
    for e in sorted(set(clips.events)):
        m = [i for i, x in enumerate(clips.events) if x == e]
        by_event[e] = {"n": len(m), "top1": float(np.mean([got[i] == clips.captions[i] for i in m]))}
    wrong = [(c, g) for c, g in zip(clips.captions, got) if c != g]
    same = sum(event_of[c] == event_of[g] for c, g in wrong)
    return {"top1": 1.0 - len(wrong) / len(got), "by_event": by_event, "wrong_same_event": same,
            "wrong_other_event": len(wrong) - same,
            "most_confused": [[c, g, k] for (c, g), k in Counter(wrong).most_common(top)]}
