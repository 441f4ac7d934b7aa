"""Joint-GRPO rewards and group-relative advantages.

Components (names used everywhere: configs, logs, ablations):

* ``format``: 1 if the VLM output is ``[Think]...[/Think][Ans]...[/Ans]`` (see ``format_reward``).
* ``t1``: ROUGE-L F-measure of the generated caption's [Ans] text vs the ground-truth caption.
* ``v1``: CLIP video-video similarity of the video rendered from the VLM caption (frozen VDM) vs
  the ground-truth video (stage 1, trains the VLM).
* ``v2``: the same similarity for the VDM's sample (stage 2, trains the VDM).
* ``c2``: CLIPScore of the VDM's video vs the anchored caption (stage 2).
* ``world`` (not the paper's): the synthetic world's exact foreground IoU of the rendered video vs
  the ground truth (``rl.render_accuracy``).
* user functions ``package.module:function`` / ``path/to/file.py:function`` taking a
  ``RewardInputs`` (``parse_rewards``; ``train.grpo.rewards``).

All reward functions are pure and batched: they take a batch and return one float32 value per
sample. Advantages are computed per group of ``group_size`` consecutive samples (rows
``[g * G, (g + 1) * G)`` are the rollouts of prompt ``g``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .format import ANS_OPEN, extract_answer, follows_format  # noqa: F401  (re-exported)

# --------------------------------------------------------------------------------------------
# text


def format_reward(texts: Sequence[str], *, require_nonempty: bool = True) -> np.ndarray:
    """(N,) float32: 1.0 where ``follows_format``, else 0.0."""
    return np.asarray([float(follows_format(t, require_nonempty=require_nonempty)) for t in texts], np.float32)


@functools.lru_cache(maxsize=4)
def _rouge_scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l_reward(preds: Sequence[str], refs: Sequence[str], *, extract: bool = True,
                   use_stemmer: bool = False) -> np.ndarray:
    """(N,) float32 ROUGE-L F-measure (``rouge_score``, sentence-level LCS, beta = 1) of each
    prediction's [Ans] text against its reference caption.

    Tokenization is rouge-score's default: lowercase, every run of characters outside
    ``[a-z0-9]`` is a separator (so punctuation is dropped, and non-ASCII letters are dropped too),
    optional Porter stemming (``use_stemmer``; off by default, as rouge-score). An empty
    prediction or reference scores 0. ``extract`` applies ``extract_answer`` to the predictions
    (and to references that contain an ``[Ans]`` tag).
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    scorer = _rouge_scorer(bool(use_stemmer))
    out = np.empty(len(preds), np.float32)
    for i, (p, r) in enumerate(zip(preds, refs)):
        if extract:
            p = extract_answer(p)
            r = extract_answer(r) if ANS_OPEN in r else r
        out[i] = scorer.score(r, p)["rougeL"].fmeasure  # score(target, prediction)
    return out


# --------------------------------------------------------------------------------------------
# CLIP similarities (features from vans_jax.models.clip; unnormalized is fine)


def _unit(x, eps=1e-8):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _masked_frame_mean(cos, mask):
    if mask is None:
        return jnp.mean(cos, axis=-1)
    m = mask.astype(jnp.float32)
    return jnp.sum(cos * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


@jax.jit
def _video_sim(feat_gen, feat_gt, mask):
    return _masked_frame_mean(jnp.sum(_unit(feat_gen) * _unit(feat_gt), axis=-1), mask)


@jax.jit
def _clip_score(frame_feats, text_feats, mask):
    return _masked_frame_mean(jnp.einsum("bfd,bd->bf", _unit(frame_feats), _unit(text_feats)), mask)


def clip_video_similarity(feat_gen, feat_gt, frame_mask=None) -> jax.Array:
    """CLIP-V: (B,) mean over frames of cos(generated frame i, ground-truth frame i).
    feat_gen, feat_gt: (B, F, D); frame_mask (B, F) (optional) marks valid frames."""
    feat_gen, feat_gt = jnp.asarray(feat_gen), jnp.asarray(feat_gt)
    if feat_gen.ndim != 3 or feat_gen.shape != feat_gt.shape:
        raise ValueError(f"expected two (B, F, D) feature arrays of one shape, got {feat_gen.shape} "
                         f"and {feat_gt.shape}")
    return _video_sim(feat_gen, feat_gt, None if frame_mask is None else jnp.asarray(frame_mask))


def clip_score(frame_feats, text_feats, frame_mask=None) -> jax.Array:
    """CLIP-T / CLIPScore: (B,) mean over frames of cos(frame, caption), raw cosine (no 100x, no
    clamp at 0). frame_feats (B, F, D), text_feats (B, D)."""
    frame_feats, text_feats = jnp.asarray(frame_feats), jnp.asarray(text_feats)
    if frame_feats.ndim != 3 or text_feats.shape != (frame_feats.shape[0], frame_feats.shape[2]):
        raise ValueError(f"expected frame feats (B, F, D) and text feats (B, D), got {frame_feats.shape} "
                         f"and {text_feats.shape}")
    return _clip_score(frame_feats, text_feats, None if frame_mask is None else jnp.asarray(frame_mask))


# --------------------------------------------------------------------------------------------
# group-relative advantages

MODES = ("normalize_then_sum", "sum_then_normalize")


def group_normalize(r, group_size: int, *, eps: float = 1e-4, ddof: int = 0) -> jax.Array:
    """(r - mean_group) / (std_group + eps) for consecutive groups of ``group_size``.
    A group whose rewards are all equal gets exactly 0 (never NaN); ``ddof`` 0 = population std
    (as Flow-GRPO), 1 = sample std (as TRL's GRPO)."""
    r = jnp.asarray(r, jnp.float32)
    if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards of shape {r.shape} do not split into groups of {group_size}")
    if ddof and group_size <= ddof:
        raise ValueError(f"ddof={ddof} needs groups larger than {ddof}")
    return _group_normalize(r, group_size, float(eps), int(ddof))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _group_normalize(r, group_size, eps, ddof):
    g = r.reshape(-1, group_size)
    mean = jnp.mean(g, axis=1, keepdims=True)
    std = jnp.std(g, axis=1, keepdims=True, ddof=ddof)
    flat = jnp.max(g, axis=1, keepdims=True) == jnp.min(g, axis=1, keepdims=True)
    adv = jnp.where(flat, 0.0, (g - mean) / (std + eps))
    return adv.reshape(-1)


def group_advantages(rewards: Mapping[str, object], group_size: int, weights: Mapping[str, float] | None = None,
                     mode: str = "normalize_then_sum", eps: float = 1e-4, ddof: int = 0) -> jax.Array:
    """Advantages (N,) from per-component rewards ``{name: (N,)}``.

    * ``normalize_then_sum`` (the paper's rule): ``sum_k w_k * group_normalize(r_k)``;
      a component that is constant within a group contributes 0 there.
    * ``sum_then_normalize``: ``group_normalize(sum_k w_k * r_k)``.

    ``weights=None`` weighs every component 1; otherwise ``weights`` must name exactly the
    components in ``rewards`` (a weight of 0 is allowed).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if not rewards:
        raise ValueError("no reward components given")
    if weights is None:
        weights = {k: 1.0 for k in rewards}
    if set(weights) != set(rewards):
        raise KeyError(f"weights {sorted(weights)} do not match reward components {sorted(rewards)}")
    arrs = {k: jnp.asarray(v, jnp.float32).reshape(-1) for k, v in rewards.items()}
    n = {a.shape[0] for a in arrs.values()}
    if len(n) != 1:
        raise ValueError(f"reward components differ in length: { {k: a.shape for k, a in arrs.items()} }")
    if mode == "normalize_then_sum":
        return sum(float(weights[k]) * group_normalize(a, group_size, eps=eps, ddof=ddof) for k, a in arrs.items())
    total = sum(float(weights[k]) * a for k, a in arrs.items())
    return group_normalize(total, group_size, eps=eps, ddof=ddof)


# --------------------------------------------------------------------------------------------
# registry and config


@dataclasses.dataclass(frozen=True)
class RewardComponent:
    name: str
    inputs: tuple[str, ...]   # keyword names taken from the rollout batch
    fn: Callable              # fn(**inputs) -> (N,)
    doc: str = ""


REWARD_REGISTRY: dict[str, RewardComponent] = {}


def register_reward(name: str, inputs: Sequence[str], fn: Callable, doc: str = ""):
    REWARD_REGISTRY[name] = RewardComponent(name, tuple(inputs), fn, doc)


register_reward("format", ("texts",), lambda texts: format_reward(texts),
                "1 if [Think]...[/Think][Ans]...[/Ans], else 0")
register_reward("t1", ("texts", "gt_captions"), lambda texts, gt_captions: rouge_l_reward(texts, gt_captions),
                "ROUGE-L F of the [Ans] caption vs the ground-truth caption")
register_reward("v1", ("gen_video_feats", "gt_video_feats"),
                lambda gen_video_feats, gt_video_feats: clip_video_similarity(gen_video_feats, gt_video_feats),
                "CLIP video-video similarity, video rendered from the VLM caption vs ground truth")
register_reward("v2", ("gen_video_feats", "gt_video_feats"),
                lambda gen_video_feats, gt_video_feats: clip_video_similarity(gen_video_feats, gt_video_feats),
                "CLIP video-video similarity, VDM sample vs ground truth")
register_reward("c2", ("gen_video_feats", "caption_feats"),
                lambda gen_video_feats, caption_feats: clip_score(gen_video_feats, caption_feats),
                "CLIPScore of the VDM sample vs the anchored caption")

def _world_reward(frames, gt_frames):
    from .render_accuracy import render_accuracy
    return np.asarray([render_accuracy(np.asarray(g), np.asarray(t))["render_iou"] for g, t in zip(frames, gt_frames)],
                      np.float32)


register_reward("world", ("frames", "gt_frames"), _world_reward,
                "the synthetic world's exact foreground IoU of the rendered video vs the ground truth "
                "(rl.render_accuracy; not a paper reward)")


def _world_color_reward(frames, gt_frames):
    from .render_accuracy import render_accuracy
    out = []
    for g, t in zip(frames, gt_frames):
        r = render_accuracy(np.asarray(g), np.asarray(t))
        # a truth with no object to colour (no group) scores 0: every rollout of a prompt shares its
        # truth, so the value is constant within the group and adds nothing to an advantage
        out.append(r["render_color"] if r["render_color_groups"] else 0.0)
    return np.asarray(out, np.float32)


register_reward("world_color", ("frames", "gt_frames"), _world_color_reward,
                "the synthetic world's exact object-colour accuracy of the rendered video vs the ground truth: "
                "the fraction of the truth's (frame, object) groups drawn in the right world colour "
                "(rl.render_accuracy; not a paper reward)")

STAGE_COMPONENTS = {1: ("format", "t1", "v1"), 2: ("v2", "c2")}


# --------------------------------------------------------------------------------------------
# user rewards (train.grpo.rewards)


@dataclasses.dataclass(frozen=True)
class RewardInputs:
    """What a user reward function sees, for the whole batch of N = prompts x G rollouts (rows
    ``[g * G, (g + 1) * G)`` are the rollouts of prompt ``g``).

    frames:      uint8 (N, F, H, W, 3), the rendered videos (None in a mode that renders none)
    gt_frames:   uint8 (N, F, H, W, 3), each rollout's ground-truth next event (None likewise)
    captions:    the N captions that were rendered (the VLM's, or the stage-2 anchors)
    gt_captions: the N ground-truth captions
    texts:       the N full VLM outputs (None when the VLM does not sample: grpo_stage2, grpo_vdm)
    group_size:  G
    """
    frames: np.ndarray | None
    gt_frames: np.ndarray | None
    captions: list
    gt_captions: list
    texts: list | None
    group_size: int


def _load_function(ref: str) -> Callable:
    """``package.module:function`` or ``path/to/file.py:function`` -> the function."""
    import importlib
    import importlib.util
    import os

    mod_name, sep, fn_name = ref.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"reward {ref!r}: expected a built-in name ({', '.join(sorted(REWARD_REGISTRY))}) or "
                         "'package.module:function' or 'path/to/file.py:function'")
    if mod_name.endswith(".py"):
        if not os.path.isfile(mod_name):
            raise FileNotFoundError(f"reward {ref!r}: file {mod_name} does not exist")
        spec = importlib.util.spec_from_file_location(f"_vans_reward_{abs(hash(os.path.abspath(mod_name)))}", mod_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ImportError(f"reward {ref!r}: cannot import module {mod_name!r}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise AttributeError(f"reward {ref!r}: {mod_name} has no function {fn_name!r}")
    return fn


def _user_component(ref: str) -> RewardComponent:
    fn = _load_function(ref)

    def call(reward_inputs: RewardInputs):
        n = len(reward_inputs.gt_captions)
        out = fn(reward_inputs)
        try:
            a = np.asarray(jax.device_get(out), np.float32)
        except (TypeError, ValueError) as e:
            raise TypeError(f"reward {ref!r} returned {type(out).__name__}, not N={n} numbers: {e}") from None
        if a.shape != (n,):
            raise ValueError(f"reward {ref!r} returned shape {a.shape}; expected ({n},): one value per rollout")
        return a

    return RewardComponent(ref, ("reward_inputs",), call, f"user reward {ref}")


def parse_rewards(spec: str) -> dict[str, float]:
    """``train.grpo.rewards`` -> {component name: weight}: a comma-separated list of built-in names
    (``format``, ``t1``, ``v1``, ``v2``, ``c2``, ``world``, ``world_color``) and user functions
    (``package.module:function``, ``path/to/file.py:function``), each optionally ``=weight``.
    User functions are loaded and registered under their reference; empty -> {}."""
    out: dict[str, float] = {}
    for entry in (e.strip() for e in str(spec or "").split(",")):
        if not entry:
            continue
        name, eq, w = entry.partition("=")
        name = name.strip()
        try:
            weight = float(w) if eq else 1.0
        except ValueError:
            raise ValueError(f"reward {entry!r}: the weight {w!r} is not a number") from None
        if name not in REWARD_REGISTRY:
            if ":" not in name:
                raise KeyError(f"unknown reward {name!r}; built-in: {sorted(REWARD_REGISTRY)} (or "
                               "'package.module:function', 'path/to/file.py:function')")
            REWARD_REGISTRY[name] = _user_component(name)
        if name in out:
            raise ValueError(f"reward {name!r} is listed twice in {spec!r}")
        out[name] = weight
    return out


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Which components a stage uses and how they combine. Ablations switch components off by
    name: ``RewardConfig.stage(1).without("t1")``."""
    weights: Mapping[str, float]
    disabled: tuple[str, ...] = ()
    mode: str = "normalize_then_sum"
    eps: float = 1e-4
    ddof: int = 0

    def __post_init__(self):
        unknown = (set(self.weights) | set(self.disabled)) - set(REWARD_REGISTRY)
        if unknown:
            raise KeyError(f"unknown reward components {sorted(unknown)}; known: {sorted(REWARD_REGISTRY)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        object.__setattr__(self, "weights", dict(self.weights))
        object.__setattr__(self, "disabled", tuple(self.disabled))

    @classmethod
    def stage(cls, stage: int, weights: Mapping[str, float] | None = None, **kw) -> "RewardConfig":
        names = STAGE_COMPONENTS[stage]
        w = {k: 1.0 for k in names}
        w.update(weights or {})
        return cls(weights=w, **kw)

    def without(self, *names: str) -> "RewardConfig":
        return dataclasses.replace(self, disabled=tuple(dict.fromkeys(self.disabled + names)))

    @property
    def active(self) -> dict[str, float]:
        return {k: float(w) for k, w in self.weights.items() if k not in self.disabled}

    def required_inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i for k in self.active for i in REWARD_REGISTRY[k].inputs))


def compute_rewards(cfg: RewardConfig, **batch) -> dict[str, np.ndarray]:
    """{name: (N,) float32} for the active components of ``cfg``, from batch inputs named as in
    the registry (texts, gt_captions, gen_video_feats, gt_video_feats, caption_feats)."""
    out = {}
    for name in cfg.active:
        comp = REWARD_REGISTRY[name]
        missing = [i for i in comp.inputs if batch.get(i) is None]
        if missing:
            raise KeyError(f"reward {name!r} needs inputs {missing}")
        out[name] = np.asarray(comp.fn(**{i: batch[i] for i in comp.inputs}), np.float32)
    return out


def stage_advantages(cfg: RewardConfig, rewards: Mapping[str, object], group_size: int) -> jax.Array:
    """``group_advantages`` over the active components of ``cfg`` (others in ``rewards`` are
    ignored, so logged-but-ablated components do not leak in)."""
    active = cfg.active
    if not active:
        raise ValueError("every reward component is disabled")
    missing = set(active) - set(rewards)
    if missing:
        raise KeyError(f"rewards missing active components {sorted(missing)}")
    return group_advantages({k: rewards[k] for k in active}, group_size, active, mode=cfg.mode, eps=cfg.eps,
                            ddof=cfg.ddof)
