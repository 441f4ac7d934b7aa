"""LoRA on Qwen2.5-VL: frozen base, disabled-LoRA reference policy, merge, export with merge."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests import tiny
from tests.utils import rel_err
from vans_jax.models import qwen2_5_vl as qwen
from vans_jax.models.layers import LoRAParam
from vans_jax.models.lora import lora_state, merge_lora, without_lora
from vans_jax.models.qwen2_5_vl.rope import get_rope_index

KEYS = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
        "pixel_values", "image_grid_thw")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("qwen_lora"))
    hf = tiny.qwen_hf_model(tie=True, seed=2)
    hf.save_pretrained(d)
    base = qwen.from_pretrained(d)
    lora = qwen.from_pretrained(d, lora=qwen.LoRAConfig(rank=4, alpha=16, dropout=0.1))
    batch = tiny.build_batch("right")
    return d, hf, base, lora, batch


def logits(model, batch):
    return np.asarray(model(*[batch[k] for k in KEYS]))


def randomize_lora_b(model, seed=0):
    state = lora_state(model)
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    state = jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), state)
    nnx.update(model, state)


def test_fresh_lora_equals_base_and_targets(setup):
    _, _, base, lora, batch = setup
    np.testing.assert_array_equal(logits(lora, batch), logits(base, batch))
    names = {".".join(map(str, p[:-1])) for p, _ in nnx.to_flat_state(lora_state(lora))}
    expected = {f"layers.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert names == expected  # language model only, by default
    a = lora.layers.q_proj.lora_a[...]
    assert a.shape == (2, 64, 4) and lora.layers.q_proj.lora_scale == 4.0


def test_without_lora_is_the_base_policy_and_merge_is_exact(setup):
    _, _, base, lora, batch = setup
    graphdef, state = nnx.split(lora)
    model = nnx.merge(graphdef, state)
    randomize_lora_b(model)
    adapted = logits(model, batch)
    assert rel_err(adapted, logits(base, batch)) > 1e-3
    ref = nnx.merge(graphdef, without_lora(nnx.state(model)))
    np.testing.assert_array_equal(logits(ref, batch), logits(base, batch))
    merged = merge_lora(nnx.merge(graphdef, nnx.state(model)))
    assert merged.layers.q_proj.lora_a is None
    assert rel_err(logits(merged, batch), adapted) < 1e-5


def test_gradients_reach_only_lora_and_dropout_needs_a_key(setup):
    _, _, _, lora, batch = setup
    model = nnx.merge(*nnx.split(lora))
    prepared = qwen.prepare_inputs(model.config, *[batch[k] for k in KEYS])
    graphdef, lora_params, rest = nnx.split(model, LoRAParam, ...)

    def loss(lp, rng):
        m = nnx.merge(graphdef, lp, rest)
        out = m.forward_arrays(prepared["input_ids"], prepared["attention_mask"], prepared["position_ids"],
                               prepared["video"], prepared["image"], rng=rng)
        return jnp.mean(out ** 2)

    grads = jax.grad(loss)(lora_params, None)
    gb = grads["layers"]["q_proj"]["lora_b"][...]
    assert float(jnp.abs(gb).max()) > 0  # B gets gradient at init (A is random)
    l1, l2 = loss(lora_params, jax.random.key(0)), loss(lora_params, jax.random.key(1))
    assert float(l1) != float(l2)  # dropout on with a key
    assert float(loss(lora_params, None)) == float(loss(lora_params, None))


def test_export_merges_lora_and_transformers_agrees(setup, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, _, _, lora, batch = setup
    model = nnx.merge(*nnx.split(lora))
    randomize_lora_b(model, seed=1)
    qwen.export_pretrained(model, str(tmp_path / "merged"))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "merged"),
                                                            attn_implementation="eager").eval()
    pos, _ = get_rope_index(model.config, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                            batch["video_grid_thw"], batch["second_per_grid_ts"])
    with torch.no_grad():
        ref = hf(**tiny.to_torch(batch, KEYS), position_ids=torch.from_numpy(pos)).logits.numpy()
    valid = batch["attention_mask"].astype(bool)
    assert model.layers.q_proj.lora_a is not None  # export did not modify the model
    assert rel_err(logits(model, batch)[valid], ref[valid]) < 1e-4


def test_remat_policies_give_the_same_gradients(setup):
    d, _, _, _, batch = setup
    grads = {}
    for policy in ("none", "full", "dots"):
        model = qwen.from_pretrained(d, lora=qwen.LoRAConfig(rank=4, alpha=16, dropout=0.0), remat=policy)
        randomize_lora_b(model, seed=3)
        prepared = qwen.prepare_inputs(model.config, *[batch[k] for k in KEYS])
        graphdef, lora_params, rest = nnx.split(model, LoRAParam, ...)

        def loss(lp):
            m = nnx.merge(graphdef, lp, rest)
            out = m.forward_arrays(prepared["input_ids"], prepared["attention_mask"], prepared["position_ids"],
                                   prepared["video"], prepared["image"])
            return jnp.mean(out ** 2)

        grads[policy] = jax.tree.leaves(jax.jit(jax.grad(loss))(lora_params))
    for policy in ("full", "dots"):
        for a, b in zip(grads["none"], grads[policy]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
