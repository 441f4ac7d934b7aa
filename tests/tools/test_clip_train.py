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
    cfg = ct.CLIPTrainConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=3)
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
    assert m["caption_loss_last"] < m["caption_loss_first"] and m["image_loss_last"] < m["image_loss_first"], m
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
    assert e == pytest.approx(m["eval"], rel=1e-4, abs=1e-5)      # the saved model is the evaluated one
    from vans_jax.rl.rewards import clip_video_similarity
    feats = C.encode_frames(model, clips.targets[:2])
    assert np.allclose(np.asarray(clip_video_similarity(feats, feats)), 1.0, atol=1e-5)
    untrained = C.CLIPModel(model.config)
    e0 = ct.evaluate_clip(untrained, tok, clips)
    assert abs(e0["clip_v_other_caption"] - e["clip_v_other_caption"]) > 1e-3


def test_degrade_is_bounded_and_random():
    import jax
    x = np.random.default_rng(0).integers(0, 256, (3, 2, 16, 16, 3), dtype=np.uint8)
    a, b = ct.degrade_uint8(x, seed=0), ct.degrade_uint8(x, seed=1)
    assert a.shape == x.shape and a.dtype == np.uint8 and not np.array_equal(a, b)
    y = ct.degrade(jax.random.key(0), jnp.asarray(x[:, 0], jnp.float32) / 255, strength=0.0)
    np.testing.assert_allclose(np.asarray(y), x[:, 0] / 255, atol=1e-6)   # strength 0 = identity
