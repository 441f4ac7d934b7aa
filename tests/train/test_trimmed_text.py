"""The losses on a trimmed text context (``sampling.wan.trim_batch_text``: the captions' shared zero
tail cut off, the DiT told how many rows it stood for) equal the losses on the whole context: SFT-VDM
with text dropout, the Stage-2 Flow-GRPO gradient and the DiffusionNFT gradient, on a tiny Wan DiT."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vans_jax.models.wan import WanConfig, WanLoRAConfig, WanTransformer3D
from vans_jax.rl.stages import nft_grads, stage2_grads
from vans_jax.sampling import flow
from vans_jax.sampling.wan import trim_batch_text
from vans_jax.train.sft import sft_vdm_loss
from tests.utils import rel_err

CFG = WanConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=48, in_channels=4, out_channels=4, text_dim=24,
                freq_dim=16)
N, L = 4, 48


def _setup():
    model = WanTransformer3D(CFG, rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    ctx = np.zeros((N, L, 24), np.float32)
    for i, n in enumerate((3, 7, 5, 12)):                 # captions of 3-12 tokens, zero-padded to L
        ctx[i, :n] = rng.standard_normal((n, 24))
    null = np.zeros((1, L, 24), np.float32)
    null[0, 0] = rng.standard_normal(24)
    arrays = dict(context=jnp.asarray(ctx), null_context=jnp.asarray(null),
                  uncond_context=jnp.asarray(np.broadcast_to(null, (N, L, 24)).copy()),
                  ref_latents=jnp.asarray(rng.standard_normal((N, 4, 1, 4, 4)), jnp.float32),
                  x0=jnp.asarray(rng.standard_normal((N, 4, 2, 4, 4)), jnp.float32))
    return model, graphdef, params, frozen, arrays


def _trimmed(model, batch):
    out = trim_batch_text(model, batch, training=True)
    assert out["context"].shape[1] == 16 and float(out["context_pad"]) == L - 16
    return out


def _same(a, b):
    (la, ga), (lb, gb) = a, b
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
    x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(ga)])
    y = np.concatenate([np.ravel(v) for v in jax.tree.leaves(gb)])
    assert np.abs(x).max() > 0 and rel_err(y, x) < 1e-4


def test_sft_vdm_loss_on_trimmed_text():
    model, graphdef, params, frozen, a = _setup()
    batch = dict(latents=a["x0"], context=a["context"], null_context=a["null_context"], ref_latents=a["ref_latents"])
    trimmed = _trimmed(model, batch)
    assert trimmed["null_context"].shape == (1, 16, 24)
    f = jax.jit(jax.value_and_grad(lambda p, b: sft_vdm_loss(p, graphdef, frozen, b, jax.random.key(3),
                                                             text_dropout=0.5)[0]))
    _same(f(params, batch), f(params, trimmed))


def test_stage2_and_nft_gradients_on_trimmed_text():
    model, graphdef, params, frozen, a = _setup()
    ref_params = jax.tree.map(lambda x: x + 0.01, params)
    _, traj = flow.sample(model, a["x0"], a["context"], uncond_context=a["uncond_context"], guidance_scale=2.0,
                          ref_latents=a["ref_latents"], num_steps=3, shift=3.0, mode="sde", rng=jax.random.key(1),
                          return_trajectory=True, trim_context=False)
    idx = np.arange(0, 2)
    common = dict(context=a["context"], uncond_context=a["uncond_context"], cfg=jnp.float32(2.0),
                  ref_latents=a["ref_latents"], advantages=jnp.asarray([-1.0, 1.0, 0.5, -0.5]))
    s2 = dict(common, x=traj.latents[idx], x_next=traj.latents[idx + 1], old_logp=traj.log_probs[idx] - 0.003,
              steps=jnp.asarray(idx, jnp.int32), timesteps=traj.timesteps[idx], sigmas=traj.sigmas)
    g2 = jax.jit(lambda p, b: stage2_grads(p, graphdef, frozen, ref_params, b, beta=0.1, clip_eps=0.2,
                                           advantage_clip=2.0, noise_level=0.7, std_form="flow_grpo"))
    (ga, ma), (gb, mb) = g2(params, s2), g2(params, _trimmed(model, s2))
    _same((ma["loss"], ga), (mb["loss"], gb))
    nft = dict(common, x0=a["x0"])
    gn = jax.jit(lambda p, b: nft_grads(p, graphdef, frozen, ref_params, b, jax.random.key(2), nft_beta=1.0,
                                        beta=0.1, shift=3.0, num_timesteps=2, group_size=2, advantage_clip=1.0))
    (ga, ma), (gb, mb) = gn(params, nft), gn(params, _trimmed(model, nft))
    _same((ma["loss"], ga), (mb["loss"], gb))


def test_no_trim_where_it_would_not_be_exact():
    """LoRA dropout on the cross-attention's keys/values in training: the batch stays whole."""
    _, _, _, _, a = _setup()
    lora = WanTransformer3D(CFG, rngs=nnx.Rngs(0), lora=WanLoRAConfig(rank=2, dropout=0.1))
    batch = dict(context=a["context"], null_context=a["null_context"])
    assert trim_batch_text(lora, batch, training=True) is batch
    assert "context_pad" in trim_batch_text(lora, batch, training=False)
