"""The pieces every training step shares: the train state, the optimizer from config, the split of a
model into what trains and what is frozen, and one jitted update with NaN/Inf skipping.

A step is a pure function of (graphdef, state, frozen, batch) under ``jax.jit``; the state is
donated, the RNG lives in the state and is folded with the step number, so a restored run draws
exactly the numbers an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..models.layers import LoRAParam

TRAINABLE = ("lora", "full")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer updates applied
    params: Any              # the trainable nnx.State (LoRA adapters, or every parameter)
    opt_state: Any
    rng: jax.Array           # raw uint32 key data (checkpointable)
    skipped: jax.Array       # int32 scalar: updates skipped for a non-finite loss or gradient

    @property
    def key(self):
        return jax.random.wrap_key_data(self.rng)


def module_groups(what: str) -> tuple[str, ...]:
    """The module groups of a ``trainable`` that names them ("proj_out,scale_shift_table"), () for
    "lora" / "full"."""
    if what in TRAINABLE:
        return ()
    groups = tuple(g.strip() for g in str(what).split(",") if g.strip())
    if not groups:
        raise ValueError(f"trainable must be one of {TRAINABLE} or a comma-separated list of module groups, "
                         f"got {what!r}")
    return groups


def _in_groups(path, groups) -> bool:
    from ..rl.stages import param_group
    g = param_group(path)
    return any(g == want or g.startswith(want + ".") for want in groups)


def trainable_filter(what: str):
    """``what``: "lora" (the LoRA adapters), "full" (every parameter), or module groups
    (``rl.stages.param_group`` names, comma-separated: "proj_out,scale_shift_table"; "blocks" takes
    every ``blocks.*``): those groups' parameters, the rest frozen."""
    if what == "lora":
        return LoRAParam
    if what == "full":
        return nnx.Param
    groups = module_groups(what)
    return nnx.All(nnx.Param, lambda path, x: _in_groups(path, groups))


def split_model(model: nnx.Module, what: str):
    """(graphdef, trainable state, frozen state). ``what``: ``trainable_filter``'s."""
    graphdef, params, frozen = nnx.split(model, trainable_filter(what), ...)
    if not jax.tree.leaves(params):
        hint = ""
        if what == "lora":
            hint = " (no LoRA adapters: set a LoRA config)"
        elif what not in TRAINABLE:
            from ..rl.stages import param_group
            names = sorted({param_group(p) for p, _ in jax.tree_util.tree_flatten_with_path(
                nnx.state(model, nnx.Param))[0]})
            hint = f" (no parameter in those module groups; the model's groups: {', '.join(names)})"
        raise ValueError(f"the model has nothing to train with trainable={what!r}{hint}")
    return graphdef, params, frozen


def make_schedule(cfg) -> optax.Schedule:
    """Constant (default), linear warmup then constant, or warmup + cosine decay to ``final_lr_ratio``."""
    lr = float(cfg.lr)
    warmup = int(cfg.get("warmup_steps", 0))
    kind = cfg.get("schedule", "constant")
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                    [warmup]) if warmup else optax.constant_schedule(lr)
    if kind == "cosine":
        steps = int(cfg.steps)
        return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, max(warmup, 1), max(steps, warmup + 1),
                                                  lr * float(cfg.get("final_lr_ratio", 0.0)))
    raise ValueError(f"unknown schedule {kind!r}; expected 'constant' or 'cosine'")


class ParamEmaState(NamedTuple):
    count: jax.Array     # int32: updates seen
    ema: Any             # float32, laid out like the parameters


def param_ema(decay: float) -> optax.GradientTransformation:
    """An exponential moving average of the parameters, kept in the optimizer state (so it is
    checkpointed, restored and sharded like the moments). Last in a chain: the updates it sees are
    final, so it averages the parameters after each update: ``ema = d * ema + (1 - d) * (params +
    updates)`` with ``d = min(decay, (1 + n) / (10 + n))`` at the n-th update (n = 0, 1, ...; the
    usual warm-up, so early weights do not dominate). The updates pass through unchanged; a skipped
    (non-finite) step leaves it untouched (``apply_gradients`` keeps the whole optimizer state)."""
    decay = float(decay)
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {decay}")

    def init(params):
        return ParamEmaState(jnp.zeros([], jnp.int32), jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("param_ema needs the parameters (optax's update(updates, state, params))")
        n = state.count.astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p, u: d * e + (1.0 - d) * (p.astype(jnp.float32) + u.astype(jnp.float32)),
                           state.ema, params, updates)
        return updates, ParamEmaState(state.count + 1, ema)

    return optax.GradientTransformation(init, update)


def ema_params(state: TrainState):
    """The parameter EMA of ``state`` (``param_ema`` in its optimizer), cast to the parameters'
    dtypes; None without one."""
    found = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, ParamEmaState))
             if isinstance(x, ParamEmaState)]
    if not found:
        return None
    return jax.tree.map(lambda e, p: e.astype(p.dtype), found[0].ema, state.params)


# every key ``make_schedule`` / ``make_optimizer`` read: what an optimizer (and a compiled update step
# built with it) depends on, and nothing else of the mode's config section
OPTIMIZER_KEYS = ("lr", "warmup_steps", "schedule", "steps", "final_lr_ratio", "grad_clip", "optimizer", "b1", "b2",
                  "eps", "weight_decay", "ema_decay")


def optimizer_settings(cfg) -> dict:
    """The optimizer's settings in ``cfg`` (``OPTIMIZER_KEYS`` present there)."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: d[k] for k in OPTIMIZER_KEYS if k in d}


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW (the paper's; betas, eps, weight decay from config) behind global-norm clipping; with
    ``ema_decay`` > 0 a parameter EMA after it (``param_ema``)."""
    parts = []
    clip = cfg.get("grad_clip", None)
    if clip:
        parts.append(optax.clip_by_global_norm(float(clip)))
    name = cfg.get("optimizer", "adamw")
    sched = make_schedule(cfg)
    if name == "adamw":
        parts.append(optax.adamw(sched, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                                 eps=float(cfg.get("eps", 1e-8)), weight_decay=float(cfg.get("weight_decay", 0.0))))
    elif name == "sgd":
        parts.append(optax.sgd(sched))
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected 'adamw' or 'sgd'")
    if float(cfg.get("ema_decay", 0.0) or 0.0) > 0.0:
        parts.append(param_ema(float(cfg.ema_decay)))
    return optax.chain(*parts)


def init_state(params, optimizer: optax.GradientTransformation, seed: int, mesh=None) -> TrainState:
    """With ``mesh``, the optimizer moments are created sharded exactly like the parameters
    (``jax.jit(optimizer.init)`` alone would not propagate the parameters' shardings)."""
    if mesh is None:
        opt_state = jax.jit(optimizer.init)(params)
    else:
        from .. import parallel
        pshard = tree_shardings(params, mesh)
        out = parallel.optimizer_state_shardings(jax.eval_shape(optimizer.init, params), params, pshard, mesh)
        opt_state = jax.jit(optimizer.init, out_shardings=out)(params)
    return TrainState(step=jnp.int32(0), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(jax.random.key(seed)), skipped=jnp.int32(0))


def tree_shardings(tree, mesh):
    """Each array's NamedSharding on ``mesh`` (arrays without one - scalars, single-device
    arrays - are replicated), so jitted steps get the same shardings in and out and never
    recompile for a sharding change."""
    from jax.sharding import NamedSharding, PartitionSpec

    def one(x):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh == mesh:
            return sh
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree)


def place(tree, mesh):
    """(tree placed with ``tree_shardings``, the shardings)."""
    from .. import parallel
    sh = tree_shardings(tree, mesh)
    return parallel.device_put_global(tree, sh), sh


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def apply_gradients(state: TrainState, grads, loss, optimizer: optax.GradientTransformation):
    """One optimizer update; skipped (parameters and moments untouched, ``skipped`` += 1) when the
    loss or any gradient is NaN/Inf. Returns (new state, {grad_norm, skipped_step})."""
    ok = jnp.isfinite(loss) & all_finite(grads)
    safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    updates, new_opt = optimizer.update(safe, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new = TrainState(step=state.step + ok.astype(jnp.int32), params=keep(new_params, state.params),
                     opt_state=keep(new_opt, state.opt_state), rng=state.rng,
                     skipped=state.skipped + (~ok).astype(jnp.int32))
    return new, {"grad_norm": optax.global_norm(safe), "skipped_step": (~ok).astype(jnp.float32)}


def jit_sharded(fn, in_shardings, out_shardings, *, donate_argnums=()):
    """``jax.jit(fn)`` with explicit in/out shardings. An entry of ``in_shardings`` that is None
    (a batch, whose layout is known when it arrives) takes that argument's own shardings
    (``tree_shardings`` on the mesh of the other entries): one compiled function per batch
    structure and layout, so a batch is never silently resharded or replicated."""
    given = [s for s in jax.tree.leaves(in_shardings) if s is not None]
    if not given:
        raise ValueError("jit_sharded: at least one argument needs explicit shardings (they give the mesh)")
    mesh = given[0].mesh
    cache = {}

    def call(*args):
        resolved = tuple(tree_shardings(a, mesh) if s is None else s for a, s in zip(args, in_shardings))
        key = tuple((jax.tree.structure(r), tuple(jax.tree.leaves(r)))
                    for r, s in zip(resolved, in_shardings) if s is None)
        if key not in cache:
            cache[key] = jax.jit(fn, in_shardings=resolved, out_shardings=out_shardings,
                                 donate_argnums=donate_argnums)
        return cache[key](*args)

    return call


def replicated(shardings):
    """The fully replicated sharding on the mesh of ``shardings`` (a tree of NamedShardings)."""
    from jax.sharding import NamedSharding, PartitionSpec
    return NamedSharding(jax.tree.leaves(shardings)[0].mesh, PartitionSpec())


def make_update_step(loss_fn: Callable, optimizer: optax.GradientTransformation, graphdef, *, shardings=None,
                     donate=True):
    """jit(step)(state, frozen, batch) -> (state, metrics), ``graphdef`` static (closed over).

    ``loss_fn(params, graphdef, frozen, batch, rng) -> (loss, metrics dict)``; ``rng`` is the state's
    key folded with the update counter (applied + skipped) and ``batch["update_index"]`` (the
    policy update within one batch of rollouts; 0 if absent).
    ``shardings``: (state, frozen, batch) shardings for explicit in/out shardings: the state comes
    out as it went in, the metrics replicated; batch None = each batch's own (``jit_sharded``).
    None: everything inferred.
    """

    def step(state: TrainState, frozen, batch):
        sub = batch.get("update_index", jnp.int32(0))
        rng = jax.random.fold_in(jax.random.fold_in(state.key, state.step + state.skipped), sub)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, graphdef, frozen, batch,
                                                                           rng)
        new, extra = apply_gradients(state, grads, loss, optimizer)
        return new, dict(metrics, loss=loss, **extra)

    donate_argnums = (0,) if donate else ()
    if shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    st, fr, bt = shardings
    return jit_sharded(step, (st, fr, bt), (st, replicated(st)), donate_argnums=donate_argnums)
