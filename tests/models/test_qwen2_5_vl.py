"""Parity of our Qwen2.5-VL with transformers' Qwen2_5_VLForConditionalGeneration (random weights)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import tiny
from tests.utils import rel_err
from vans_jax.convert.safetensors_io import CheckpointError, save_file
from vans_jax.models import qwen2_5_vl as qwen
from vans_jax.models.qwen2_5_vl.rope import get_rope_index

TOL = 1e-4  # fp32 max relative error (max |ours - ref| / max |ref|)


@pytest.fixture(scope="module")
def hf_tied():
    return tiny.qwen_hf_model(tie=True)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, hf_tied):
    d = str(tmp_path_factory.mktemp("qwen_tied"))
    hf_tied.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ours(ckpt_dir):
    return qwen.from_pretrained(ckpt_dir)


def hf_logits(model, batch, position_ids):
    keys = ["input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
            "pixel_values", "image_grid_thw"]
    with torch.no_grad():
        out = model(**tiny.to_torch(batch, keys), position_ids=torch.from_numpy(position_ids))
    return out.logits.numpy()


def our_logits(model, batch):
    return np.asarray(model(batch["input_ids"], batch["attention_mask"], batch["pixel_values_videos"],
                            batch["video_grid_thw"], batch["second_per_grid_ts"], batch["pixel_values"],
                            batch["image_grid_thw"]))


@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_match_transformers(hf_tied, ours, padding):
    batch = tiny.build_batch(padding)
    pos, _ = get_rope_index(ours.config, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                            batch["video_grid_thw"], batch["second_per_grid_ts"])
    ref = hf_logits(hf_tied, batch, pos)
    got = our_logits(ours, batch)
    valid = batch["attention_mask"].astype(bool)
    assert rel_err(got[valid], ref[valid]) < TOL


def test_vision_features_match(hf_tied, ours):
    batch = tiny.build_batch()
    with torch.no_grad():
        ref = hf_tied.model.get_video_features(torch.from_numpy(batch["pixel_values_videos"]),
                                               torch.from_numpy(batch["video_grid_thw"])).pooler_output
    ref = torch.cat(list(ref)).numpy()
    prepared = qwen.prepare_inputs(ours.config, **{k: batch[k] for k in (
        "input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
        "pixel_values", "image_grid_thw")})
    got = np.asarray(ours.vision_features(prepared["video"]))
    assert got.shape == ref.shape
    assert rel_err(got, ref) < TOL


def test_rope_index_matches_transformers_where_conventions_agree(hf_tied, ours):
    # seconds chosen so the temporal span never exceeds the spatial one (see rope.get_rope_index)
    batch = tiny.build_batch("left", seconds=(0.5, 0.5))
    ref_pos, ref_delta = hf_tied.model.get_rope_index(
        **tiny.to_torch(batch, ["input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw",
                                "second_per_grid_ts", "attention_mask"]))
    pos, delta = get_rope_index(ours.config, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                                batch["video_grid_thw"], batch["second_per_grid_ts"])
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(pos[:, valid], ref_pos.numpy()[:, valid])
    np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])


def test_rope_index_text_after_video_starts_at_max_plus_one(ours):
    cfg = ours.config
    # video grid t=3 (6 frames), merged 1x1 spatial, 2 s per grid -> t positions 0, 4, 8
    i = tiny.QWEN_IDS
    ids = np.array([[7, i["vision_start"]] + [i["video_pad"]] * 3 + [i["vision_end"], 8]])
    pos, delta = get_rope_index(cfg, ids, None, None, np.array([[3, 2, 2]]), np.array([2.0]))
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, 6, 10, 11, 12])
    np.testing.assert_array_equal(pos[1, 0], [0, 1, 2, 2, 2, 11, 12])
    assert delta[0] == 13 - 7


def test_untied_head_and_new_key_layout(tmp_path):
    hf = tiny.qwen_hf_model(tie=False, seed=1)
    hf.save_pretrained(tmp_path / "hub")
    # rewrite the checkpoint in newer transformers' layout (model.visual.* / model.language_model.*)
    from vans_jax.convert.safetensors_io import Checkpoint
    ck = Checkpoint(str(tmp_path / "hub"))
    renamed = {}
    for k in ck.keys():
        nk = "model.visual." + k[7:] if k.startswith("visual.") else (
            "model.language_model." + k[6:] if k.startswith("model.") else k)
        renamed[nk] = np.array(ck.get(k))
    os.makedirs(tmp_path / "new")
    save_file(renamed, str(tmp_path / "new" / "model.safetensors"))
    (tmp_path / "new" / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    ours = qwen.from_pretrained(str(tmp_path / "new"))
    assert ours.lm_head is not None
    batch = tiny.build_batch("right")
    pos, _ = get_rope_index(ours.config, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                            batch["video_grid_thw"], batch["second_per_grid_ts"])
    valid = batch["attention_mask"].astype(bool)
    assert rel_err(our_logits(ours, batch)[valid], hf_logits(hf, batch, pos)[valid]) < TOL


def _hf_generate(hf, batch, n):
    keys = ["input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
            "pixel_values", "image_grid_thw", "mm_token_type_ids"]
    with torch.no_grad():
        out = hf.generate(**tiny.to_torch(batch, keys), max_new_tokens=n, do_sample=False,
                          eos_token_id=tiny.QWEN_IDS["eos"], pad_token_id=tiny.QWEN_IDS["pad"])
    return out[:, batch["input_ids"].shape[1]:].numpy()


def test_greedy_generation_matches_transformers(hf_tied, ours):
    batch = tiny.build_batch("left", seconds=(0.5, 0.5))
    n = 12
    ref = _hf_generate(hf_tied, batch, n)
    prepared = qwen.prepare_inputs(ours.config, **{k: batch[k] for k in (
        "input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
        "pixel_values", "image_grid_thw")})
    out = qwen.generate(ours, prepared, max_new_tokens=n, greedy=True)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, :ref.shape[1]], ref)


def test_cached_decoding_equals_full_forward(ours):
    batch = tiny.build_batch("right")
    prepared = qwen.prepare_inputs(ours.config, **{k: batch[k] for k in (
        "input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
        "pixel_values", "image_grid_thw")})
    out = qwen.generate(ours, prepared, max_new_tokens=10, temperature=0.9, top_p=0.95, num_return_sequences=3,
                        rng=jax.random.key(3), eos_token_id=10_000)  # no EOS: full length
    assert out.tokens.shape == (9, 10)
    scored = qwen.score_completions(ours, prepared, out.tokens, out.mask, temperature=0.9)
    np.testing.assert_allclose(np.asarray(scored), np.asarray(out.logprobs), atol=2e-5)
    # G continuations of the same prompt differ (sampling), rows of different prompts are grouped
    toks = np.asarray(out.tokens).reshape(3, 3, 10)
    assert any(not np.array_equal(toks[i, 0], toks[i, 1]) for i in range(3))


def test_eos_stops_each_row_and_pads(ours):
    batch = tiny.build_batch("right")
    prepared = qwen.prepare_inputs(ours.config, **{k: batch[k] for k in (
        "input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
        "pixel_values", "image_grid_thw")})
    greedy = np.asarray(qwen.generate(ours, prepared, max_new_tokens=8, greedy=True, eos_token_id=10_000).tokens)
    eos = int(greedy[0, 2])  # make row 0 stop at its third token
    out = qwen.generate(ours, prepared, max_new_tokens=8, greedy=True, eos_token_id=eos)
    toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
    first = np.argmax(greedy[0] == eos)
    assert out.lengths[0] == first + 1 and mask[0].sum() == first + 1
    assert (toks[0, first + 1:] == ours.config.pad_token_id).all()
    assert (np.asarray(out.logprobs)[~mask] == 0).all()


def test_export_round_trip(tmp_path, hf_tied, ours):
    from transformers import Qwen2_5_VLForConditionalGeneration

    qwen.export_pretrained(ours, str(tmp_path / "export"))
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "export"),
                                                              attn_implementation="eager").eval()
    for (n1, p1), (n2, p2) in zip(sorted(hf_tied.state_dict().items()), sorted(back.state_dict().items())):
        assert n1 == n2
        np.testing.assert_array_equal(p1.numpy(), p2.numpy())
    batch = tiny.build_batch("right")
    pos, _ = get_rope_index(ours.config, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                            batch["video_grid_thw"], batch["second_per_grid_ts"])
    np.testing.assert_array_equal(hf_logits(back, batch, pos), hf_logits(hf_tied, batch, pos))


def test_sharded_export_reloads(tmp_path, ours):
    qwen.export_pretrained(ours, str(tmp_path / "sharded"), max_shard_bytes=200_000)
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    again = qwen.from_pretrained(str(tmp_path / "sharded"))
    batch = tiny.build_batch("right")
    np.testing.assert_array_equal(our_logits(again, batch), our_logits(ours, batch))


def test_bf16_logits_close(ckpt_dir, ours):
    batch = tiny.build_batch("right")
    low = qwen.from_pretrained(ckpt_dir, dtype="bfloat16")
    assert low.layers.q_proj.kernel[...].dtype == jnp.bfloat16
    valid = batch["attention_mask"].astype(bool)
    # bf16 weights and activations: ~3 significant digits
    assert rel_err(our_logits(low, batch)[valid], our_logits(ours, batch)[valid]) < 5e-2


# ----------------------------------------------------------------------------- bad input


def test_bad_checkpoints(tmp_path, ckpt_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qwen.from_pretrained(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        qwen.from_pretrained(str(tmp_path / "empty"))
    cfg = json.loads(open(os.path.join(ckpt_dir, "config.json")).read())
    other = dict(cfg, model_type="llama")
    os.makedirs(tmp_path / "llama")
    (tmp_path / "llama" / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        qwen.from_pretrained(str(tmp_path / "llama"))
    with pytest.raises(ValueError, match="unknown dtype name 'float8'"):
        qwen.from_pretrained(ckpt_dir, dtype="float8")
    from vans_jax.convert.safetensors_io import Checkpoint
    tensors = {k: np.array(v) for k, v in Checkpoint(ckpt_dir).items()}

    def write(name, ts):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        save_file(ts, str(tmp_path / name / "model.safetensors"))
        return str(tmp_path / name)

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.up_proj\.kernel \(layers \[1\]\)"):
        qwen.from_pretrained(write("missing", missing))
    with pytest.raises(CheckpointError, match="unexpected.*model.layers.0.extra.weight"):
        qwen.from_pretrained(write("extra", dict(tensors, **{"model.layers.0.extra.weight": np.zeros(3)})))
    bad = dict(tensors)
    bad["model.norm.weight"] = np.zeros((63,), np.float32)
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(63,\)"):
        qwen.from_pretrained(write("shape", bad))
    os.makedirs(tmp_path / "noweights")
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        qwen.from_pretrained(str(tmp_path / "noweights"))


def test_bad_inputs(ours):
    batch = tiny.build_batch("right")
    with pytest.raises(ValueError, match="video tokens but the video inputs give"):
        qwen.prepare_inputs(ours.config, batch["input_ids"], batch["attention_mask"],
                            batch["pixel_values_videos"][:48], np.array([[2, 6, 4]]), None,
                            batch["pixel_values"], batch["image_grid_thw"])
    with pytest.raises(ValueError, match="implies 120 patches, pixel values have 100"):
        qwen.prepare_inputs(ours.config, batch["input_ids"], batch["attention_mask"],
                            batch["pixel_values_videos"][:100], batch["video_grid_thw"], None,
                            batch["pixel_values"], batch["image_grid_thw"])
    with pytest.raises(ValueError, match="expected \\(num_patches, 1176\\)"):
        qwen.prepare_inputs(ours.config, batch["input_ids"], batch["attention_mask"],
                            batch["pixel_values_videos"][:, :100], batch["video_grid_thw"], None,
                            batch["pixel_values"], batch["image_grid_thw"])


def test_vision_segments_are_padded_blocks():
    from vans_jax.models.qwen2_5_vl.rope import segment_blocks

    gather, valid, scatter = segment_blocks(np.array([0, 0, 0, 1, 2, 2]))
    np.testing.assert_array_equal(gather, [[0, 1, 2], [3, 0, 0], [4, 5, 0]])
    np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(scatter, [0, 1, 2, 3, 6, 7])
    with pytest.raises(ValueError, match="contiguous"):
        segment_blocks(np.array([0, 1, 0]))
