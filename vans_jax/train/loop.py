"""``vans-jax train``: one loop for every mode (``train.modes.MODE_DOCS``: sft_vlm, sft_vdm,
grpo_stage1, grpo_stage2 and the ablations grpo_vlm, grpo_vdm, grpo_all_in_one).

Reward ablations: ``train.grpo.disabled_rewards="t1"`` (names: format, t1, v1, v2, c2). "Both
isolated then cascaded" = a grpo_vlm run and a grpo_vdm run from the same SFT models, evaluated
together; "Stage 1 only" = a grpo_stage1 run evaluated with the SFT DiT.

The work directory holds ``checkpoints/`` (orbax; the same command resumes), ``tb/`` (TensorBoard
via clu), ``metrics.jsonl`` (one line per step; after a resume the rows of the replayed steps are
not repeated), ``final_metrics.json`` and ``export/`` (the trained models in their real checkpoint
layouts: ``export/vlm`` a Hugging Face Qwen2.5-VL directory with the LoRA merged, ``export/vdm`` a
diffusers Wan directory). Running a finished run's command again changes nothing and says so.
Everything a run can check without its models (work directory, model directories, video size, data
files, the mode of the run in the work directory) is checked before any model loads (``preflight``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import parallel
from .._files import remove_stale_tmp, write_atomic, write_json
from ..data.loader import PipelineConfig, VNEPSource, make_dataset, skip_stats
from ..rl.rollouts import RenderSettings, reference_latents
from ..rl.stages import GRPO_MODES, GRPOSettings
from .checkpoint import Checkpointer
from .core import place
from . import media
from .grpo import JointGRPO, Part, cached_update_step
from .sft import build_sft_vlm_batch, clip_to_video, sft_vdm_loss, sft_vlm_loss

MODES = ("sft_vlm", "sft_vdm") + GRPO_MODES


# ----------------------------------------------------------------------------- models


def _lora_config(cfg):
    from ..models.qwen2_5_vl import LoRAConfig
    lc = cfg.vlm.lora
    return LoRAConfig(rank=int(lc.rank), alpha=float(lc.alpha), dropout=float(lc.dropout),
                      targets=tuple(lc.targets), include_vision=bool(lc.include_vision))


def load_vlm(cfg, mesh, *, lora: bool):
    from ..models import qwen2_5_vl as qwen
    from ..models.qwen2_5_vl import tokenizer as qtok
    path = cfg.vlm.path
    if not path:
        raise ValueError("vlm.path is empty: training needs a local Hugging Face Qwen2.5-VL directory "
                         "(--config.vlm.path=DIR)")
    model = qwen.from_pretrained(path, dtype=cfg.vlm.dtype, mesh=mesh, lora=_lora_config(cfg) if lora else None,
                                 attn_impl=cfg.vlm.attn_impl, remat=cfg.vlm.remat)
    return model, qtok.load_tokenizer(path)


def load_vdm(cfg, mesh):
    from ..sampling import wan as wp
    if not cfg.vdm.path:
        raise ValueError("vdm.path is empty: training needs a local diffusers Wan directory (--config.vdm.path=DIR)")
    return wp.from_pretrained(cfg.vdm.path, dtype=cfg.vdm.dtype, mesh=mesh, dit_path=cfg.vdm.dit_path or None,
                              attn_impl=cfg.vdm.get("attn_impl"), seq_parallel=cfg.vdm.get("seq_parallel"))


def load_clip(cfg, mesh):
    from ..convert import clip as clip_ckpt
    from ..models import clip
    if not cfg.clip.path:
        raise ValueError("clip.path is empty: the CLIP rewards need a local Hugging Face CLIP directory "
                         "(--config.clip.path=DIR)")
    return clip_ckpt.from_pretrained(cfg.clip.path, mesh=mesh), clip.load_tokenizer(cfg.clip.path)


@dataclasses.dataclass
class LoadedModels:
    """Models already in memory. Given to ``train(cfg, models=...)``: what the run uses instead of
    loading it from the config's paths (a field left None is loaded as before). Returned by
    ``train`` (its result's ``"models"``): the models after training, ready for inference."""
    vlm: Any = None              # Qwen2_5_VLModel WITHOUT LoRA adapters (as ``load_vlm(lora=False)``)
    tokenizer: Any = None        # the VLM's tokenizer
    vdm: Any = None              # sampling.wan.WanModels
    clip: Any = None             # models.clip.CLIPModel (the reward model)
    clip_tokenizer: Any = None


def copy_module(model):
    """A copy of ``model`` with buffers of its own (same values, same shardings): a trained copy's
    donated updates then never delete the original's arrays."""
    from flax import nnx
    graphdef, state = nnx.split(model)
    fresh = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False) if isinstance(x, jax.Array) else x,
                         state)
    return nnx.merge(graphdef, fresh)


def _flat(state) -> dict:
    from flax import nnx
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def add_lora(model, cfg, mesh, *, seed: int = 0):
    """``model`` (a Qwen2.5-VL without adapters) with the fresh LoRA adapters of ``cfg.vlm.lora``
    exactly as ``load_vlm(cfg, mesh, lora=True)`` adds them when it loads the weights
    (``convert.qwen2_5_vl.from_pretrained``: the same parameter paths, ``lora_init_fill(seed)``
    values, dtype and shardings). The base weights are shared with ``model``, which is unchanged."""
    from flax import nnx
    from jax.sharding import NamedSharding
    from ..models.layers import resolve_dtype
    from ..models.lora import has_lora, lora_init_fill
    if has_lora(model):
        raise ValueError("the VLM already has LoRA adapters: hand over the base model (merge them first: "
                         "models.lora.merge_lora_copy)")
    abstract = nnx.eval_shape(lambda: type(model)(model.config, rngs=nnx.Rngs(seed), lora=_lora_config(cfg)))
    graphdef, state = nnx.split(abstract)
    have, want = _flat(nnx.state(model)), _flat(state)
    if set(have) - set(want):
        raise ValueError(f"the VLM has parameters a LoRA model of its config lacks: {sorted(set(have) - set(want))[:5]}")
    fill = lora_init_fill(seed)
    dt = resolve_dtype(model.config.dtype)          # from_pretrained: every parameter in the load dtype
    mesh = mesh if mesh is not None else parallel.make_mesh({"data": 1}, jax.devices()[:1])
    for path, var in want.items():
        if path in have:
            var.set_value(have[path].get_value())
            continue
        shape = var.get_value().shape
        value = fill(path, shape, dt)
        if value is None:
            raise ValueError(f"{path} is missing from the given VLM")
        spec = parallel.logical_to_spec(parallel.variable_axes(var), parallel.DEFAULT_RULES, mesh, shape)
        var.set_value(parallel.device_put_global(np.asarray(value).astype(dt), NamedSharding(mesh, spec)))
    return nnx.merge(graphdef, state)


def merged_vlm(model):
    """The VLM as its export reloads (``export_parts`` -> ``load_vlm(lora=False)``): LoRA merged into
    the base weights and the adapters removed, in a copy (``model`` is unchanged)."""
    from ..models.lora import merge_lora_copy
    merged = merge_lora_copy(model)
    merged.lora_config = None
    return merged


def _mode_uses(cfg, mode) -> dict:
    """Which models a mode needs and how it trains them ("lora" / "full" / None = frozen)."""
    if mode == "sft_vlm":
        return dict(vlm=True, vdm=False, clip=False, train_vlm=str(cfg.train.sft_vlm.trainable), train_dit=None)
    if mode == "sft_vdm":
        return dict(vlm=False, vdm=True, clip=False, train_vlm=None, train_dit=str(cfg.train.sft_vdm.trainable))
    g = cfg.train.grpo
    return dict(vlm=mode != "grpo_vdm", vdm=mode != "grpo_vlm", clip=mode != "grpo_vlm",
                train_vlm=str(g.vlm_trainable) if mode in ("grpo_stage1", "grpo_vlm", "grpo_all_in_one") else None,
                train_dit=str(g.dit_trainable) if mode in ("grpo_stage2", "grpo_vdm", "grpo_all_in_one") else None)


def prepare_models(cfg, mode, mesh, given: LoadedModels | None = None) -> LoadedModels:
    """The models ``mode``'s runner uses: each one from ``given`` when there, else loaded from the
    config's paths (``load_vlm`` / ``load_vdm`` / ``load_clip``). A given VLM that the mode trains
    with LoRA gets fresh adapters (``add_lora``: what loading it would have given); a given model
    the mode trains in full is copied first (``copy_module``): the given models are never changed,
    and never donated away by the updates."""
    given = given if given is not None else LoadedModels()
    use = _mode_uses(cfg, mode)
    out = LoadedModels()
    if use["vlm"]:
        lora = use["train_vlm"] == "lora"
        if given.vlm is None:
            out.vlm, out.tokenizer = load_vlm(cfg, mesh, lora=lora)
        else:
            if given.tokenizer is None:
                raise ValueError("models.vlm was given without models.tokenizer")
            out.vlm = (add_lora(given.vlm, cfg, mesh) if lora else
                       copy_module(given.vlm) if use["train_vlm"] else given.vlm)
            out.tokenizer = given.tokenizer
    if use["vdm"]:
        if given.vdm is None:
            out.vdm = load_vdm(cfg, mesh)
        else:
            out.vdm = dataclasses.replace(given.vdm, dit=copy_module(given.vdm.dit)) if use["train_dit"] else given.vdm
    if use["clip"]:
        if given.clip is None:
            out.clip, out.clip_tokenizer = load_clip(cfg, mesh)
        else:
            out.clip, out.clip_tokenizer = given.clip, given.clip_tokenizer
    return out


def trained_models(runner, used: LoadedModels, given: LoadedModels | None = None) -> LoadedModels:
    """The models after training, as their exports would reload: the trained VLM with its LoRA merged
    (``merged_vlm``), the VDM with the trained DiT, the rest as used (models the mode did not use
    pass through from ``given``)."""
    given = given if given is not None else LoadedModels()
    out = LoadedModels(**{f.name: getattr(used, f.name) if getattr(used, f.name) is not None else getattr(given, f.name)
                          for f in dataclasses.fields(LoadedModels)})
    if "vlm" in runner.parts:
        out.vlm = merged_vlm(runner.parts["vlm"].export_model())
    if "dit" in runner.parts:
        out.vdm = dataclasses.replace(out.vdm, dit=runner.parts["dit"].export_model())
    return out


def render_settings(cfg) -> RenderSettings:
    v, g = cfg.video, cfg.train.grpo
    return RenderSettings(height=int(v.height), width=int(v.width), num_frames=int(v.num_frames),
                          num_steps=int(g.train_sampling_steps), cfg_scale=float(g.train_cfg), shift=float(v.shift),
                          negative_prompt=str(v.get("negative_prompt", "")), mode=str(g.render_sampler),
                          noise_level=float(g.sde_noise_level), std_form=str(g.sde_std_form),
                          sde_window=tuple(g.sde_window) if g.sde_window else None, n_ref=int(v.n_ref))


def reward_spec(cfg, mode) -> str:
    """The reward list of a GRPO mode: ``train.grpo.stage2_rewards`` for grpo_stage2 when set, else
    ``train.grpo.rewards`` ("": the mode's paper rewards)."""
    g = cfg.train.grpo
    if mode == "grpo_stage2" and str(g.get("stage2_rewards", "") or "").strip():
        return str(g.stage2_rewards)
    return str(g.get("rewards", "") or "")


def grpo_settings(cfg, mode) -> GRPOSettings:
    g, gen = cfg.train.grpo, cfg.generation
    disabled = tuple(x for x in str(g.disabled_rewards).replace(" ", "").split(",") if x)
    return GRPOSettings(mode=mode, group_size=int(g.group_size), beta=float(g.beta), clip_eps=float(g.clip_eps),
                        num_updates=int(g.num_updates), aggregation=str(g.aggregation),
                        advantage_clip=float(g.advantage_clip), temperature=float(gen.temperature),
                        top_p=float(gen.top_p), top_k=int(gen.top_k), max_new_tokens=int(gen.max_new_tokens),
                        anchor_rouge_threshold=float(g.anchor_rouge_threshold), anchor_max_tries=int(g.anchor_max_tries),
                        anchor_temperature=float(g.anchor_temperature), caption_fallback=str(g.caption_fallback),
                        disabled_rewards=disabled, pad_multiple=int(cfg.train.pad_multiple),
                        rewards=reward_spec(cfg, mode),
                        shuffle_advantages=bool(g.get("shuffle_advantages", False)),
                        diagnostics_every=int(g.get("diagnostics_every", 0)),
                        diagnostics_noises=int(g.get("diagnostics_noises", 4)),
                        diagnostics_sde_draws=int(g.get("diagnostics_sde_draws", 4)),
                        grad_accum=int(g.get("grad_accum", 1)), same_noise=bool(g.get("same_noise", False)),
                        timestep_weight=str(g.get("timestep_weight", "none") or "none"),
                        sft_weight=float(g.get("sft_weight", 0.0) or 0.0),
                        dit_objective=str(g.get("dit_objective", "flow_grpo") or "flow_grpo"),
                        nft_beta=float(g.get("nft_beta", 1.0)), nft_timesteps=int(g.get("nft_timesteps", 4)))


# ----------------------------------------------------------------------------- SFT runners


class SFTVLM:
    def __init__(self, cfg, mesh, models: LoadedModels | None = None):
        sc = cfg.train.sft_vlm
        models = models if models is not None else prepare_models(cfg, "sft_vlm", mesh)
        self.model, self.tokenizer = models.vlm, models.tokenizer
        self.model_cfg = self.model.config
        self.vcfg = cfg.vlm
        self.pad_multiple = int(cfg.train.pad_multiple)
        self.max_len = int(sc.max_len)
        self.part = Part(self.model, sc.trainable, sc, int(cfg.seed), reference=False, mesh=mesh)
        self.parts = {"vlm": self.part}
        self.mesh = self.part.mesh
        dropout = bool(sc.get("dropout", True))
        self._update = cached_update_step(self.part, functools.partial(sft_vlm_loss, dropout=dropout),
                                          ("sft_vlm", dropout))

    def step(self, examples, step_index, rng):
        t0 = time.perf_counter()
        batch = build_sft_vlm_batch(examples, self.tokenizer, self.model_cfg, self.vcfg, self.pad_multiple,
                                    self.max_len, mesh=self.mesh)
        truncated = batch.pop("truncated")
        self.part.state, m = self._update(self.part.state, self.part.frozen, batch)
        m["truncated_examples"] = float(truncated)
        m["target_tokens_in_batch"] = jnp.sum(batch["attention_mask"])  # the global batch's (replicated)
        return dict(m, **{"time/step_s": time.perf_counter() - t0})


class SFTVDM:
    def __init__(self, cfg, mesh, models: LoadedModels | None = None):
        sc = cfg.train.sft_vdm
        self.vdm = (models if models is not None else prepare_models(cfg, "sft_vdm", mesh)).vdm
        self.n_ref = int(cfg.video.n_ref)
        self.render = render_settings(cfg)
        self.part = Part(self.vdm.dit, sc.trainable, sc, int(cfg.seed), reference=False, mesh=mesh)
        self.parts = {"dit": self.part}
        self.mesh = self.part.mesh
        shift, drop = float(cfg.video.shift), float(sc.text_dropout)
        fg_w, fg_t = float(sc.get("fg_weight", 0.0)), float(sc.get("fg_threshold", 0.5))
        if fg_w < 0 or fg_t < 0:
            raise ValueError(f"train.sft_vdm: fg_weight ({fg_w}) and fg_threshold ({fg_t}) must be >= 0")
        self._update = cached_update_step(self.part, functools.partial(sft_vdm_loss, shift=shift, text_dropout=drop,
                                                                       fg_weight=fg_w, fg_threshold=fg_t),
                                          ("sft_vdm", shift, drop, fg_w, fg_t))
        from .latent_cache import LatentCache, cache_dir
        d = cache_dir(sc.get("latent_cache", "auto"), str(cfg.train.workdir or ""))
        self.cache = LatentCache(d, self.vdm, self.render) if d else None
        self.source = None                   # the CachedSource of cached_source(), when the loop uses it
        self._host_context = self._null_host = None
        self.media_every = int(sc.get("log_media_every", cfg.train.get("log_media_every", 0)) or 0)   # a render each
        self.media = media.SFTVDMMedia(int(cfg.train.get("media_samples", 2)), seed=int(cfg.seed))

    def _encode(self, examples, kinds):
        """The frozen encoders on this step's examples (global arrays): ``{kind: array}``."""
        from ..sampling import wan as wp
        # this process's examples -> global arrays (rows over the mesh's batch axes) before any jitted
        # function sees them: the frozen VAE / text encoder run on the global batch too
        to_global = lambda x: parallel.host_local_batch_to_global(x, self.mesh)
        out = {}
        if "latents" in kinds:
            target = np.stack([np.asarray(e["target"]) for e in examples])
            out["latents"] = wp.encode_video(self.vdm, to_global(clip_to_video(target)))
        if "context" in kinds:
            out["context"] = wp.encode_text(self.vdm, [e["caption"] for e in examples], to_device=to_global)
        if "ref" in kinds:
            out["ref"] = reference_latents(self.vdm, examples, self.render, to_device=to_global)
        return out

    def _cached(self, examples, kinds):
        """``_encode`` through the latent cache (``train.latent_cache``): every process looks up its
        rows; a kind that any process misses is encoded for the whole batch (collective) and stored."""
        from .latent_cache import SOURCES, content_key
        keys = {k: [(e.get("cached_keys") or {}).get(k) or content_key(e[SOURCES[k]]) for e in examples]
                for k in kinds}
        got = {k: [self.cache.get(k, key) for key in keys[k]] for k in kinds}
        missing = [k for k in kinds if any(a is None for a in got[k])]
        if jax.process_count() > 1:          # the same decision on every process (collectives follow)
            missing = sorted(set().union(*parallel.process_allgather_objects(missing)))
        if missing:                          # an entry gone since its alias was read: decode after all
            examples = self._full(examples)
        out = self._encode(examples, missing) if missing else {}
        for k in missing:
            rows = self._local_rows(out[k])
            for key, row in zip(keys[k], rows):
                self.cache.put(k, key, row)
        for k in kinds:
            if k not in out:
                out[k] = parallel.host_local_batch_to_global(np.stack(got[k]), self.mesh)
                if k == "context" and jax.process_count() == 1:      # the whole batch's, for the trim
                    self._host_context = np.stack(got[k])
        if self.source is not None:          # the next epoch gives these examples without decoding them
            for i, e in enumerate(examples):
                self.source.remember(e, {k: keys[k][i] for k in kinds})
        return out

    def cached_source(self, source):
        """``source`` wrapped so that examples already in the latent cache are not decoded
        (``latent_cache.CachedSource``); ``source`` itself without a cache."""
        if self.cache is None:
            return source
        from .latent_cache import CachedSource
        kinds = ("latents", "context") + (("ref",) if self.n_ref else ())
        self.source = CachedSource(source, self.cache.dir, kinds)
        return self.source

    def _full(self, examples):
        """The examples with their clips (those given from their cache aliases decoded now)."""
        if self.source is None:
            return examples
        return [self.source.load_full(e) for e in examples]

    def _local_rows(self, x):
        if jax.process_count() == 1:
            return np.asarray(x)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.global_array_to_host_local_array(x, self.mesh, x.sharding.spec))

    def step(self, examples, step_index, rng):
        t0 = time.perf_counter()
        kinds = ("latents", "context") + (("ref",) if self.n_ref else ())
        self._host_context = None
        enc = self._encode(examples, kinds) if self.cache is None else self._cached(examples, kinds)
        null = self.vdm.negative_embeddings("", 1)
        batch = dict(latents=enc["latents"], context=enc["context"], null_context=null)
        if self.n_ref:
            batch["ref_latents"] = enc["ref"]
        # the captions' shared zero tail cut off (the same loss on the positions used: Wan pads to 512),
        # decided on host copies where there are some (the cached contexts): reading the device's would
        # wait for the previous step's update, every step
        from ..sampling.wan import trim_batch_text
        host = None
        if jax.process_count() == 1:
            if self._null_host is None or self._null_host[0] is not null:
                self._null_host = (null, np.asarray(null))
            host = {"null_context": self._null_host[1], "context": self._host_context}
        batch = trim_batch_text(self.vdm.dit, batch, training=True, place=lambda x: place(x, self.mesh)[0], host=host)
        self.part.state, m = self._update(self.part.state, self.part.frozen, batch)
        dt = time.perf_counter() - t0
        e0 = examples[0]
        frames = np.shape(e0["target"])[0] if e0.get("target") is not None else e0["target_frames"]
        m = dict(m, **{"time/step_s": dt, "frames_in_batch": float(enc["latents"].shape[0] * frames)})
        if self.cache is not None:
            m["cache/hit_rate"] = self.cache.hits / max(1, self.cache.hits + self.cache.misses)
        if self.source is not None:          # this step's examples given without decoding their clips
            m["cache/decode_skipped"] = float(np.mean([e.get("cached_keys") is not None for e in examples]))
        if media.due(self.media_every, step_index):     # renders of fixed captions (train.media)
            m["media"] = self.media(self.vdm, self.part.model(), self.render, self._full(examples), self.mesh)
        return m


def build_runner(cfg, mode, mesh, models: LoadedModels | None = None):
    """The runner of ``mode``; ``models``: what ``prepare_models`` gives (None: loaded from the config)."""
    m = models if models is not None else prepare_models(cfg, mode, mesh)
    if mode == "sft_vlm":
        return SFTVLM(cfg, mesh, m)
    if mode == "sft_vdm":
        return SFTVDM(cfg, mesh, m)
    g = cfg.train.grpo
    runner = JointGRPO(grpo_settings(cfg, mode), render_settings(cfg), vlm=m.vlm, vlm_tokenizer=m.tokenizer,
                     vlm_vcfg=cfg.vlm, vdm=m.vdm, clip_model=m.clip, clip_tokenizer=m.clip_tokenizer,
                     vlm_trainable=str(g.vlm_trainable), dit_trainable=str(g.dit_trainable), optim_cfg=g,
                     seed=int(cfg.seed), mesh=mesh)
    runner.media_every = int(cfg.train.get("log_media_every", 0) or 0)     # train.media
    return runner


# ----------------------------------------------------------------------------- data


def data_source(cfg, mode) -> VNEPSource:
    d = cfg.data
    csv = d.train_csv if mode.startswith("sft") else (d.rl_csv or d.train_csv)
    if not csv:
        raise ValueError(f"data.{'train_csv' if mode.startswith('sft') else 'rl_csv'} is empty: give the VANS-Data "
                         f"CSV (--config.data.train_csv=FILE --config.data.video_root=DIR)")
    if not os.path.isfile(csv):
        raise FileNotFoundError(f"data CSV {csv} does not exist")
    if d.video_root and not os.path.isdir(d.video_root):
        raise FileNotFoundError(f"data.video_root {d.video_root} is not a directory")
    pc = PipelineConfig.from_experiment(cfg)
    return VNEPSource(csv, d.video_root, pc)


def uncollate(batch: dict) -> list[dict]:
    n = len(batch["question"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


class HostBatches:
    """This process's examples of every global batch.

    The rows are cut into ``num_shards`` contiguous shards (``data.num_shards``; 0 = one per
    process), each read, shuffled and checkpointed by its own grain iterator, ``batch_size /
    num_shards`` examples a step; process p reads shards p*k .. p*k+k-1 (k = shards per process)
    and the global batch is every shard's examples in shard order. The batches therefore depend on
    ``num_shards`` alone, not on how many processes read them (a 1-process run with
    ``data.num_shards=2`` trains on the batches of a 2-process run), and a checkpoint's data state
    (every shard's) restores on any number of processes that divides ``num_shards``."""

    def __init__(self, source, *, batch_size: int, num_shards: int, seed: int, num_workers: int = 0):
        pc = jax.process_count()
        if num_shards < 1 or num_shards % pc:
            raise ValueError(f"data.num_shards={num_shards} must be a positive multiple of the {pc} process(es)")
        if batch_size % num_shards:
            raise ValueError(f"train.batch_size={batch_size} is not divisible by the {num_shards} data shards "
                             f"(data.num_shards, default one per process): every shard gives batch_size / "
                             f"num_shards examples a step")
        per = num_shards // pc
        self.num_shards = num_shards
        self.shards = list(range(jax.process_index() * per, (jax.process_index() + 1) * per))
        self.iters = [iter(make_dataset(source, batch_size=batch_size // num_shards, seed=seed, num_epochs=None,
                                        drop_remainder=True, num_workers=num_workers, shard_index=i,
                                        shard_count=num_shards)) for i in self.shards]

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        return [e for it in self.iters for e in uncollate(next(it))]

    def num_skipped(self) -> int:
        """Samples this process's shards skipped (unreadable videos, ...) so far."""
        return sum(skip_stats(it)["num_skipped"] for it in self.iters)

    def get_state(self) -> dict:
        """Every shard's iterator state (a collective with several processes: call it on all)."""
        shards = {}
        for part in parallel.process_allgather_objects({str(i): it.get_state() for i, it in
                                                        zip(self.shards, self.iters)}):
            shards.update(part)
        return {"num_shards": self.num_shards, "shards": shards}

    def set_state(self, state: dict):
        if "shards" not in state:        # a checkpoint of one plain iterator (one shard)
            state = {"num_shards": 1, "shards": {"0": state}}
        if int(state["num_shards"]) != self.num_shards:
            raise ValueError(f"the checkpoint reads the data in {state['num_shards']} shard(s), this run in "
                             f"{self.num_shards}: set --config.data.num_shards={state['num_shards']}")
        for i, it in zip(self.shards, self.iters):
            it.set_state(state["shards"][str(i)])


# ----------------------------------------------------------------------------- export


def _copy_tokenizer(src: str, dst: str):
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template",
                            "preprocessor_config", "generation_config")):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def host_model(part):
    """The part's model with every array whole on this host (with several processes its
    parameters are sharded across hosts: gathered, a collective)."""
    model = part.export_model()      # the parameter EMA when there is one
    if jax.process_count() == 1:
        return model
    from flax import nnx
    from jax.experimental import multihost_utils
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, multihost_utils.process_allgather(state, tiled=True))


def export_parts(cfg, runner, out_dir: str, *, link: bool = True) -> dict:
    """Writes the trained models in their real layouts (see the module docstring). Every process
    calls it; process 0 writes (and returns the paths; the others return {})."""
    from ..convert.wan_dit import export_dit_diffusers
    from ..models import qwen2_5_vl as qwen
    models = {k: host_model(p) for k, p in runner.parts.items()}
    if jax.process_index() != 0:
        return {}
    written = {}
    os.makedirs(out_dir, exist_ok=True)
    if "vlm" in models:
        d = os.path.join(out_dir, "vlm")
        os.makedirs(d, exist_ok=True)
        qwen.export_pretrained(models["vlm"], d)
        _copy_tokenizer(cfg.vlm.path, d)
        written["vlm"] = d
    if "dit" in models:
        d = os.path.join(out_dir, "vdm")
        os.makedirs(d, exist_ok=True)
        src = cfg.vdm.path
        for name in os.listdir(src):
            if name == "transformer":
                continue
            s, t = os.path.join(src, name), os.path.join(d, name)
            if os.path.lexists(t):
                (shutil.rmtree if os.path.isdir(t) and not os.path.islink(t) else os.remove)(t)
            if link:
                os.symlink(os.path.abspath(s), t)
            elif os.path.isdir(s):
                shutil.copytree(s, t)
            else:
                shutil.copy2(s, t)
        tdir = os.path.join(d, "transformer")
        if os.path.isdir(tdir):
            shutil.rmtree(tdir)
        os.makedirs(tdir)
        export_dit_diffusers(models["dit"], tdir)
        written["vdm"] = d
    return written


# ----------------------------------------------------------------------------- the loop


def _fmt_eta(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _scalars(m: dict) -> dict:
    """The finite numbers of ``m`` as floats; 0-d arrays (what ``jax.device_get`` gives for a jitted
    step's metrics) count as numbers."""
    out = {}
    for k, v in m.items():
        if isinstance(v, (np.ndarray, np.generic)) and v.ndim == 0 and v.dtype.kind in "biuf":
            v = v.item()
        if isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def steps_for(cfg, mode) -> int:
    t = cfg.train
    if int(t.steps) > 0:
        return int(t.steps)
    if mode == "sft_vlm":
        return int(t.sft_vlm.steps)
    if mode == "sft_vdm":
        return int(t.sft_vdm.steps)
    return int(t.grpo.stage2_steps if mode in ("grpo_stage2", "grpo_vdm") else t.grpo.stage1_steps)


SFT_MODES = ("sft_vlm", "sft_vdm")


def global_batch(cfg, mode) -> tuple[int, str]:
    """(the global batch of ``mode``, the setting it comes from): ``train.grpo.stage2_batch_size`` for
    grpo_stage2 when above 0 (the demo runs both stages from one config), else ``train.batch_size``."""
    s2 = int(cfg.train.grpo.get("stage2_batch_size", 0) or 0)
    if s2 < 0:
        raise ValueError(f"train.grpo.stage2_batch_size must be >= 0 (0: train.batch_size), got {s2}")
    if mode == "grpo_stage2" and s2 > 0:
        return s2, "train.grpo.stage2_batch_size"
    return int(cfg.train.batch_size), "train.batch_size"


def check_batching(cfg, mode, mesh) -> tuple[int, int]:
    """(global batch size, data shards), or a ValueError saying what does not divide."""
    (bs, name), pc = global_batch(cfg, mode), jax.process_count()
    if bs < 1:
        raise ValueError(f"{name} must be >= 1, got {bs}")
    if bs % pc:
        raise ValueError(f"{name}={bs} (the global batch) is not divisible by the {pc} processes: each "
                         f"reads batch_size / process_count examples a step")
    if pc > 1:      # one process replicates a batch over the axes that do not divide it; hosts' rows cannot be
        axes = parallel.batch_spec(mesh)[0] or ()
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        shards = int(np.prod([mesh.shape[a] for a in axes]))
        if bs % shards:
            raise ValueError(f"{name}={bs} is not divisible by the {shards} batch shards of the mesh "
                             f"({' x '.join(f'{a}={mesh.shape[a]}' for a in axes)}): the global batch is split "
                             f"over them; use a multiple of {shards} or move devices to mesh.tensor / mesh.sequence")
    return bs, int(cfg.data.get("num_shards", 0)) or pc


FINAL_METRICS = "final_metrics.json"


def _read_json(path: str):
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _trim_metrics_jsonl(path: str, upto: int) -> list[dict]:
    """Keeps the rows of ``metrics.jsonl`` up to step ``upto`` (one per step, the last written; a line
    cut short by a kill dropped), rewriting the file atomically when anything goes; returns them."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    rows = {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= upto:
            rows[row["step"]] = row
    kept = [rows[k] for k in sorted(rows)]
    if len(kept) != len(lines):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _no_file_on_the_way(path: str, what: str) -> None:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ValueError(f"{what} {path}: {p} is a file, not a directory")


def preflight(cfg, mode, models: LoadedModels | None = None) -> VNEPSource:
    """What a run checks before it loads any model: the work directory, the model directories it will
    load, the video size against the VDM's config files, the data (CSV, video root). Returns the data
    source."""
    _no_file_on_the_way(str(cfg.train.workdir), "train.workdir")
    given = models if models is not None else LoadedModels()
    use = _mode_uses(cfg, mode)
    for name, needed in (("vlm", use["vlm"] and given.vlm is None), ("vdm", use["vdm"] and given.vdm is None),
                         ("clip", use["clip"] and given.clip is None)):
        path = cfg[name].path
        if needed and path and not os.path.isdir(path):
            raise FileNotFoundError(f"{name}.path {path}: the directory does not exist" if not os.path.exists(path)
                                    else f"{name}.path {path} is a file, not a model directory")
    if use["vdm"]:
        from ..sampling.wan import check_generation_size_of_dir
        v = cfg.video
        if given.vdm is not None:
            from ..sampling.wan import check_generation_size
            check_generation_size(given.vdm, int(v.height), int(v.width), int(v.num_frames))
        elif cfg.vdm.path:
            check_generation_size_of_dir(cfg.vdm.path, int(v.height), int(v.width), int(v.num_frames),
                                         dit_path=cfg.vdm.dit_path or None)
    return data_source(cfg, mode)


def train(cfg, *, progress: bool = True, stop_after: int | None = None,
          models: LoadedModels | None = None) -> dict:
    """Runs (or resumes) the configured training; returns the final metrics.
    ``stop_after``: return after that many steps of this invocation (tests of resumption).

    ``models``: models already in memory (``LoadedModels``; ``prepare_models`` says what is done with
    them: the given models are never changed), used instead of loading them from the config's paths
    (fields left None are loaded). With ``models``, the result also holds ``"models"``: the
    ``LoadedModels`` after training (``trained_models``: the VLM with its LoRA merged, numerically
    what ``export/vlm`` reloads as; the VDM with the trained DiT), not written to
    ``final_metrics.json``. Exports are written as without it.

    Several processes (``jax.distributed``; ``parallel.initialize_distributed``): every process runs
    this same function on its own slice of the data (``HostBatches``); the runners turn each
    process's examples into global arrays over the mesh's batch axes before any jitted function,
    so the metrics of the jitted steps are the global batch's on every process (the Joint-GRPO modes
    also gather what the host needs - completions, frames for CLIP, captions - so every process computes
    the same rewards, advantages and anchors for the whole global batch); checkpoints are
    written by all processes (orbax), logs, ``final_metrics.json`` and exports by process 0.
    Timings (``time/*``, ``throughput/*``) are each process's own."""
    mode = str(cfg.train.mode)
    if mode not in MODES:
        raise ValueError(f"unknown train.mode {mode!r}; expected one of {MODES}")
    workdir = cfg.train.workdir
    if not workdir:
        raise ValueError("train.workdir is empty (--config.train.workdir=DIR)")
    total = steps_for(cfg, mode)
    mesh = parallel.make_mesh(dict(cfg.mesh))
    bs, num_shards = check_batching(cfg, mode, mesh)
    primary = jax.process_index() == 0
    progress = progress and primary
    source = preflight(cfg, mode, models)
    os.makedirs(workdir, exist_ok=True)
    if primary:
        remove_stale_tmp(workdir)
    final_path = os.path.join(workdir, FINAL_METRICS)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=int(cfg.train.checkpoint_every),
                        keep=int(cfg.train.keep_checkpoints), use_async=bool(cfg.train.async_checkpoint))
    latest = ckpt.latest_step()
    if latest is not None:               # checked before any model loads
        meta = ckpt.read_meta(latest)
        if meta.get("mode") != mode:
            ckpt.close()
            raise ValueError(f"{workdir} holds a {meta.get('mode')} run; this command is {mode}: use another workdir")
        if latest > total:
            ckpt.close()
            raise ValueError(f"{workdir} holds a {mode} run at step {latest}, past this command's {total} steps: "
                             f"raise the steps (train.steps) or use another workdir")
    # a finished run (its last checkpoint and final_metrics.json written) is kept as it is: its results
    # are returned, nothing is trained, exported or rewritten
    saved = parallel.process_allgather_objects(_read_json(final_path) if latest == total and primary else None)[0]
    if saved is not None and models is None:
        ckpt.close()
        if progress:
            print(f"{mode} in {workdir} already finished ({total} steps): nothing to do; its results stay as they "
                  f"are ({final_path})", flush=True)
        return saved
    used = prepare_models(cfg, mode, mesh, models)
    runner = build_runner(cfg, mode, mesh, used)
    if isinstance(runner, SFTVDM):           # cached examples are not decoded (train.sft_vdm.latent_cache)
        source = runner.cached_source(source)
    data = HostBatches(source, batch_size=bs, num_shards=num_shards, seed=int(cfg.seed),
                       num_workers=int(cfg.data.num_workers))
    start = 0
    if latest is not None:
        parts, data_state, meta = ckpt.restore(latest, {k: p.ckpt_items() for k, p in runner.parts.items()})
        for k, p in runner.parts.items():
            p.restore_items(parts[k])
        data.set_state(data_state)
        start = int(meta["step"])
        if progress:
            print(f"resumed {mode} from {ckpt.directory} at step {start}/{total}", flush=True)

    from .metrics import create_writer
    writer = create_writer(os.path.join(workdir, "tb"), primary=primary)
    jsonl_path = os.path.join(workdir, "metrics.jsonl")
    # the rows of steps after the checkpoint (logged before a kill) are replayed now: dropped, not duplicated
    logged = _trim_metrics_jsonl(jsonl_path, start) if primary else []
    jsonl = open(jsonl_path, "a") if primary else None

    def close():
        ckpt.close()
        writer.flush()
        writer.close()
        if jsonl is not None:
            jsonl.close()

    base = jax.random.key(int(cfg.seed))
    log_every = max(1, int(cfg.train.log_every))
    t_first, done_here, last = time.perf_counter(), 0, {}
    skipped_total = 0
    pending: list[tuple[int, dict]] = []     # steps whose metrics are still (partly) on the device
    t_flush = time.perf_counter()

    def flush():
        """Brings the pending steps' metrics to the host (one transfer) and writes them."""
        nonlocal skipped_total, last, t_flush
        if not pending:
            return
        host = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        per_step = (now - t_flush) / len(pending)    # SFT steps are asynchronous: wall time over the chunk
        t_flush = now
        n_skipped = float(sum(parallel.process_allgather_objects(data.num_skipped())))
        for (step, _), m in zip(pending, host):
            m = {k: v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v for k, v in m.items()}
            if "media" in m and primary:
                media.write_media(writer, step, m.pop("media"))
            m.pop("media", None)
            if "target_tokens_in_batch" in m or "frames_in_batch" in m:
                m["time/step_s"] = per_step
                if "target_tokens_in_batch" in m:
                    m["throughput/tokens_per_s"] = float(m.pop("target_tokens_in_batch")) / max(per_step, 1e-9)
                if "frames_in_batch" in m:
                    m["throughput/frames_per_s"] = float(m.pop("frames_in_batch")) / max(per_step, 1e-9)
            skipped = float(m.get("skipped_step", 0.0)) + float(m.get("skipped_rewards", 0.0))
            skipped += sum(float(m[k]) for k in m if k.endswith("/skipped_step"))
            skipped_total += int(skipped > 0)
            m["skipped_total"] = float(skipped_total)
            m["data/skipped_samples"] = n_skipped
            scal = _scalars(m)
            writer.write_scalars(step, scal)
            if "sample_text" in m:
                writer.write_texts(step, {"sample": str(m["sample_text"])})
            if jsonl is not None:
                jsonl.write(json.dumps(dict(scal, step=step)) + "\n")
            if skipped > 0 and progress:
                print(f"step {step}: non-finite loss/gradient/reward, update skipped ({skipped_total} so far)",
                      flush=True)
            last = m
        if jsonl is not None:
            jsonl.flush()
        pending.clear()
        if progress:
            scal = _scalars(last)
            el = time.perf_counter() - t_first
            eta = el / (done_here - 1) * (total - last_step) if done_here > 1 else None
            keys = [k for k in ("loss", "reward/total", "vlm/loss", "dit/loss", "vlm/kl", "dit/kl",
                                "vlm/clip_fraction", "dit/clip_fraction", "token_accuracy") if k in scal]
            body = " ".join(f"{k}={scal[k]:.4g}" for k in keys)
            print(f"[{mode}] step {last_step}/{total} {body} {scal.get('time/step_s', 0):.2f}s/step "
                  f"ETA {_fmt_eta(eta) if eta is not None else '? (the first step compiles)'}", flush=True)

    last_step = start
    for step in range(start + 1, total + 1):
        examples = next(data)
        with jax.set_mesh(mesh):        # activation sharding constraints (parallel.constrain) apply
            m = runner.step(examples, step, jax.random.fold_in(base, step))
        pending.append((step, m))
        done_here += 1
        last_step = step
        if done_here == 1:               # the ETA counts from the end of the first step (compiling excluded)
            jax.block_until_ready(m)
            t_first = time.perf_counter()
        stopping = stop_after is not None and done_here >= stop_after
        save = ckpt.should_save(step, step == total)
        if step % log_every == 0 or step == total or save or stopping:
            flush()
        if save:
            parts = {k: p.ckpt_items() for k, p in runner.parts.items()}
            ckpt.save(step, parts, data.get_state(), {"step": step, "mode": mode})
        if stopping:
            close()
            return _scalars(last)
    close()
    if saved is not None:                # finished before: its results as they are (the models restored)
        final = dict(saved)
    else:
        if not last:                     # killed after the last checkpoint, before final_metrics.json
            last = next((r for r in reversed(logged) if r.get("step") == total), {})
        final = _scalars(last)
        final["step"] = total
        if cfg.train.export:
            final["exports"] = export_parts(cfg, runner, os.path.join(workdir, "export"),
                                            link=bool(cfg.train.export_link))
        if primary:
            write_json(final_path, final)
    if models is not None:
        final["models"] = trained_models(runner, used, models)
    return final


def main_train(cfg) -> int:
    try:
        parallel.initialize_distributed()   # multi-host: coordinator from JAX_* / SLURM_* variables; else a no-op
        final = train(cfg)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"vans-jax train: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in final.items() if not isinstance(v, dict)}, indent=None)[:2000])
    return 0


__all__ = ["MODES", "LoadedModels", "train", "preflight", "export_parts", "build_runner", "prepare_models", "trained_models",
           "add_lora", "merged_vlm", "copy_module", "main_train", "HostBatches", "check_batching"]
