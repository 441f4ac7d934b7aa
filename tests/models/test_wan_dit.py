"""WanTransformer3D vs diffusers' WanTransformer3DModel on a tiny random config, plus the
checkpoint converter (diffusers / original-Wan layouts, export, coverage errors)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vans_jax.convert.safetensors_io import Checkpoint, CheckpointError, save_file
from vans_jax.convert.wan_dit import check_coverage, export_dit_diffusers, key_table, load_dit
from vans_jax.models.wan import WanConfig, WanLoRAConfig, trim_text_context
from tests.utils import rel_err

diffusers = pytest.importorskip("diffusers")

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
            text_dim=48, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


@pytest.fixture(scope="module")
def ref_model():
    torch.manual_seed(0)
    m = diffusers.WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():  # randomize everything (norm weights/biases included) so each mapping matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture(scope="module")
def diffusers_dir(ref_model, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("wan_diffusers"))
    ref_model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3, 4, 6)).astype(np.float32)   # B, C, T, H, W (H' = 2, W' = 3)
    refs = rng.standard_normal((2, 4, 2, 4, 6)).astype(np.float32)
    t = np.array([999.0, 250.0], np.float32)
    ctx = rng.standard_normal((2, 7, 48)).astype(np.float32)
    return x, refs, t, ctx


def load_diffusers(path):
    """diffusers from_pretrained; without ``accelerate`` it refuses (keep-in-fp32 modules), so then
    build from config.json and load the safetensors strictly."""
    try:
        return diffusers.WanTransformer3DModel.from_pretrained(path).eval()
    except ValueError as e:
        if "low_cpu_mem_usage" not in str(e):
            raise
    from safetensors.torch import load_file
    model = diffusers.WanTransformer3DModel.from_config(diffusers.WanTransformer3DModel.load_config(path))
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(path, f)))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def run_ref(model, x, t, ctx):
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), return_dict=False)[0].numpy()


def run_ours(model, x, t, ctx, n_ref=0):
    fwd = nnx.jit(lambda m, x, t, c: m(x, t, c, n_ref=n_ref))
    return np.asarray(fwd(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))


@pytest.fixture(scope="module")
def ours(diffusers_dir):
    return load_dit(diffusers_dir)


@pytest.fixture(scope="module")
def ref_out(ref_model, inputs):
    x, _, t, ctx = inputs
    return run_ref(ref_model, x, t, ctx)


def test_config_from_diffusers(diffusers_dir):
    cfg = WanConfig.from_diffusers_config(diffusers_dir)
    assert (cfg.dim, cfg.num_heads, cfg.head_dim, cfg.num_layers, cfg.ffn_dim) == (64, 2, 32, 2, 96)
    assert cfg.rope_dims == (12, 10, 10)
    d = WanConfig()
    assert (d.dim, d.num_layers, d.num_heads, d.ffn_dim, d.text_dim, d.freq_dim, d.rope_dims) == \
        (1536, 30, 12, 8960, 4096, 256, (44, 42, 42))


def test_forward_matches_diffusers(ours, ref_out, inputs):
    x, _, t, ctx = inputs
    out = run_ours(ours, x, t, ctx)
    assert out.shape == ref_out.shape == x.shape
    assert rel_err(out, ref_out) < 1e-4


def _padded_context(lengths, total=40, seed=1):
    """(B, total, 48) text contexts as Wan's encoder gives them: row i nonzero on its first lengths[i]
    positions, zero after (the caption's padding to 512 positions)."""
    rng = np.random.default_rng(seed)
    ctx = np.zeros((len(lengths), total, 48), np.float32)
    for i, n in enumerate(lengths):
        ctx[i, :n] = rng.standard_normal((n, 48))
    return ctx


def test_trimmed_text_context_matches_diffusers(ours, ref_model, inputs):
    """The DiT on the used text positions plus one pad key (logit + log n) == diffusers on all of them."""
    x, refs, t, _ = inputs
    ctx = _padded_context([5, 9])
    ref = run_ref(ref_model, x, t, ctx)
    (tc,), pad = trim_text_context(jnp.asarray(ctx), multiple=4)
    assert tc.shape == (2, 12, 48) and pad == 28
    fwd = nnx.jit(lambda m, x, t, c, p, n_ref: m(x, t, c, n_ref=n_ref, context_pad=p), static_argnums=5)
    out = np.asarray(fwd(ours, jnp.asarray(x), jnp.asarray(t), tc, jnp.float32(pad), 0))
    assert rel_err(out, ref) < 1e-4
    assert rel_err(out, run_ours(ours, x, t, ctx)) < 1e-5
    # with reference frames, and pad 0 (the appended key then carries no weight)
    full = np.concatenate([refs, x], axis=2)
    np.testing.assert_allclose(fwd(ours, jnp.asarray(full), jnp.asarray(t), tc, jnp.float32(pad), 2),
                               run_ours(ours, full, t, ctx, n_ref=2), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fwd(ours, jnp.asarray(x), jnp.asarray(t), tc, jnp.float32(0.0), 0),
                               run_ours(ours, x, t, ctx[:, :12]), rtol=1e-4, atol=1e-5)


def test_trimmed_text_context_gradient(ours, inputs):
    """Training on the trimmed context: the same loss and parameter gradient."""
    x, _, t, _ = inputs
    ctx = jnp.asarray(_padded_context([3, 6]))
    (tc,), pad = trim_text_context(ctx)
    assert tc.shape[1] == 16 and pad == 24

    def loss(m, c, p):
        return jnp.mean(m(jnp.asarray(x), jnp.asarray(t), c, context_pad=p) ** 2)

    l_full, g_full = nnx.value_and_grad(loss)(ours, ctx, None)
    l_trim, g_trim = nnx.value_and_grad(loss)(ours, tc, jnp.float32(pad))
    assert abs(float(l_full) - float(l_trim)) < 1e-5 * abs(float(l_full))
    a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g_full)])
    b = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g_trim)])
    assert np.abs(a).max() > 0 and rel_err(b, a) < 1e-4


def test_trim_text_context_rules():
    c = jnp.asarray(_padded_context([5, 9]))
    u = jnp.asarray(_padded_context([1], seed=2))
    (tc, tu, none), pad = trim_text_context(c, u, None)          # one length for both, None passes
    assert tc.shape == (2, 16, 48) and tu.shape == (1, 16, 48) and none is None and pad == 24
    np.testing.assert_array_equal(np.asarray(tc), np.asarray(c)[:, :16])
    # a value anywhere in the last position of any row: nothing to trim
    full = np.asarray(c).copy()
    full[1, -1, 0] = 1e-3
    assert trim_text_context(full)[1] is None
    assert trim_text_context(c, jnp.zeros((1, 32, 48)))[1] is None           # lengths differ
    assert trim_text_context(np.zeros((2, 64, 48), np.float32))[0][0].shape == (2, 16, 48)   # all zero
    np.testing.assert_array_equal(trim_text_context(np.asarray(c), multiple=8)[0][0], np.asarray(c)[:, :16])
    assert jax.jit(lambda c: trim_text_context(c)[0][0])(c).shape == c.shape   # under a trace: unchanged


def test_trims_text_context_only_where_exact(ours):
    assert ours.trims_text_context() and ours.trims_text_context(training=True)
    splash = nnx.clone(ours)
    splash.cfg = dataclasses.replace(ours.cfg, attn_impl="splash")
    assert not splash.trims_text_context()
    cfg = dataclasses.replace(ours.cfg, num_layers=1)
    with_dropout = type(ours)(cfg, rngs=nnx.Rngs(0), lora=WanLoRAConfig(rank=2, dropout=0.1))
    assert with_dropout.trims_text_context() and not with_dropout.trims_text_context(training=True)
    no_cross = type(ours)(cfg, rngs=nnx.Rngs(0), lora=WanLoRAConfig(rank=2, dropout=0.1, cross_attn=False))
    assert no_cross.trims_text_context(training=True)


def test_remat_and_grad(ours, inputs):
    x, _, t, ctx = inputs
    model = nnx.clone(ours)
    model.cfg = dataclasses.replace(ours.cfg, remat="full")

    def loss(m):
        return jnp.mean(m(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)) ** 2)

    g = nnx.grad(loss)(model)
    leaves = jax.tree.leaves(g)
    assert leaves and all(bool(jnp.all(jnp.isfinite(v))) for v in leaves)
    assert float(jnp.abs(g["blocks"]["attn1"]["to_q"]["kernel"][...]).max()) > 0


def test_n_ref_conditioning(ours, ref_model, inputs):
    x, refs, t, ctx = inputs
    full = np.concatenate([refs, x], axis=2)
    out = run_ours(ours, full, t, ctx, n_ref=2)
    assert out.shape == x.shape                                   # target frames only
    ref = run_ref(ref_model, full, t, ctx)[:, :, 2:]               # refs take RoPE positions 0, 1
    assert rel_err(out, ref) < 1e-4
    refs2 = refs + 1.0
    out2 = run_ours(ours, np.concatenate([refs2, x], axis=2), t, ctx, n_ref=2)
    assert np.abs(out2 - out).max() > 1e-3                         # refs do condition the output


def _to_wan_key(k):
    """diffusers -> original Wan key, written independently of the converter's tables."""
    if k.startswith("proj_out."):
        return "head.head." + k[len("proj_out."):]
    if k == "scale_shift_table":
        return "head.modulation"
    for a, b in [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
                 ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
                 ("condition_embedder.time_proj", "time_projection.1"),
                 ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
                 ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
                 (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_out.0.", ".o."),
                 (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
                 (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
                 (".scale_shift_table", ".modulation"), (".norm2.", ".norm3.")]:
        k = k.replace(a, b)
    return k


@pytest.mark.parametrize("prefix", ["", "dit."])
def test_load_original_wan_layout(ref_model, ref_out, inputs, tmp_path, prefix):
    x, _, t, ctx = inputs
    sd = {prefix + _to_wan_key(k): v.numpy() for k, v in ref_model.state_dict().items()}
    assert f"{prefix}blocks.0.norm3.weight" in sd and f"{prefix}blocks.0.self_attn.q.weight" in sd
    path = str(tmp_path / "vans_dit.safetensors")
    save_file(sd, path)
    cfg = WanConfig.from_diffusers_config(TINY)
    model = load_dit(path, cfg)
    assert rel_err(run_ours(model, x, t, ctx), ref_out) < 1e-4
    if prefix:  # config inferred from tensor shapes (heads are not recoverable: override)
        model = load_dit(Checkpoint(path), num_heads=2)
        assert model.cfg.num_layers == 2 and model.cfg.ffn_dim == 96 and model.cfg.text_dim == 48
        assert rel_err(run_ours(model, x, t, ctx), ref_out) < 1e-4


def test_export_roundtrip(ours, inputs, tmp_path):
    x, _, t, ctx = inputs
    model = nnx.clone(ours)
    # make the round trip non-trivial: perturb our weights first
    model.blocks.ffn_in.kernel.set_value(model.blocks.ffn_in.kernel[...] * 1.5)
    out_dir = export_dit_diffusers(model, str(tmp_path / "export"))
    with open(os.path.join(out_dir, "config.json")) as f:
        assert json.load(f)["_class_name"] == "WanTransformer3DModel"
    back = load_diffusers(out_dir)
    assert rel_err(run_ref(back, x, t, ctx), run_ours(model, x, t, ctx)) < 1e-4
    # and it reloads into ours bit-exactly
    again = load_dit(out_dir)
    a = jax.tree.leaves(nnx.state(again, nnx.Param))
    b = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b))


def test_lora_load_and_merged_export(diffusers_dir, ours, inputs, tmp_path):
    x, _, t, ctx = inputs
    model = load_dit(diffusers_dir, lora=WanLoRAConfig(rank=4, alpha=8.0))
    assert model.blocks.attn1.to_q.lora_a[...].shape == (2, 64, 4)
    np.testing.assert_allclose(run_ours(model, x, t, ctx), run_ours(ours, x, t, ctx), atol=1e-5)  # B = 0
    model.blocks.ffn_out.lora_b.set_value(jnp.full(model.blocks.ffn_out.lora_b[...].shape, 0.05))
    out = run_ours(model, x, t, ctx)
    back = load_diffusers(export_dit_diffusers(model, str(tmp_path / "m")))
    assert rel_err(run_ref(back, x, t, ctx), out) < 1e-4


def test_coverage_errors(ref_model, tmp_path):
    cfg = WanConfig.from_diffusers_config(TINY)
    sd = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    table = key_table(cfg, "diffusers")
    assert set(table) == set(sd)                       # every diffusers key mapped, nothing extra
    check_coverage(sd, cfg)  # an in-memory dict works too

    def fails(d, *needles):
        path = str(tmp_path / "bad.safetensors")
        save_file(d, path)
        with pytest.raises(CheckpointError) as e:
            load_dit(path, cfg)
        for n in needles:
            assert n in str(e.value), str(e.value)

    missing = dict(sd)
    del missing["blocks.1.attn2.to_k.bias"]
    fails(missing, "missing", "blocks.1.attn2.to_k.bias")
    extra = dict(sd, **{"blocks.0.attn2.norm_added_q.weight": np.ones(64, np.float32)})
    fails(extra, "unexpected", "blocks.0.attn2.norm_added_q.weight")
    shaped = dict(sd, **{"blocks.0.ffn.net.0.proj.weight": np.zeros((97, 64), np.float32)})
    fails(shaped, "mis-shaped", "blocks.0.ffn.net.0.proj.weight", "(97, 64)", "(96, 64)")
    wrong_layers = {k: v for k, v in sd.items()}
    wrong_layers.update({k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items() if k.startswith("blocks.1.")})
    fails(wrong_layers, "unexpected", "blocks.2.")
    with pytest.raises(CheckpointError, match="layout"):
        load_dit({"foo.weight": np.zeros(3, np.float32)}, cfg)


def test_bf16_forward_close(diffusers_dir, ref_out, inputs):
    x, _, t, ctx = inputs
    model = load_dit(diffusers_dir, dtype="bfloat16")
    assert model.blocks.attn1.to_q.kernel[...].dtype == jnp.bfloat16
    assert model.scale_shift_table[...].dtype == jnp.float32
    assert rel_err(run_ours(model, x, t, ctx), ref_out) < 5e-2


def test_trim_decided_on_host_copies():
    """``trim_text_context(..., host=)``: the decision read from host copies is the device one; a copy
    of the wrong shape is an error naming both shapes."""
    from vans_jax.models.wan.dit import trim_text_context
    c = np.zeros((2, 64, 4), np.float32)
    c[0, :5] = 1.0
    c[1, :19] = 2.0
    n = np.zeros((1, 64, 4), np.float32)
    n[0, :1] = 3.0
    dev = (jnp.asarray(c), jnp.asarray(n))
    (a, b), pad = trim_text_context(*dev)
    (a2, b2), pad2 = trim_text_context(*dev, host=[c, None])
    assert pad == pad2 == 32 and a2.shape == (2, 32, 4) and b2.shape == (1, 32, 4)
    np.testing.assert_array_equal(np.asarray(a2), c[:, :32])
    # the host copy decides: a copy that says more rows are used keeps them
    wider = c.copy()
    wider[0, 40] = 1.0
    assert trim_text_context(*dev, host=[wider, n])[1] == 64 - 48
    with pytest.raises(ValueError, match=r"host copy of shape \(2, 8, 4\)"):
        trim_text_context(*dev, host=[c[:, :8], None])
