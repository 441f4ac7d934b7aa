"""Sequence (context) parallel self-attention on a fake 8-device CPU mesh: ring attention (keys and
values passed around the `sequence` axis with ppermute, online softmax) and Ulysses (all-to-all
tokens <-> heads) equal plain attention, alone and inside the Wan DiT (seq_parallel="ring" /
"ulysses"), forward and gradient, for sequence=8 and fsdp=2 x sequence=4; and the splash kernel
(interpret mode) under a mesh, per device in a shard_map. A subprocess: the test session's jax
already has its devices."""
import json
import textwrap

from tests.utils import run_on_8_devices

SCRIPT = textwrap.dedent("""
    import os, sys, json, dataclasses
    import numpy as np, jax, jax.numpy as jnp
    from flax import nnx
    sys.path.insert(0, os.getcwd())
    from vans_jax import parallel
    from vans_jax.models import layers
    from vans_jax.models.wan import WanConfig, WanTransformer3D
    assert len(jax.devices()) == 8, jax.devices()

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))

    results = {}
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 48, 8, 16)), jnp.float32) for _ in range(3))
    attend = lambda q, k, v: layers.attention(q, k, v, impl="xla")
    loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))))
    ref, ref_g = attend(q, k, v), jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)

    cfg = WanConfig(dim=64, num_heads=8, num_layers=1, ffn_dim=96, in_channels=4, out_channels=4, text_dim=24,
                    freq_dim=32, text_len=8)
    x = jnp.asarray(rng.standard_normal((2, 4, 3, 8, 8)), jnp.float32)     # 3 x 4 x 4 = 48 tokens (1 reference)
    t = jnp.asarray([900.0, 100.0], jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 8, 24)), jnp.float32)

    def dit(kind):
        graphdef, state = nnx.split(WanTransformer3D(dataclasses.replace(cfg, seq_parallel=kind), rngs=nnx.Rngs(0)))
        fwd = lambda st, x: nnx.merge(graphdef, st)(x, t, ctx, n_ref=1)
        return state, fwd, jax.grad(lambda st, x: jnp.mean(fwd(st, x) ** 2))

    state, fwd, grad = dit("none")
    dit_ref, dit_ref_g = fwd(state, x), jax.tree.leaves(grad(state, x))

    for shape in ({"sequence": 8}, {"fsdp": 2, "sequence": 4}):
        mesh = parallel.make_mesh(shape)
        for kind in ("ring", "ulysses"):
            f = lambda q, k, v: parallel.sequence_parallel_attention(q, k, v, attend, kind=kind)
            with jax.set_mesh(mesh):
                out = jax.jit(f)(q, k, v)
                g = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
                hlo = jax.jit(f).lower(q, k, v).as_text()
                st, dfwd, dgrad = dit(kind)
                st = parallel.shard_state(st, mesh)
                xs = parallel.host_local_batch_to_global(np.asarray(x), mesh)
                dout = jax.jit(dfwd)(st, xs)
                dg = jax.tree.leaves(jax.jit(dgrad)(st, xs))
                djaxpr = str(jax.make_jaxpr(dfwd)(st, xs))
            results[f"{shape} {kind}"] = dict(
                out=rel(out, ref), grad=max(rel(a, b) for a, b in zip(g, ref_g)),
                ppermute="collective_permute" in hlo, all_to_all="all_to_all" in hlo,
                dit_out=rel(dout, dit_ref), dit_grad=max(rel(a, b) for a, b in zip(dg, dit_ref_g)),
                dit_shard_map=djaxpr.count("shard_map"))
    # a ring step in query chunks (RING_QUERY_CHUNK): 512 tokens, 128 a device, chunks of 64
    parallel.RING_QUERY_CHUNK = 64
    ql, kl, vl = (jnp.asarray(rng.standard_normal((1, 512, 2, 16)), jnp.float32) for _ in range(3))
    f = lambda q, k, v: parallel.sequence_parallel_attention(q, k, v, attend, kind="ring")
    with jax.set_mesh(parallel.make_mesh({"fsdp": 2, "sequence": 4})):
        out, g = jax.jit(f)(ql, kl, vl), jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(ql, kl, vl)
    results["chunked_ring"] = dict(
        chunk=parallel._query_chunk(128, 64), out=rel(out, attend(ql, kl, vl)),
        grad=max(rel(a, b) for a, b in zip(g, jax.grad(loss(attend), argnums=(0, 1, 2))(ql, kl, vl))))
    # the splash kernel (interpret mode) under a mesh runs per device in a shard_map: full attention
    # (queries over `sequence`) and causal GQA with padding segments (queries whole)
    qs_, ks_, vs_ = (jnp.asarray(rng.standard_normal((2, 256, h, 16)), jnp.float32) for h in (4, 2, 2))
    valid = jnp.asarray(np.arange(256)[None, :] >= np.array([[0], [40]]), jnp.int32)     # row 2 left-padded
    splash = {}
    for shape, kw in (({"fsdp": 2, "sequence": 4}, {}),
                      ({"fsdp": 2, "tensor": 2, "sequence": 2}, dict(segment_ids=(valid, valid), causal=True))):
        sp = lambda q, k, v: layers.attention(q, k, v, impl="splash", **kw)
        xl = lambda q, k, v: layers.attention(q, k, v, impl="xla", **kw)
        with jax.set_mesh(parallel.make_mesh(shape)):
            out = jax.jit(sp)(qs_, ks_, vs_)
            g = jax.jit(jax.grad(loss(sp), argnums=(0, 1, 2)))(qs_, ks_, vs_)
            jaxpr = str(jax.make_jaxpr(sp)(qs_, ks_, vs_))
        splash[str(shape)] = dict(out=rel(out, xl(qs_, ks_, vs_)), shard_map="shard_map" in jaxpr, grad=max(
            rel(a, b) for a, b in zip(g, jax.grad(loss(xl), argnums=(0, 1, 2))(qs_, ks_, vs_))))
    results["splash_on_mesh"] = splash
    # tokens that do not divide over the sequence axis, and heads that do not divide for ulysses
    errors = {}
    with jax.set_mesh(parallel.make_mesh({"sequence": 8})):
        for name, args in (("tokens", (q[:, :44],) * 3), ("heads", (q[:, :, :4],) * 3)):
            try:
                parallel.sequence_parallel_attention(*args, attend, kind="ulysses")
                errors[name] = ""
            except ValueError as e:
                errors[name] = str(e)
    results["errors"] = errors
    # no mesh: plain attention
    results["no_mesh"] = rel(parallel.sequence_parallel_attention(q, k, v, attend, kind="ring"), ref)
    print("RESULT" + json.dumps(results))
""")


def test_ring_and_ulysses_equal_plain_attention():
    results = run_on_8_devices(SCRIPT)
    print(json.dumps(results, indent=1))
    errors = results.pop("errors")
    assert "44 tokens do not divide over the mesh's sequence axis of size 8" in errors["tokens"]
    assert "4 heads per device do not divide over the sequence axis of size 8" in errors["heads"]
    assert results.pop("no_mesh") < 1e-6
    for shape, r in results.pop("splash_on_mesh").items():
        assert r["shard_map"] and r["out"] < 2e-5 and r["grad"] < 2e-5, (shape, r)
    chunked = results.pop("chunked_ring")
    assert chunked["chunk"] == 64 and chunked["out"] < 1e-5 and chunked["grad"] < 1e-5, chunked
    assert len(results) == 4
    for name, r in results.items():
        assert r["out"] < 1e-5 and r["grad"] < 1e-5, (name, r)
        # the ring passes key/value blocks; Ulysses re-shards with all-to-alls
        assert r["ppermute"] == name.endswith("ring") and r["all_to_all"] == name.endswith("ulysses"), (name, r)
        # in the DiT: one shard_map per scanned self-attention, the same output and gradients
        assert r["dit_shard_map"] >= 1, (name, r)
        assert r["dit_out"] < 1e-5 and r["dit_grad"] < 1e-4, (name, r)
