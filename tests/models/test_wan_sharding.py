"""Wan DiT on a fake 8-device CPU mesh: parameters sharded by their logical axes, activation
constraints at block boundaries (heads over `tensor`, tokens over `sequence`), the same forward
and the same gradients as on one device; host-local batches assembled into global arrays; AdamW
state sharded like the parameters."""
import textwrap
from tests.utils import run_on_8_devices  # noqa: E402

SCRIPT = textwrap.dedent("""
    import os, sys, json
    import numpy as np, jax, jax.numpy as jnp, optax
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    sys.path.insert(0, os.getcwd())
    from vans_jax import parallel
    from vans_jax.models.wan import WanConfig, WanTransformer3D
    assert len(jax.devices()) == 8, jax.devices()

    # 4 heads and ffn 128 so tensor=2/4 divide; batch 8; 3 latent frames (1 reference) x 4 x 4 = 48 tokens
    cfg = WanConfig(dim=64, num_heads=4, num_layers=2, ffn_dim=128, in_channels=4, out_channels=4, text_dim=24,
                    freq_dim=32, text_len=8)
    model = WanTransformer3D(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 4, 3, 8, 8)), jnp.float32)
    t = jnp.asarray(rng.uniform(0, 1000, 8), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((8, 8, 24)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((8, 4, 2, 8, 8)), jnp.float32)

    def forward(state, x, t, ctx):
        return nnx.merge(graphdef, state)(x, t, ctx, n_ref=1)

    def loss(state, x, t, ctx, target):
        return jnp.mean((forward(state, x, t, ctx) - target) ** 2)

    grad_fn = jax.value_and_grad(loss)
    ref_out = np.asarray(jax.jit(forward)(state, x, t, ctx))
    ref_loss, ref_grads = jax.jit(grad_fn)(state, x, t, ctx, target)
    ref_grads = [np.asarray(g) for g in jax.tree.leaves(ref_grads)]

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))

    results = {}
    for shape in ({"fsdp": 2, "tensor": 4}, {"data": 2, "sequence": 2, "tensor": 2}, {"fsdp": 4, "sequence": 2}):
        mesh = parallel.make_mesh(shape)
        sstate = parallel.shard_state(state, mesh)
        batch = parallel.host_local_batch_to_global(dict(x=np.asarray(x), t=np.asarray(t), ctx=np.asarray(ctx),
                                                         target=np.asarray(target)), mesh)
        with jax.set_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(forward)(sstate, batch["x"], batch["t"], batch["ctx"]))
            out = jax.jit(forward)(sstate, batch["x"], batch["t"], batch["ctx"])
            lval, grads = jax.jit(grad_fn)(sstate, batch["x"], batch["t"], batch["ctx"], batch["target"])
        q = sstate["blocks"]["attn1"]["to_q"]["kernel"].get_value()
        # optimizer state created sharded like the parameters (moments), counts replicated
        opt = optax.adamw(1e-3)
        opt_state = jax.jit(opt.init, out_shardings=parallel.optimizer_state_shardings(
            jax.eval_shape(opt.init, sstate), sstate, parallel.state_shardings(sstate, mesh), mesh))(sstate)
        mu_q = opt_state[0].mu["blocks"]["attn1"]["to_q"]["kernel"].get_value()
        results[str(shape)] = dict(
            out_err=rel(out, ref_out), loss_err=abs(float(lval) - float(ref_loss)) / abs(float(ref_loss)),
            grad_err=max(rel(g, r) for g, r in zip(jax.tree.leaves(grads), ref_grads)),
            q_spec=str(q.sharding.spec), q_shard=list(q.addressable_shards[0].data.shape),
            mu_spec=str(mu_q.sharding.spec), count_spec=str(opt_state[0].count.sharding.spec),
            x_spec=str(batch["x"].sharding.spec), x_shards=len(batch["x"].addressable_shards),
            constraint_specs=sorted({line.split("spec=", 1)[1].rstrip(")") + ")" for line in jaxpr.splitlines()
                                     if "sharding=NamedSharding" in line}),
            n_constraints=jaxpr.count("sharding_constraint["))
    # without a mesh in context there are no constraints (the model runs anywhere)
    results["no_mesh_constraints"] = str(jax.make_jaxpr(forward)(state, x, t, ctx)).count("sharding_constraint")
    print("RESULT" + json.dumps(results))
""")


def test_sharded_dit_equals_unsharded():
    results = run_on_8_devices(SCRIPT)
    assert results.pop("no_mesh_constraints") == 0
    # to_q kernel (2 layers, 64, 64): embed -> fsdp, qkv -> tensor
    assert results["{'fsdp': 2, 'tensor': 4}"]["q_shard"] == [2, 32, 16]
    # parameters are sharded over fsdp and sequence together (ZeRO-3 over both)
    assert results["{'fsdp': 4, 'sequence': 2}"]["q_shard"] == [2, 8, 64]
    assert results["{'data': 2, 'sequence': 2, 'tensor': 2}"]["q_shard"] == [2, 32, 32]
    # the batch axis goes over (data, fsdp); sequence/tensor groups hold the same rows
    assert results["{'data': 2, 'sequence': 2, 'tensor': 2}"]["x_spec"] == "P('data',)"
    assert results["{'fsdp': 4, 'sequence': 2}"]["x_spec"] == "P('fsdp',)"
    # block boundaries: tokens over `sequence`; attention heads and the FFN hidden over `tensor`
    assert "P('fsdp', 'sequence', None)" in results["{'fsdp': 4, 'sequence': 2}"]["constraint_specs"]
    assert "P('data', 'sequence', 'tensor', None)" in results["{'data': 2, 'sequence': 2, 'tensor': 2}"][
        "constraint_specs"]
    for shape, r in results.items():
        specs = " ".join(r["constraint_specs"])
        assert r["n_constraints"] >= 10, (shape, r)
        assert ("'sequence'" in specs) == ("sequence" in shape), (shape, r)
        assert ("'tensor'" in specs) == ("tensor" in shape), (shape, r)
        assert r["x_shards"] == 8, (shape, r)
        assert r["mu_spec"] == r["q_spec"] and r["count_spec"] == "P()", (shape, r)
        assert r["out_err"] < 1e-5, (shape, r)
        assert r["loss_err"] < 1e-5, (shape, r)
        assert r["grad_err"] < 1e-4, (shape, r)
