"""attention(impl="splash"): the Pallas TPU splash kernel, run here in Pallas interpret mode, gives
the values and gradients of the reference XLA attention at every attention site our models have
(DiT self- and cross-attention, the Qwen decoder's causal GQA with left / right padding as segment
ids, the vision tower's windows and frames) and through whole tiny models (DiT forward and
gradient, Qwen logits with both paddings and a text-only row, the vision tower).

Tolerance: fp32 inputs; max |splash - xla| / max |xla| < 2e-5 (seen: ~1e-6 and below; the two
sum the same terms in another order: blocks of 128 keys with an online softmax)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import tiny
from tests.utils import rel_err
from vans_jax.models import layers
from vans_jax.models import qwen2_5_vl as qwen
from vans_jax.models.qwen2_5_vl.modeling import causal_mask, segment_attention
from vans_jax.models.qwen2_5_vl.rope import vision_layout
from vans_jax.models.wan import WanConfig, WanTransformer3D

TOL = 2e-5


def _qkv(lq, lk, hq, hkv, d, seed=0, b=2):
    rng = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return mk(b, lq, hq, d), mk(b, lk, hkv, d), mk(b, lk, hkv, d)


def _values_and_grads(q, k, v, impl, **kw):
    def loss(q, k, v):
        return jnp.sum(jnp.sin(layers.attention(q, k, v, impl=impl, **kw)))
    out = jax.jit(lambda q, k, v: layers.attention(q, k, v, impl=impl, **kw))(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _assert_parity(q, k, v, splash_kw, xla_kw=None, rows=None):
    out, grads = _values_and_grads(q, k, v, "splash", **splash_kw)
    ref, ref_grads = _values_and_grads(q, k, v, "xla", **(splash_kw if xla_kw is None else xla_kw))
    if rows is not None:          # outputs at padded queries are meaningless (and differ by construction)
        out, ref = out[rows], ref[rows]
    else:
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) < TOL
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL


def test_dit_self_attention_site():
    """No mask, a long-ish sequence (not a multiple of 128: padded), head dim 128."""
    _assert_parity(*_qkv(200, 200, 2, 2, 128), {})


def test_dit_cross_attention_site():
    """Queries vs zero-padded text tokens (Lq != Lk; Wan does not mask the padding)."""
    q, k, v = _qkv(192, 40, 2, 2, 16)
    k, v = k.at[:, 29:].set(0), v.at[:, 29:].set(0)
    _assert_parity(q, k, v, {})


@pytest.mark.parametrize("padding", ["left", "right"])
def test_qwen_decoder_site_causal_gqa_padding(padding):
    """GQA 4/2, causal, padding as segment ids; rows: padded, padded the other amount, text only;
    the segment-id form equals the (B, S, S) boolean form (what xla used to get) on valid rows."""
    lens = [150, 97, 160]
    s = 160
    valid = np.zeros((3, s), bool)
    for i, n in enumerate(lens):
        valid[i, :n] = True
    if padding == "left":
        valid = valid[:, ::-1].copy()
    q, k, v = _qkv(s, s, 4, 2, 16, b=3)
    seg = jnp.asarray(valid.astype(np.int32))
    # against the boolean causal mask through the xla path: outputs on valid rows
    out = layers.attention(q, k, v, segment_ids=(seg, seg), causal=True, impl="splash")
    ref = layers.attention(q, k, v, mask=causal_mask(jnp.asarray(valid), s)[:, None], impl="xla")
    assert rel_err(out[valid], ref[valid]) < TOL
    # values and gradients of the same structural attention through both implementations
    _assert_parity(q, k, v, dict(segment_ids=(seg, seg), causal=True))


@pytest.mark.parametrize("kind", ["window", "full"])
def test_vision_segment_site(kind):
    """Windowed blocks and per-frame full attention as segment ids over the whole sequence."""
    vcfg = qwen.Qwen2_5_VLConfig.from_hf_dict(tiny.qwen_hf_config().to_dict()).vision
    layout = {k: jnp.asarray(a) for k, a in vision_layout(vcfg, [[2, 8, 12], [1, 4, 4]]).items()}
    n = 2 * 8 * 12 + 16
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((n, 2, 16)), jnp.float32) for _ in range(3))
    f = lambda impl: jax.jit(lambda q, k, v: segment_attention(q, k, v, layout, kind, impl))
    out, ref = f("splash")(q, k, v), f("xla")(q, k, v)
    assert out.shape == ref.shape == (n, 2, 16)
    assert rel_err(out, ref) < TOL
    g = lambda impl: jax.grad(lambda q: jnp.sum(jnp.sin(f(impl)(q, k, v))))(q)
    assert rel_err(g("splash"), g("xla")) < TOL


def test_block_sizes_and_padding():
    """Explicit blocks (int, or (q, kv)) give the same result; lengths that are not multiples are
    padded; a block that is not a multiple of 128 is refused by name."""
    q, k, v = _qkv(256, 384, 2, 1, 16, b=1)
    ref = layers.attention(q, k, v, impl="xla")
    for bs in (None, 128, (256, 128), (128, 384)):
        assert rel_err(layers.attention(q, k, v, impl="splash", block_sizes=bs), ref) < TOL
    assert layers._splash_block(13200, 512) == (512, 13312)       # the DiT at 352x640x(6+9) latent frames
    assert layers._splash_block(300, 512) == (384, 384)
    with pytest.raises(ValueError, match="splash block size 100"):
        layers.attention(q, k, v, impl="splash", block_sizes=100)


def test_dispatch_rules():
    q, k, v = _qkv(130, 130, 2, 2, 8, b=1)
    # auto on this CPU machine is xla
    assert layers.resolve_attention_impl("auto", jnp.bfloat16) == ("splash" if jax.default_backend() == "tpu" else
                                                                   "cudnn" if jax.default_backend() == "gpu" else "xla")
    # a bias (UMT5's relative positions) or an arbitrary boolean mask runs on xla: exactly the xla values
    bias = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 130, 130)), jnp.float32)
    np.testing.assert_array_equal(layers.attention(q, k, v, bias=bias, impl="splash"),
                                  layers.attention(q, k, v, bias=bias, impl="xla"))
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        layers.attention(q, k[:, :100], v[:, :100], causal=True, impl="splash")
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        layers.attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match=r"q \(B, Lq, Hq, D\)"):
        layers.attention(q, k[..., :4], v[..., :4], impl="splash")


# ----------------------------------------------------------------------------- whole tiny models


def test_dit_forward_and_gradient():
    cfg = WanConfig(dim=64, num_heads=2, num_layers=2, ffn_dim=96, in_channels=4, out_channels=4, text_dim=24,
                    freq_dim=32, text_len=8)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 4, 3, 12, 16)), jnp.float32)   # 3 x 6 x 8 = 144 tokens (1 reference)
    t = jnp.asarray([500.0], jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 8, 24)), jnp.float32).at[:, 5:].set(0)

    def run(impl):
        model = WanTransformer3D(dataclasses.replace(cfg, attn_impl=impl), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        loss = lambda st: jnp.mean(nnx.merge(graphdef, st)(x, t, ctx, n_ref=1) ** 2)
        out = jax.jit(lambda st: nnx.merge(graphdef, st)(x, t, ctx, n_ref=1))(state)
        return out, jax.tree.leaves(jax.jit(jax.grad(loss))(state))

    out, grads = run("splash")
    ref, ref_grads = run("xla")
    assert rel_err(out, ref) < TOL
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-4      # parameter gradients: a mean over tokens of differences ~1e-6


@pytest.fixture(scope="module")
def qwen_pair():
    d = tiny.qwen_hf_config().to_dict()
    models = {}
    for impl in ("splash", "xla"):
        models[impl] = qwen.Qwen2_5_VLModel(qwen.Qwen2_5_VLConfig.from_hf_dict(d, attn_impl=impl), rngs=nnx.Rngs(0))
    return models


@pytest.mark.parametrize("padding", ["right", "left"])
def test_qwen_logits_both_paddings_and_text_only_row(qwen_pair, padding):
    batch = tiny.build_batch(padding)           # rows: text+video+text, text+image+text+video+text, text only
    prepared = qwen.prepare_inputs(qwen_pair["xla"].config, **{k: batch[k] for k in (
        "input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
        "pixel_values", "image_grid_thw")})
    args = (prepared["input_ids"], prepared["attention_mask"], prepared["position_ids"], prepared["video"],
            prepared["image"])
    out = {impl: np.asarray(nnx.jit(lambda m, *a: m.forward_arrays(*a))(m, *args)) for impl, m in qwen_pair.items()}
    valid = batch["attention_mask"].astype(bool)
    assert rel_err(out["splash"][valid], out["xla"][valid]) < TOL


def test_qwen_vision_tower(qwen_pair):
    batch = tiny.build_batch()
    prepared = qwen.prepare_inputs(qwen_pair["xla"].config, **{k: batch[k] for k in (
        "input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
        "pixel_values", "image_grid_thw")})
    feats = {impl: np.asarray(nnx.jit(lambda m, v: m.vision_features(v))(m, prepared["video"]))
             for impl, m in qwen_pair.items()}
    assert feats["splash"].shape == feats["xla"].shape
    assert rel_err(feats["splash"], feats["xla"]) < TOL
