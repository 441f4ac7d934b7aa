"""``vans-jax memory-plan``: bytes per device of parameters, gradients, optimizer state and
activations for the full VANS training steps, per mesh shape and remat policy.

Workloads (from the experiment config, e.g. ``configs/vans.py``):

- ``vlm_stage1``: Qwen2.5-VL-3B with LoRA (the config's rank / targets) as in Joint-GRPO Stage 1;
  trainable = the LoRA adapters. Loss: token cross-entropy of G completions of
  ``generation.max_new_tokens`` tokens after one video prompt (``completion_logprobs``, the
  quantity the Stage-1 GRPO loss differentiates), G = ``train.grpo.group_size``.
- ``dit_stage2``: the Wan2.1-1.3B DiT fully fine-tuned as in Stage 2 / SFT; trainable = every
  parameter. Loss: velocity MSE on ``video.n_ref`` + target latent frames at
  ``video.height`` x ``video.width`` (6 + 9 frames, 13,200 tokens at 352x640), one video per device.

How each figure is obtained (nothing is estimated by hand):
- parameters: ``nnx.eval_shape`` of the model, each array's shard on the mesh from its logical
  axes (``parallel.state_shardings``): bytes of ``sharding.shard_shape(shape)``;
- gradients: the same for the trainable subset (the step's gradients are sharded like it);
- optimizer: the trainer's optimizer (``train.core.make_optimizer(train.grpo)``: AdamW behind
  global-norm clipping), ``jax.eval_shape`` of its state, sharded like the trainable parameters
  (``parallel.optimizer_state_shardings``; step counts replicated): bytes of each shard;
- activations: ``memory_analysis().temp_size_in_bytes`` of the compiled, sharded
  ``value_and_grad`` of the loss (abstract inputs, fake CPU devices for the mesh). This is the peak
  of everything the step allocates besides its inputs and outputs: saved activations, gathered
  FSDP parameters, collectives' buffers, the backward pass's temporaries.

Caveats (also written into the output): the compile is XLA:CPU's, which computes bf16 ops in fp32
and keeps their intermediates as fp32 (at 2 DiT layers the bf16 and fp32 steps compile to the same
temp size), so for bf16 on GPU/TPU the activation figures are upper bounds; attention is the
``chunked`` implementation (query blocks, recomputed in the backward pass), standing in for flash
attention (cuDNN / Pallas), which keeps even less; run the command on the accelerator itself
(``--platform default``) for its own compiler's figures where the mesh fits its devices.

``--seq-parallel ring ulysses`` adds DiT rows, on meshes with a ``sequence`` axis, whose
self-attention keeps keys/values sharded over it (ring attention or all-to-all over heads) next to
today's rows (keys/values gathered).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vans_jax import parallel

GB = 1e9
# HBM per chip as the vendors state it (GB = 1e9 bytes).
ACCELERATORS: tuple[tuple[str, float], ...] = (("H100 80GB", 80 * GB), ("H200 141GB", 141 * GB),
                                               ("TPU v5e 16GB", 16 * GB), ("TPU v5p 95GB", 95 * GB))
HEADROOM = 0.9    # a plan "fits" when its total is at most this fraction of the chip's memory
DEFAULT_MESHES = ("1", "fsdp=8", "fsdp=4,tensor=2", "fsdp=4,sequence=2", "fsdp=64")
REMATS = ("none", "dots", "full")      # in order of increasing recomputation
WORKLOADS = ("vlm_stage1", "dit_stage2")


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    vlm_video_hw: tuple[int, int] = (720, 1280)   # source frames for the VLM (native size, bounded by max_pixels)
    prompt_text_tokens: int = 100                 # system prompt + chat template + question, around the video
    attn_impl: str = "chunked"
    seq_parallel: tuple[str, ...] = ("none",)     # the DiT's self-attention on meshes with a sequence axis:
                                                  # "none" (keys/values gathered), "ring", "ulysses"
    platform: str = "cpu"                         # "cpu": fake CPU devices; "default": the default backend's


def parse_mesh(text: str) -> dict[str, int]:
    """"1" -> one device; "8" -> fsdp=8; "fsdp=4,tensor=2" -> {"fsdp": 4, "tensor": 2}."""
    text = text.strip()
    if text.isdigit():
        n = int(text)
        return {} if n == 1 else {"fsdp": n}
    shape = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"mesh {text!r}: expected 'N' or 'axis=size,...' (axes {parallel.MESH_AXES})")
        axis, size = part.split("=", 1)
        axis = axis.strip()
        if axis not in parallel.MESH_AXES:
            raise ValueError(f"mesh {text!r}: unknown axis {axis!r}; expected one of {parallel.MESH_AXES}")
        if not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"mesh {text!r}: size of {axis!r} must be a positive integer")
        shape[axis] = int(size)
    return shape


def mesh_devices(shape: dict[str, int]) -> int:
    return int(np.prod(list(shape.values()) or [1]))


def batch_degree(mesh) -> int:
    """How many ways the batch splits: the mesh axes the logical axis ``batch`` maps to."""
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs carrying shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------- workloads


@dataclasses.dataclass
class Workload:
    name: str
    description: str
    make_model: Callable[..., nnx.Module]                        # (remat, seq_parallel) -> model (eval_shape'd)
    trainable: Any                                               # nnx filter
    make_inputs: Callable[[Any], tuple[dict, tuple]]             # mesh -> (shape info, abstract inputs)
    loss: Callable[..., jax.Array]                               # (model, *inputs) -> scalar
    optimizer_config: Any


def vlm_stage1(cfg, settings: PlanSettings) -> Workload:
    from vans_jax.models import qwen2_5_vl as qwen
    from vans_jax.models.qwen2_5_vl import processor
    from vans_jax.sampling.text import completion_logprobs
    from vans_jax.train.core import trainable_filter

    lc = cfg.vlm.lora
    lora = qwen.LoRAConfig(rank=int(lc.rank), alpha=float(lc.alpha), dropout=float(lc.dropout),
                           targets=tuple(lc.targets), include_vision=bool(lc.include_vision))
    model_dict = cfg.vlm.model.to_dict()

    def make_model(remat, seq_parallel="none"):
        mcfg = qwen.Qwen2_5_VLConfig.from_hf_dict(model_dict, dtype=cfg.vlm.dtype, attn_impl=settings.attn_impl,
                                                  remat=remat)
        return qwen.Qwen2_5_VLModel(mcfg, rngs=nnx.Rngs(0), lora=lora)

    mcfg = qwen.Qwen2_5_VLConfig.from_hf_dict(model_dict)
    v = mcfg.vision
    g, n_new = int(cfg.train.grpo.group_size), int(cfg.generation.max_new_tokens)
    pad = int(cfg.train.get("pad_multiple", 64))
    h, w = processor.smart_resize(*settings.vlm_video_hw, factor=v.patch_size * v.spatial_merge_size,
                                  min_pixels=int(cfg.vlm.video_min_pixels), max_pixels=int(cfg.vlm.video_max_pixels))
    frames = int(cfg.vlm.num_frames)
    grid = np.array([-(-frames // v.temporal_patch_size), h // v.patch_size, w // v.patch_size], np.int64)
    n_video = int(grid.prod()) // v.spatial_merge_size ** 2
    n_text = int(settings.prompt_text_tokens)
    prompt_len = -(-(n_text + 2 + n_video) // pad) * pad

    def make_inputs(mesh):
        degree = batch_degree(mesh)
        prompts = max(1, -(-degree // g))          # one GRPO group per prompt; enough rows for every device
        ids = np.zeros((prompts, prompt_len), np.int64)   # left-padded: text, <vision_start>, video, <vision_end>, text
        mask = np.zeros_like(ids)
        body = ([0] * (n_text // 2) + [mcfg.vision_start_token_id] + [mcfg.video_token_id] * n_video
                + [mcfg.vision_end_token_id] + [0] * (n_text - n_text // 2))
        ids[:, -len(body):], mask[:, -len(body):] = body, 1
        patches = prompts * int(grid.prod())
        pixels = np.zeros((patches, v.in_channels * v.temporal_patch_size * v.patch_size ** 2), np.float32)
        batch = qwen.prepare_inputs(mcfg, ids, mask, pixels, np.repeat(grid[None], prompts, 0),
                                    np.full(prompts, v.temporal_patch_size / float(cfg.vlm.sample_fps), np.float32))
        batch.pop("rope_deltas")
        replicated = NamedSharding(mesh, P())
        rows = NamedSharding(mesh, parallel.logical_to_spec(("batch", None), mesh=mesh, shape=(prompts * g, n_new)))
        batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), batch)
        completions = jax.ShapeDtypeStruct((prompts * g, n_new), jnp.int32, sharding=rows)
        cmask = jax.ShapeDtypeStruct((prompts * g, n_new), jnp.bool_, sharding=rows)
        info = dict(prompts=prompts, rows=prompts * g, rows_per_device=prompts * g / degree, prompt_tokens=prompt_len,
                    video_tokens=n_video, video_grid_thw=grid.tolist(), vlm_frame_hw=[h, w],
                    completion_tokens=n_new, sequence_tokens=prompt_len + n_new)
        return info, (batch, completions, cmask)

    def loss(model, batch, completions, cmask):
        lp = completion_logprobs(model, batch, completions, cmask)
        return -jnp.sum(lp) / jnp.maximum(jnp.sum(cmask), 1)

    return Workload(
        "vlm_stage1", f"Qwen2.5-VL ({mcfg.text.num_hidden_layers} layers, hidden {mcfg.text.hidden_size}) + LoRA "
        f"r={lora.rank} on {','.join(lora.targets)}; token CE of G={g} completions x {n_new} tokens after one "
        f"{frames}-frame video prompt", make_model, trainable_filter("lora"), make_inputs, loss, cfg.train.grpo)


def dit_stage2(cfg, settings: PlanSettings) -> Workload:
    from vans_jax.models.wan.dit import WanConfig, WanTransformer3D
    from vans_jax.train.core import trainable_filter

    fields = {f.name for f in dataclasses.fields(WanConfig)}
    model_kw = {k: v for k, v in cfg.vdm.model.to_dict().items() if k in fields}
    base = WanConfig(**model_kw)
    n_ref = int(cfg.video.n_ref)
    t_lat = (int(cfg.video.num_frames) - 1) // 4 + 1
    lat_h, lat_w = int(cfg.video.height) // 8, int(cfg.video.width) // 8
    text_len = int(base.text_len)
    dtype = jnp.dtype(cfg.vdm.dtype)

    def make_model(remat, seq_parallel="none"):
        c = dataclasses.replace(base, dtype=cfg.vdm.dtype, param_dtype=cfg.vdm.dtype, attn_impl=settings.attn_impl,
                                remat=remat, seq_parallel=seq_parallel)
        return WanTransformer3D(c, rngs=nnx.Rngs(0))

    def make_inputs(mesh):
        b = batch_degree(mesh)                     # one video per batch shard
        sh = lambda shape: NamedSharding(mesh, parallel.logical_to_spec(("batch",), mesh=mesh, shape=shape))
        S = jax.ShapeDtypeStruct
        x = (b, base.in_channels, n_ref + t_lat, lat_h, lat_w)
        target = (b, base.out_channels, t_lat, lat_h, lat_w)
        ctx = (b, text_len, base.text_dim)
        inputs = (S(x, dtype, sharding=sh(x)), S((b,), jnp.float32, sharding=sh((b,))),
                  S(ctx, dtype, sharding=sh(ctx)), S(target, jnp.float32, sharding=sh(target)))
        pt, ph, pw = base.patch_size
        tokens = (n_ref + t_lat) // pt * (lat_h // ph) * (lat_w // pw)
        info = dict(videos=b, videos_per_device=1, latent_frames=[n_ref, t_lat], latent_hw=[lat_h, lat_w],
                    tokens=tokens, text_len=text_len)
        return info, inputs

    def loss(model, x, t, ctx, target):
        vel = model(x, t, ctx, n_ref=n_ref)
        return jnp.mean((vel.astype(jnp.float32) - target) ** 2)

    return Workload(
        "dit_stage2", f"Wan2.1 DiT (dim {base.dim}, {base.num_layers} layers), all parameters trained; velocity "
        f"MSE on {n_ref}+{t_lat} latent frames at {cfg.video.height}x{cfg.video.width}", make_model,
        trainable_filter("full"), make_inputs, loss, cfg.train.grpo)


WORKLOAD_BUILDERS = {"vlm_stage1": vlm_stage1, "dit_stage2": dit_stage2}


# ----------------------------------------------------------------------------- planning


def devices_for(n: int, platform: str):
    if platform == "cpu":
        devices = jax.devices("cpu")
        hint = (f"run `vans-jax memory-plan` in a fresh process (it asks for enough CPU devices before JAX "
                f"starts) or set XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    elif platform == "default":
        devices = jax.devices()
        hint = "use --platform cpu for meshes larger than this machine"
    else:
        raise ValueError(f"platform must be 'cpu' or 'default', got {platform!r}")
    if len(devices) < n:
        raise ValueError(f"a mesh of {n} devices needs {n} {platform} devices; this process has {len(devices)}: {hint}")
    return devices[:n]


def request_cpu_devices(n: int):
    """Asks JAX for ``n`` CPU devices (only possible before its CPU backend starts)."""
    try:
        if n > jax.config.jax_num_cpu_devices:
            jax.config.update("jax_num_cpu_devices", n)
    except (RuntimeError, ValueError, AttributeError):
        pass    # backend already started: devices_for reports the shortfall


def plan_one(w: Workload, mesh_shape: dict[str, int], remat: str, settings: PlanSettings,
             seq_parallel: str = "none") -> dict:
    from vans_jax.train.core import make_optimizer

    n = mesh_devices(mesh_shape)
    mesh = parallel.make_mesh(mesh_shape or {"data": 1}, devices_for(n, settings.platform))
    t0 = time.perf_counter()
    abstract = nnx.eval_shape(lambda: w.make_model(remat, seq_parallel))
    graphdef, trainable, frozen = nnx.split(abstract, w.trainable, ...)
    t_sh = parallel.state_shardings(trainable, mesh)
    f_sh = parallel.state_shardings(frozen, mesh)
    trainable_sds, frozen_sds = _with_shardings(trainable, t_sh), _with_shardings(frozen, f_sh)

    optimizer = make_optimizer(w.optimizer_config)
    opt_abstract = jax.eval_shape(optimizer.init, trainable_sds)
    opt_sds = _with_shardings(opt_abstract, parallel.optimizer_state_shardings(opt_abstract, trainable, t_sh, mesh))

    info, inputs = w.make_inputs(mesh)

    def step(tr, fr, *args):
        return jax.value_and_grad(lambda p: w.loss(nnx.merge(graphdef, p, fr), *args))(tr)

    jitted = jax.jit(step, out_shardings=(NamedSharding(mesh, P()), t_sh))
    t1 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jitted.lower(trainable_sds, frozen_sds, *inputs).compile()
    mem = compiled.memory_analysis()
    params = per_device_bytes(trainable_sds) + per_device_bytes(frozen_sds)
    grads = per_device_bytes(trainable_sds)
    opt = per_device_bytes(opt_sds)
    act = int(mem.temp_size_in_bytes)
    total = params + grads + opt + act
    mesh_text = ",".join(f"{k}={v}" for k, v in mesh_shape.items()) or "1"
    return dict(
        workload=w.name, mesh=mesh_shape or {"devices": 1}, mesh_text=mesh_text, devices=n, remat=remat,
        seq_parallel=seq_parallel, batch=info,
        trainable_parameters=int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable))),
        total_parameters=int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))),
        bytes=dict(params=params, grads=grads, optimizer=opt, activations=act, total=total),
        compiled=dict(argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                      temp_bytes=act, compile_s=time.perf_counter() - t1, total_s=time.perf_counter() - t0),
        fits={name: total <= HEADROOM * cap for name, cap in ACCELERATORS})


def run(cfg, output: str | None = None, *, meshes: Sequence[str] = DEFAULT_MESHES, remats: Sequence[str] = REMATS,
        workloads: Sequence[str] = WORKLOADS, settings: PlanSettings = PlanSettings(),
        progress: Callable[[str], None] | None = print) -> dict:
    bad = [r for r in remats if r not in REMATS]
    if bad:
        raise ValueError(f"unknown remat policies {bad}; expected a subset of {REMATS}")
    unknown = [x for x in workloads if x not in WORKLOAD_BUILDERS]
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; expected a subset of {WORKLOADS}")
    bad = [k for k in settings.seq_parallel if k not in parallel.SEQ_PARALLEL]
    if bad:
        raise ValueError(f"unknown sequence parallelism {bad}; expected a subset of {parallel.SEQ_PARALLEL}")
    shapes = [(m, parse_mesh(m)) for m in meshes]
    if settings.platform == "cpu":
        request_cpu_devices(max(mesh_devices(s) for _, s in shapes))
    rows, skipped = [], []
    started = time.perf_counter()
    for name in workloads:
        w = WORKLOAD_BUILDERS[name](cfg, settings)
        for text, shape in shapes:
            for remat, sp in ((r, k) for r in remats for k in settings.seq_parallel):
                if sp != "none" and (name != "dit_stage2" or shape.get("sequence", 1) == 1):
                    continue        # only the DiT's self-attention has it, and only over a sequence axis
                try:
                    row = plan_one(w, shape, remat, settings, sp)
                except ValueError as e:
                    if sp == "none":
                        raise
                    skipped.append(dict(workload=name, mesh_text=text, remat=remat, seq_parallel=sp, reason=str(e)))
                    if progress:
                        progress(f"memory-plan: {name} mesh {text} remat {remat} seq-parallel {sp}: skipped ({e})")
                    continue
                rows.append(row)
                if progress:
                    b = row["bytes"]
                    kind = "" if sp == "none" else f" seq-parallel {sp}"
                    progress(f"memory-plan: {name} mesh {text} remat {remat}{kind}: params {b['params'] / GB:.2f} "
                             f"grads {b['grads'] / GB:.2f} optimizer {b['optimizer'] / GB:.2f} activations "
                             f"{b['activations'] / GB:.2f} total {b['total'] / GB:.2f} GB per device "
                             f"({row['compiled']['compile_s']:.0f} s compile)")
    result = dict(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        jax=jax.__version__, platform=settings.platform,
        settings=dataclasses.asdict(settings), accelerators=dict(ACCELERATORS), headroom=HEADROOM,
        workloads={name: WORKLOAD_BUILDERS[name](cfg, settings).description for name in workloads},
        method=dict(
            params="nnx.eval_shape + logical-axis sharding rules: bytes of each array's shard",
            grads="the trainable parameters' shards (gradients are sharded like them)",
            optimizer="jax.eval_shape of train.core.make_optimizer(train.grpo).init, moments sharded like the "
                      "trainable parameters (parallel.optimizer_state_shardings): bytes of each shard",
            activations="memory_analysis().temp_size_in_bytes of the compiled sharded value_and_grad of the loss",
            fits=f"total <= {HEADROOM:.0%} of the chip's memory"),
        caveats=[
            "compiled by XLA:CPU (fake devices), which computes bf16 in fp32 and keeps those intermediates as fp32: "
            "for bf16 on GPU/TPU the activation figures are upper bounds",
            f"attention '{settings.attn_impl}' (query blocks recomputed in the backward pass) stands in for flash "
            "attention; the plain XLA attention keeps every layer's (heads x L x L) scores",
            "LoRA dropout off; the VLM's vision tower is frozen (no activations kept for it)",
            "the VLM has no sequence-axis activation constraints: a `sequence` mesh axis only replicates its work",
            "DiT rows with seq-parallel 'ring' / 'ulysses': the self-attention keeps keys/values sharded over "
            "`sequence` (parallel.sequence_parallel_attention); 'none' rows gather them on every device"],
        total_seconds=time.perf_counter() - started, rows=rows, skipped=skipped)
    if output:
        json_path, md_path = output_paths(output)
        os.makedirs(os.path.dirname(os.path.abspath(json_path)) or ".", exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        with open(md_path, "w") as f:
            f.write(markdown(result))
    return result


def output_paths(output: str) -> tuple[str, str]:
    root, ext = os.path.splitext(output)
    if ext == ".md":
        return root + ".json", output
    return (output, root + ".md") if ext == ".json" else (output + ".json", output + ".md")


def recommendations(result: dict) -> dict:
    """{workload: {mesh: {accelerator: the least recomputing remat policy that fits, or None}}}."""
    out: dict = {}
    for row in result["rows"]:
        sp = row.get("seq_parallel", "none")
        mesh = row["mesh_text"] + ("" if sp == "none" else f" ({sp})")
        per_mesh = out.setdefault(row["workload"], {}).setdefault(mesh, {})
        for acc, ok in row["fits"].items():
            best = per_mesh.get(acc)
            if ok and (best is None or REMATS.index(row["remat"]) < REMATS.index(best)):
                per_mesh[acc] = row["remat"]
            per_mesh.setdefault(acc, None)
    return out


def markdown(result: dict) -> str:
    accs = list(result["accelerators"])
    lines = [f"# Memory plan ({result['created']}, JAX {result['jax']}, compiled for {result['platform']})", ""]
    for name, desc in result["workloads"].items():
        lines += [f"## {name}: {desc}", "",
                  "| mesh | devices | batch / device | remat | seq-parallel | params | grads | optimizer | activations "
                  "| total | " + " | ".join(accs) + " |",
                  "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(accs)]
        for r in (r for r in result["rows"] if r["workload"] == name):
            b = r["bytes"]
            per_dev = r["batch"].get("rows_per_device", r["batch"].get("videos_per_device"))
            unit = ("row" if "rows_per_device" in r["batch"] else "video") + ("" if per_dev == 1 else "s")
            lines.append(f"| {r['mesh_text']} | {r['devices']} | {per_dev:g} {unit} | {r['remat']} | "
                         f"{r.get('seq_parallel', 'none')} | "
                         + " | ".join(f"{b[k] / GB:.2f}" for k in ("params", "grads", "optimizer", "activations",
                                                                   "total"))
                         + " | " + " | ".join("yes" if r["fits"][a] else "no" for a in accs) + " |")
        lines.append("")
    for sk in result.get("skipped", []):
        lines.append(f"- not planned: {sk['workload']} mesh {sk['mesh_text']} remat {sk['remat']} seq-parallel "
                     f"{sk['seq_parallel']}: {sk['reason']}")
    lines += ["GB = 1e9 bytes per device. " f"Fits: {result['method']['fits']}.", "",
              "## Least recomputing remat policy that fits", "",
              "| workload | mesh | " + " | ".join(accs) + " |", "|---|---|" + "---|" * len(accs)]
    for name, meshes in recommendations(result).items():
        for mesh, per_acc in meshes.items():
            lines.append(f"| {name} | {mesh} | " + " | ".join(per_acc[a] or "none fits" for a in accs) + " |")
    lines += ["", "How the figures are computed:", ""]
    lines += [f"- {k}: {v}" for k, v in result["method"].items()]
    lines += ["", "Caveats:", ""] + [f"- {c}" for c in result["caveats"]]
    return "\n".join(lines) + "\n"
