"""The world's tiny CLIP: tokenizer (HF CLIP format), a short contrastive training run, the export
loading in our loader and in transformers with equal features, and the discrimination metrics."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from vans_jax.data import synthetic  # noqa: E402
from vans_jax.convert import clip as clip_ckpt  # noqa: E402
from vans_jax.models import clip as C  # noqa: E402
from tools.tiny_world import clip_train as ct  # noqa: E402
from tools.tiny_world.clips import load_world_clips  # noqa: E402
from tests.utils import rel_err  # noqa: E402

SPEC = ct.TinyCLIPSpec(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                       text_width=32, text_layers=1, text_heads=2, projection_dim=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("world"))
    synthetic.generate_world(d, "train", 48)
    synthetic.generate_world(d, "eval", 12)
    return d


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clip"))
    cfg = ct.CLIPTrainConfig(steps=30, batch_size=16, frames_per_clip=3, lr=3e-3, warmup_steps=3)
    metrics = ct.train_clip(world, out, spec=SPEC, train_config=cfg, seed=0, log=None)
    return out, metrics


def test_tokenizer_is_a_clip_tokenizer(tmp_path):
    texts = synthetic.world_texts()
    tok = ct.build_clip_tokenizer(str(tmp_path), texts, max_length=32)
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    from_files = transformers.CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    from_dir = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(tok, transformers.CLIPTokenizer)
    for t in texts[::7]:
        ids = tok(t)["input_ids"]
        assert ids == from_files(t)["input_ids"] == from_dir(t)["input_ids"], t
        # every word (and punctuation mark) is one token between <|startoftext|> and <|endoftext|>
        words = t.lower().replace(".", " .").replace(",", " ,").replace("?", " ?").replace(":", " :").split()
        assert len(ids) == len(words) + 2, (t, tok.convert_ids_to_tokens(ids))
        assert tok.decode(ids, skip_special_tokens=True) == " ".join(words)
    vocab = json.load(open(tmp_path / "vocab.json"))
    assert vocab[ct.EOS] == len(vocab) - 1 and vocab[ct.BOS] == len(vocab) - 2 and len(tok) == len(vocab)
    assert tok.pad_token == ct.EOS
    # unseen words still tokenize (byte fallback symbols), no unknown token
    ids = tok("A zebra, 42!")["input_ids"]
    assert len(ids) > 4 and tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "azebra,42!"


def test_short_training_lowers_the_loss(trained):
    _, m = trained
    assert m["loss_last"] < m["loss_first"] - 0.3, m
    assert m["video_loss_last"] < m["video_loss_first"] and m["image_loss_last"] < m["image_loss_first"], m
    assert m["frames_per_clip"] == 3 and m["train_config"]["steps"] == 30
    assert m["image_loss_last"] < np.log(16)          # below chance for 16 frames
    e = m["eval"]
    for k in ("retrieval_top1_frame", "retrieval_top1_video", "clip_t_match", "clip_t_mismatch", "clip_v_degraded",
              "clip_v_other_caption", "clip_v_static"):
        assert np.isfinite(e[k]), k
    assert e["num_videos"] == 12 and 0 < e["retrieval_chance"] <= 1


def test_export_loads_in_ours_and_transformers(trained, world):
    out, _ = trained
    ours = clip_ckpt.from_pretrained(out)
    ref = transformers.CLIPModel.from_pretrained(out).eval()
    tok = C.load_tokenizer(out)
    clips = load_world_clips(world, "eval", 4)
    frames = clips.targets[:, ::4].reshape(-1, 64, 64, 3)
    px = C.preprocess_frames(frames, size=SPEC.image_size)
    # the saved preprocessor config gives the same pixels with transformers' processor
    proc = transformers.CLIPImageProcessor.from_pretrained(out)
    hf_px = proc(images=list(frames), return_tensors="np")["pixel_values"]
    assert hf_px.shape == px.shape and np.abs(hf_px - px).max() < 0.05
    ids, mask = C.tokenize(tok, clips.captions, SPEC.max_text_len)
    with torch.no_grad():
        r_img = ref.get_image_features(torch.tensor(px)).pooler_output.numpy()
        r_txt = ref.get_text_features(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).pooler_output.numpy()
        r = ref(input_ids=torch.tensor(ids).long(), pixel_values=torch.tensor(px),
                attention_mask=torch.tensor(mask).long())
    img = ours.get_image_features(jnp.asarray(px))
    txt = ours.get_text_features(jnp.asarray(ids), jnp.asarray(mask))
    assert rel_err(img, r_img) < 1e-4 and rel_err(txt, r_txt) < 1e-4
    lpi, _, _, _ = ours(jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask))
    assert rel_err(lpi, r.logits_per_image.numpy()) < 1e-4
    # the encode helpers the rewards use run on the loaded model
    f = C.encode_frames(ours, clips.targets)
    assert f.shape == (4, clips.targets.shape[1], SPEC.projection_dim)


def test_evaluate_clip_separates_on_a_handmade_case(trained, world):
    """The metrics are measured, not constant: an untrained model differs from the trained one,
    and identical videos give CLIP-V 1."""
    out, m = trained
    model, tok = clip_ckpt.from_pretrained(out), C.load_tokenizer(out)
    clips = load_world_clips(world, "eval")
    e = ct.evaluate_clip(model, tok, clips)
    assert e.pop("confusion") == m["eval_confusion"]
    assert e == pytest.approx(m["eval"], rel=1e-4, abs=1e-5)      # the saved model is the evaluated one
    from vans_jax.rl.rewards import clip_video_similarity
    feats = C.encode_frames(model, clips.targets[:2])
    assert np.allclose(np.asarray(clip_video_similarity(feats, feats)), 1.0, atol=1e-5)
    untrained = C.CLIPModel(model.config)
    e0 = ct.evaluate_clip(untrained, tok, clips)
    keys = ("clip_t_match", "clip_t_mismatch", "clip_v_other_caption", "clip_v_static", "clip_v_degraded")
    assert max(abs(e0[k] - e[k]) for k in keys) > 1e-3, (e0, e)


def test_degrade_is_bounded_and_random():
    import jax
    x = np.random.default_rng(0).integers(0, 256, (3, 2, 16, 16, 3), dtype=np.uint8)
    a, b = ct.degrade_uint8(x, seed=0), ct.degrade_uint8(x, seed=1)
    assert a.shape == x.shape and a.dtype == np.uint8 and not np.array_equal(a, b)
    y = ct.degrade(jax.random.key(0), jnp.asarray(x[:, 0], jnp.float32) / 255, strength=0.0)
    np.testing.assert_allclose(np.asarray(y), x[:, 0] / 255, atol=1e-6)   # strength 0 = identity


def test_video_caption_losses_is_the_retrieval_objective():
    """The video loss scores the mean of a clip's normalized frame embeddings against every caption
    (order-free, as retrieval and CLIP-T): frame order within a clip does not change it, the labels
    do, and it equals the cross-entropy computed by hand from the model's features."""
    import jax
    from flax import nnx
    cfg = SPEC.config(vocab_size=50, bos_id=48, eos_id=49, pad_id=49)
    model = C.CLIPModel(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    b, f, k = 3, 4, 5
    video = jnp.asarray(rng.random((b, f, 32, 32, 3)), jnp.float32)
    clean = video[:, 0]
    ids = jnp.asarray(np.concatenate([np.full((k, 1), 48), rng.integers(0, 48, (k, 4)), np.full((k, 1), 49)], 1), jnp.int32)
    mask = jnp.ones_like(ids)
    labels = jnp.asarray([0, 3, 1])
    fi = jnp.zeros(b, jnp.int32)
    vl, fl, il, acc, sl = ct.video_caption_losses(model, jnp.log(10.0), video, clean, fi, ids, mask, labels)
    perm = video[:, ::-1]
    vl2, fl2, _, _, _ = ct.video_caption_losses(model, jnp.log(10.0), perm, clean, jnp.full(b, f - 1), ids, mask, labels)
    assert abs(float(vl) - float(vl2)) < 1e-5 and abs(float(fl) - float(fl2)) < 1e-5
    vl3 = ct.video_caption_losses(model, jnp.log(10.0), video, clean, fi, ids, mask, jnp.asarray([2, 2, 4]))[0]
    assert abs(float(vl3) - float(vl)) > 1e-4
    # by hand
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    px = ((np.asarray(video).reshape(-1, 32, 32, 3) - np.asarray(C.OPENAI_CLIP_MEAN)) / np.asarray(C.OPENAI_CLIP_STD))
    img = unit(np.asarray(model.get_image_features(jnp.asarray(px.transpose(0, 3, 1, 2), jnp.float32)))).reshape(b, f, -1)
    txt = unit(np.asarray(model.get_text_features(ids, mask)))
    logits = np.exp(float(model.logit_scale[...])) * unit(img.mean(1)) @ txt.T
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert abs(-logp[np.arange(b), np.asarray(labels)].mean() - float(vl)) < 1e-4
    assert float(acc) == np.mean(logits.argmax(-1) == np.asarray(labels))
    assert np.isfinite(float(il)) and float(il) > 0
    # the caption spread loss: ln K when every caption is the same text, lower for distinct ones
    same = jnp.broadcast_to(ids[:1], ids.shape)
    sl_same = ct.video_caption_losses(model, jnp.log(10.0), video, clean, fi, same, mask, labels)[4]
    assert abs(float(sl_same) - np.log(k)) < 1e-4 and float(sl) < float(sl_same)


def test_resolve_train_config():
    assert ct.resolve_train_config() == ct.CLIPTrainConfig()
    c = ct.resolve_train_config(steps=7, batch_size=None, lr=1e-3)
    assert (c.steps, c.lr, c.batch_size) == (7, 1e-3, ct.CLIPTrainConfig().batch_size)
    with pytest.raises(ValueError, match="not both"):
        ct.resolve_train_config(ct.CLIPTrainConfig(), steps=3)


def test_retrieval_confusion_agrees_with_evaluate_clip(trained, world):
    out, m = trained
    c = m["eval_confusion"]
    assert c["top1"] == pytest.approx(m["eval"]["retrieval_top1_video"], abs=1e-6)
    assert sum(v["n"] for v in c["by_event"].values()) == m["eval"]["num_videos"]
    wrong = round((1 - c["top1"]) * m["eval"]["num_videos"])
    assert c["wrong_same_event"] + c["wrong_other_event"] == wrong
    assert all(t != g and n >= 1 for t, g, n in c["most_confused"])


def test_default_spec_fits_the_size_budget():
    """The shipped CLIP must stay < 8 MB: the default architecture's fp32 parameters."""
    from flax import nnx
    import jax
    spec = ct.TinyCLIPSpec()
    model = nnx.eval_shape(lambda: C.CLIPModel(spec.config(800, 798, 799, 799), rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert 4 * n < 8e6, n
