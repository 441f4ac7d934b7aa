"""Device mesh, logical-axis rules and sharding helpers.

Every parameter carries a tuple of *logical* axis names in its ``axes`` metadata
(e.g. ``("embed", "mlp")``). One rules table maps logical names to mesh axes; the
sharding of any state follows from it. Parameters stacked over layers (scanned
blocks) have one more dimension than names; that leading dimension is the logical
axis ``"layers"``, which is never sharded by default.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters, gradients
and optimizer state sharded), ``sequence`` (the token axis of activations: long video token
counts; attention gathers keys/values, or passes them around a ring: ``sequence_parallel_attention``),
``tensor`` (heads / MLP width). Axes of size 1 vanish
from every spec, so a mesh that does not use an axis behaves as if it did not exist.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),   # ZeRO-3 over every data-parallel-like axis (sequence groups too)
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("lora_rank", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("patch", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("text_embed", "fsdp"),
    ("time_embed", None),
    ("modulation", None),
    ("cache_length", None),
)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a (data, fsdp, sequence, tensor) mesh; missing axes have size 1, one axis may be
    -1 (= all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Iterable[str | None] | None, rules=DEFAULT_RULES, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for logical axis names. With ``mesh`` and ``shape`` given, a mesh axis
    that does not divide its dimension (or is already used) is dropped, so odd sizes replicate
    instead of failing."""
    if axes is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        keep = []
        for t in targets:
            if t in used:
                continue
            if mesh is not None:
                size = mesh.shape.get(t, 1)     # an axis the mesh lacks acts as size 1
                if size == 1:
                    continue
                if shape is not None and shape[i] % (size * int(np.prod([mesh.shape[k] for k in keep] or [1]))):
                    continue
            keep.append(t)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def variable_axes(var: nnx.Variable) -> tuple | None:
    """Logical axes of a variable, with ``layers`` prepended for scanned (stacked) params."""
    axes = var.get_metadata().get("axes")
    if axes is None:
        return None
    ndim = np.ndim(var.get_value()) if hasattr(var, "get_value") else np.ndim(var.value)
    axes = tuple(axes)
    while len(axes) < ndim:
        axes = ("layers",) + axes
    return axes


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """A pytree of NamedSharding matching ``state`` (Variables replaced by shardings)."""

    def one(v):
        if _is_var(v):
            shape = np.shape(v.get_value())
            spec = logical_to_spec(variable_axes(v), rules, mesh, shape)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=_is_var)


def device_put_global(tree, shardings):
    """``jax.device_put(tree, shardings)`` for values every process holds alike (a checkpoint's
    tensors, constants). With several processes, host values (numpy, scalars, this process's own
    arrays) are placed with ``jax.make_array_from_callback``: each process writes only its own
    shards, where ``device_put`` would first check the value is equal on every process (an
    all-gather of each array across hosts). Global arrays are resharded by ``device_put``."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(one, tree, shardings)


def shard_state(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """Places every array of ``state`` on ``mesh`` according to its logical axes."""
    shardings = state_shardings(state, mesh, rules)
    return device_put_global(state, shardings)


def shard_module(module: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, shard_state(state, mesh, rules))


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None = None, rules=DEFAULT_RULES) -> jax.Array:
    """Activation sharding constraint by logical names. ``mesh`` defaults to the context mesh
    (``with jax.set_mesh(mesh):`` around the jitted call); a no-op without either."""
    if mesh is None:
        mesh = context_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape)))


def context_mesh():
    """The mesh set by ``jax.set_mesh`` (an ``AbstractMesh`` while tracing), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


# ----------------------------------------------------------------------------- sequence parallelism

SEQ_PARALLEL = ("none", "ring", "ulysses")
# (B, L, H, D) queries / keys / values of a self-attention: tokens over `sequence`, heads over `tensor`
SEQUENCE_HEADS = ("activation_batch", "activation_length", "activation_heads", None)


def _sequence_specs(q, axes, rules, mesh):
    spec = logical_to_spec(axes, rules, mesh, q.shape)
    n = mesh.shape.get("sequence", 1)
    if spec[1] != "sequence":
        raise ValueError(f"sequence parallelism: {q.shape[1]} tokens do not divide over the mesh's sequence axis "
                         f"of size {n} (queries {tuple(q.shape)}); pick a mesh whose sequence axis divides the "
                         f"token count, or seq_parallel='none'")
    return spec, n


def sequence_parallel_attention(q, k, v, attn_fn, *, kind: str, scale: float | None = None, mesh=None,
                                axes=SEQUENCE_HEADS, rules=DEFAULT_RULES):
    """Self-attention with tokens sharded over the ``sequence`` mesh axis, without gathering all
    keys/values on every device. q, k, v: (B, L, H, D), the same length and heads (no mask).

    kind "ring": each device keeps its L/n queries and passes its key/value block around the ring
    (``ppermute``), one block at a time, merging blocks with an online softmax (fp32 statistics),
    its queries in chunks of up to ``RING_QUERY_CHUNK``, each chunk's block recomputed in the
    backward pass (scores held: one chunk x L/n). kind "ulysses": two all-to-alls re-shard
    (tokens -> heads), every device runs ``attn_fn(q, k, v)`` (the attention dispatch: splash,
    cudnn, ...) on all tokens of H/n heads, and re-shard back; needs the heads on a device to
    divide by n. ``mesh`` defaults to the context mesh; without one, or with a sequence axis of 1,
    this is ``attn_fn(q, k, v)``.
    """
    if kind not in SEQ_PARALLEL:
        raise ValueError(f"unknown sequence parallelism {kind!r}; expected one of {SEQ_PARALLEL}")
    mesh = context_mesh() if mesh is None else mesh
    if kind == "none" or mesh is None or mesh.shape.get("sequence", 1) == 1:
        return attn_fn(q, k, v)
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"sequence-parallel attention needs q, k, v of one shape; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    spec, n = _sequence_specs(q, axes, rules, mesh)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if kind == "ulysses":
        local_heads = q.shape[2] // (mesh.shape.get(spec[2], 1) if isinstance(spec[2], str) else
                                     int(np.prod([mesh.shape[a] for a in (spec[2] or ())])))
        if local_heads % n:
            raise ValueError(f"ulysses attention: {local_heads} heads per device do not divide over the sequence "
                             f"axis of size {n}; use seq_parallel='ring'")
        body = lambda q, k, v: _ulysses_local(q, k, v, attn_fn)
    else:
        body = lambda q, k, v: _ring_local(q, k, v, n, scale)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _ulysses_local(q, k, v, attn_fn):
    # (b, L/n, h, d) -> (b, L, h/n, d): split heads over the ring, gather tokens
    fwd = lambda x: jax.lax.all_to_all(x, "sequence", split_axis=2, concat_axis=1, tiled=True)
    out = attn_fn(fwd(q), fwd(k), fwd(v))
    return jax.lax.all_to_all(out, "sequence", split_axis=1, concat_axis=2, tiled=True)


RING_QUERY_CHUNK = 512   # queries per block inside a ring step (bounds the step's scores to chunk x L/n)


def _query_chunk(lq: int, most: int) -> int:
    """The largest divisor of ``lq`` <= ``most``; ``lq`` itself when that divisor is small (< 64)."""
    best = max(d for d in range(1, min(lq, most) + 1) if lq % d == 0)
    return best if best >= 64 or best == lq else lq


def _ring_local(q, k, v, n: int, scale: float):
    import jax.numpy as jnp
    b, lq, h, d = q.shape
    perm = [(i, (i + 1) % n) for i in range(n)]
    c = _query_chunk(lq, RING_QUERY_CHUNK)
    nc = lq // c
    # queries in nc chunks of c: (nc, b, c, h, d); running max / sum / output per chunk
    qs = (q.astype(jnp.float32) * scale).reshape(b, nc, c, h, d).transpose(1, 0, 2, 3, 4)

    @jax.checkpoint
    def update(qc, k_blk, v_blk, m, l, acc):
        s = jnp.einsum("bqhd,bkhd->bhqk", qc, k_blk.astype(jnp.float32))
        m_new = jnp.maximum(m, s.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        return (m_new, l * corr + p.sum(-1),
                acc * corr[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p, v_blk.astype(jnp.float32)))

    def step(carry, _):
        k_blk, v_blk, m, l, acc = carry
        m, l, acc = jax.lax.map(lambda t: update(t[0], k_blk, v_blk, *t[1:]), (qs, m, l, acc))
        k_blk, v_blk = jax.lax.ppermute(k_blk, "sequence", perm), jax.lax.ppermute(v_blk, "sequence", perm)
        return (k_blk, v_blk, m, l, acc), None

    init = (k, v, jnp.full((nc, b, h, c), -jnp.inf, jnp.float32), jnp.zeros((nc, b, h, c), jnp.float32),
            jnp.zeros((nc, b, h, c, d), jnp.float32))
    (_, _, _, l, acc), _ = jax.lax.scan(step, init, None, length=n)
    out = acc / l[..., None]                                    # (nc, b, h, c, d)
    return out.transpose(1, 0, 3, 2, 4).reshape(b, lq, h, d).astype(q.dtype)


# ----------------------------------------------------------------------------- multi-host

DEFAULT_COORDINATOR_PORT = 8476


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-005,009],cpu1`` -> ``gpu003``,
    ``rack[1-2]-n[07-08]`` -> ``rack1-n07`` (what ``scontrol show hostnames | head -1`` prints)."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):       # the first top-level comma ends the first entry
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    entry, host = nodelist[:end], ""
    while "[" in entry:
        pre, rest = entry.split("[", 1)
        if "]" not in rest:
            raise ValueError(f"malformed SLURM node list {nodelist!r} (unclosed '[')")
        inside, entry = rest.split("]", 1)
        host += pre + inside.split(",", 1)[0].split("-", 1)[0]
    return host + entry


def _env_int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def distributed_settings(env: Mapping[str, str] | None = None) -> dict | None:
    """How this process joins a multi-process JAX run, read from the environment.

    In order of precedence:
    - ``VANS_DISTRIBUTED=off``: single process; ``VANS_DISTRIBUTED=auto``: JAX's own cluster
      detection (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes) -> ``{"auto": True}``.
    - ``JAX_COORDINATOR_ADDRESS`` (``host`` or ``host:port``), ``JAX_NUM_PROCESSES``,
      ``JAX_PROCESS_ID``: all three or none.
    - SLURM (``SLURM_NTASKS`` > 1): coordinator = the first host of ``SLURM_STEP_NODELIST``
      (inside ``srun``; else ``SLURM_JOB_NODELIST``), process id ``SLURM_PROCID``, count
      ``SLURM_NTASKS``; port ``JAX_COORDINATOR_PORT`` or 8476 + SLURM_JOB_ID % 1000 (two jobs
      sharing a first node do not collide).
    ``JAX_LOCAL_DEVICE_IDS=0,1,..`` restricts this process to those local devices.
    Returns None for a single process, else a dict of ``jax.distributed.initialize`` arguments."""
    env = os.environ if env is None else env
    mode = env.get("VANS_DISTRIBUTED", "").strip().lower()
    if mode in ("off", "0", "false", "no"):
        return None
    if mode == "auto":
        return {"auto": True}
    if mode:
        raise ValueError(f"VANS_DISTRIBUTED={env['VANS_DISTRIBUTED']!r}: expected 'auto' or 'off' (or unset)")
    jax_vars = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    given = [v for v in jax_vars if env.get(v)]
    port = env.get("JAX_COORDINATOR_PORT")
    if given:
        missing = [v for v in jax_vars if v not in given]
        if missing:
            raise ValueError(f"{', '.join(given)} set but {', '.join(missing)} missing: set all three of "
                             f"{', '.join(jax_vars)} (or none)")
        address = env["JAX_COORDINATOR_ADDRESS"]
        num, pid = _env_int(env, "JAX_NUM_PROCESSES"), _env_int(env, "JAX_PROCESS_ID")
        source = "JAX_*"
    elif env.get("SLURM_NTASKS") and _env_int(env, "SLURM_NTASKS") > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ValueError("SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
        if "SLURM_PROCID" not in env:
            raise ValueError("SLURM_NTASKS > 1 but SLURM_PROCID is not set (launch with srun)")
        address = first_slurm_host(nodelist)
        num, pid = _env_int(env, "SLURM_NTASKS"), _env_int(env, "SLURM_PROCID")
        if port is None:
            port = str(DEFAULT_COORDINATOR_PORT + (_env_int(env, "SLURM_JOB_ID") % 1000 if env.get("SLURM_JOB_ID")
                                                   else 0))
        source = "SLURM"
    else:
        return None
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"process id {pid} is not in [0, {num}) ({source} environment)")
    if num == 1:
        return None
    if ":" not in address.rsplit("]", 1)[-1]:      # no port given (IPv6 literals come bracketed)
        address = f"{address}:{port or DEFAULT_COORDINATOR_PORT}"
    out = dict(coordinator_address=address, num_processes=num, process_id=pid)
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        try:
            out["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
        except ValueError:
            raise ValueError(f"JAX_LOCAL_DEVICE_IDS={env['JAX_LOCAL_DEVICE_IDS']!r} must be comma-separated "
                             f"integers") from None
    return out


def initialize_distributed(env: Mapping[str, str] | None = None, *, timeout_s: int = 300) -> dict | None:
    """Joins the multi-process JAX runtime (``jax.distributed.initialize``) as described by the
    environment (see ``distributed_settings``); a no-op for a single process. Call it first,
    before anything touches a JAX device. Returns the settings used (None: single process)."""
    settings = distributed_settings(env)
    if settings is None:
        return None
    if settings.get("auto"):
        jax.distributed.initialize(initialization_timeout=timeout_s)
    else:
        jax.distributed.initialize(initialization_timeout=timeout_s, **settings)
    return settings


def batch_spec(mesh: Mesh, dim: int = 0, rows: int | None = None) -> P:
    """PartitionSpec of an array whose dimension ``dim`` is the batch: that dimension over the mesh
    axes the logical axis ``batch`` maps to (axes of size 1 dropped), the others whole. ``rows``
    (this process's batch size) on a single process: axes that do not divide it are dropped too, so
    the batch is replicated over them (as parameters are); with several processes every axis stays
    (their rows differ and cannot be replicated: ``host_local_batch_to_global`` raises instead)."""
    shape = (rows,) if rows is not None and jax.process_count() == 1 else None
    return P(*([None] * dim), *logical_to_spec(("batch",), DEFAULT_RULES, mesh, shape))


def _processes_along(mesh: Mesh, axes) -> int:
    """Into how many process-local slices the mesh axes ``axes`` cut a dimension sharded over them,
    seen from this process: the number of shards over those axes divided by how many of them this
    process holds (1: the process holds the whole dimension)."""
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if not axes:
        return 1
    names = list(mesh.axis_names)
    idx = [names.index(a) for a in axes]
    sizes = [mesh.devices.shape[i] for i in idx]
    mine = np.argwhere(np.vectorize(lambda d: d.process_index == jax.process_index())(mesh.devices))
    held = {int(np.ravel_multi_index(tuple(c[i] for i in idx), sizes)) for c in mine}
    return int(np.prod(sizes)) // max(len(held), 1)


def process_allgather_objects(obj) -> list:
    """Every process's ``obj`` (any picklable value), in process order, on every process; ``[obj]``
    with one process. All processes must call it (a collective)."""
    if jax.process_count() == 1:
        return [obj]
    import pickle
    from jax.experimental import multihost_utils
    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
    # padded to a power of two: a handful of gather shapes (each one compiles once)
    padded = np.zeros(max(256, 1 << int(sizes.max() - 1).bit_length()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(rows[i, :int(n)].tobytes()) for i, n in enumerate(sizes)]


def host_local_batch_to_global(batch, mesh: Mesh, spec=None, *, check_shapes: bool = True):
    """Turns each host's slice of the global batch (a pytree of numpy arrays, leading dim = this
    process's rows) into global ``jax.Array``s sharded on ``mesh``
    (``jax.make_array_from_process_local_data``). ``spec``: a PartitionSpec for every leaf, a
    pytree of them matching ``batch``, or None = the leading (batch) axis over the mesh axes the
    logical axis ``batch`` maps to (``batch_spec(mesh, 0, rows)``). A dimension sharded over mesh axes that span
    processes is split between them (each holds its rows, in process order); other dimensions are
    whole on every process. ``check_shapes`` (several processes): first compare every process's
    shapes and dtypes, so a mismatch is a clear error instead of a hang in the next collective."""
    batch = jax.tree.map(np.asarray, batch)
    if spec is None:
        specs = jax.tree.map(lambda x: batch_spec(mesh, 0, x.shape[0] if x.ndim else None), batch)
    else:
        specs = jax.tree.map(lambda _: spec, batch) if isinstance(spec, P) else spec
    if check_shapes and jax.process_count() > 1:
        mine = [(jax.tree_util.keystr(k), x.shape, str(x.dtype)) for k, x in jax.tree_util.tree_leaves_with_path(batch)]
        every = process_allgather_objects(mine)
        for p, theirs in enumerate(every):
            if theirs != mine:
                diff = [(a, b) for a, b in zip(mine, theirs) if a != b] or [(mine, theirs)]
                raise ValueError(f"host-local batches differ between process {jax.process_index()} and process {p} "
                                 f"(path, shape, dtype): {diff[0][0]} vs {diff[0][1]}; every process must hold "
                                 f"the same number of rows of the same shapes")

    def one(path, x, s):
        if len(s) > x.ndim:
            raise ValueError(f"batch{jax.tree_util.keystr(path)}: spec {s} has more entries than the array's "
                             f"{x.ndim} dims (shape {x.shape})")
        for dim, axes in enumerate(s):
            parts = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
            n = x.shape[dim] * _processes_along(mesh, axes)
            if n % parts:
                raise ValueError(f"batch{jax.tree_util.keystr(path)}: global size {n} of dim {dim} (shape {x.shape} "
                                 f"on each of {jax.process_count()} process(es)) is not divisible by the {parts} "
                                 f"shards of mesh axes {axes}")
        return jax.make_array_from_process_local_data(NamedSharding(mesh, s), x)

    return jax.tree_util.tree_map_with_path(one, batch, specs, is_leaf=lambda s: isinstance(s, P))


def optimizer_state_shardings(opt_state, params, param_shardings, mesh: Mesh):
    """Shardings for an optimizer state (e.g. optax's): every subtree laid out like ``params``
    (Adam's mu and nu, ...) takes ``param_shardings``; any other leaf (step counts) is
    replicated. Pass as ``out_shardings`` when creating the state, e.g.
    ``jax.jit(opt.init, out_shardings=optimizer_state_shardings(jax.eval_shape(opt.init, params),
    params, shardings, mesh))(params)``: ``jax.jit(opt.init)`` alone does not shard it (zeros_like
    has no data dependence on the parameters, so their shardings do not propagate)."""
    structure = jax.tree.structure(params)
    shapes = [np.shape(x) for x in jax.tree.leaves(params)]
    replicated = NamedSharding(mesh, P())

    def like_params(x):
        return jax.tree.structure(x) == structure and [np.shape(y) for y in jax.tree.leaves(x)] == shapes

    return jax.tree.map(lambda x: param_shardings if like_params(x) else replicated, opt_state, is_leaf=like_params)
