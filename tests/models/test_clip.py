"""CLIP parity against transformers.CLIPModel on tiny random configs (no downloads)."""
import os
import string

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vans_jax.convert.safetensors_io import Checkpoint, CheckpointError, save_file  # noqa: E402
from vans_jax.convert import clip as clip_ckpt  # noqa: E402
from vans_jax.models import clip  # noqa: E402
from tests.utils import rel_err as _rel

BOS, EOS, VOCAB = 97, 98, 99


def _hf_config(eos_token_id=EOS, act="quick_gelu"):
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id,
                         bos_token_id=BOS, pad_token_id=1, hidden_act=act),
        vision_config=dict(hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
                           image_size=30, patch_size=10, hidden_act=act),
        projection_dim=24, logit_scale_init_value=2.0)


def _save(tmp, hf_cfg, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(hf_cfg).eval()
    with torch.no_grad():  # random, non-trivial norms and logit scale
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("clip"))
    return d, _save(d, _hf_config())


def _inputs(seed=0):
    rs = np.random.RandomState(seed)
    px = rs.randn(3, 3, 30, 30).astype(np.float32)
    ids = rs.randint(2, BOS, (3, 12))
    ids[:, 0] = BOS
    ends = [5, 11, 7]
    mask = np.zeros_like(ids)
    for b, e in enumerate(ends):
        ids[b, e] = EOS
        ids[b, e + 1:] = EOS  # pad with the EOS id, as the CLIP tokenizer does
        mask[b, :e + 1] = 1
    return px, ids, mask


def test_image_and_text_features_match_transformers(saved):
    d, hf = saved
    model = clip_ckpt.from_pretrained(d)
    px, ids, mask = _inputs()
    with torch.no_grad():
        ref_img = hf.get_image_features(torch.tensor(px)).pooler_output.numpy()
        ref_txt = hf.get_text_features(torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output.numpy()
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), attention_mask=torch.tensor(mask))
    img = model.get_image_features(jnp.asarray(px))
    txt = model.get_text_features(jnp.asarray(ids), jnp.asarray(mask))
    assert img.shape == (3, 24) and txt.shape == (3, 24)
    assert _rel(img, ref_img) < 1e-4
    assert _rel(txt, ref_txt) < 1e-4
    lpi, lpt, ie, te = model(jnp.asarray(ids), jnp.asarray(px), jnp.asarray(mask))
    assert _rel(lpi, ref.logits_per_image.numpy()) < 1e-4
    assert _rel(lpt, ref.logits_per_text.numpy()) < 1e-4
    assert _rel(te, ref.text_embeds.numpy()) < 1e-4


def test_openai_style_eos_2_pools_at_argmax(tmp_path):
    # configs from before transformers PR #24773 carry eos_token_id=2: pooling at argmax(ids)
    hf = _save(str(tmp_path), _hf_config(eos_token_id=2, act="gelu"), seed=1)
    model = clip_ckpt.from_pretrained(str(tmp_path))
    assert model.config.text.eos_token_id == 2
    _, ids, mask = _inputs(1)
    ids[ids == EOS] = VOCAB - 1  # the EOT token is the largest id
    ids[0, 3] = 2  # a literal id 2 must not be taken as EOT
    with torch.no_grad():
        ref = hf.get_text_features(torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output.numpy()
    assert _rel(model.get_text_features(jnp.asarray(ids), jnp.asarray(mask)), ref) < 1e-4


def test_config_and_mapping_coverage(saved):
    d, _ = saved
    cfg = clip.CLIPConfig.from_pretrained(d)
    assert (cfg.text.hidden_size, cfg.vision.hidden_size, cfg.vision.num_hidden_layers) == (32, 48, 3)
    assert cfg.projection_dim == 24 and cfg.text.eos_token_id == EOS
    # defaults = ViT-B/32; old ``*_config_dict`` entries override
    dflt = clip.CLIPConfig.from_dict({"model_type": "clip", "text_config": {"eos_token_id": 2},
                                      "text_config_dict": {"hidden_act": "quick_gelu"}})
    assert (dflt.vision.image_size, dflt.vision.patch_size, dflt.vision.hidden_size) == (224, 32, 768)
    assert (dflt.text.hidden_size, dflt.text.num_attention_heads, dflt.text.max_position_embeddings) == (512, 8, 77)
    assert dflt.text.eos_token_id == 2 and dflt.projection_dim == 512
    ckpt_keys = set(Checkpoint(d).keys())
    table_keys = {k for e in clip_ckpt.weight_mapping(cfg) for k in e.keys}
    assert table_keys == ckpt_keys


def test_export_round_trip(saved):
    d, _ = saved
    model = clip_ckpt.from_pretrained(d)
    sd = clip_ckpt.export_state_dict(model)
    ck = Checkpoint(d)
    assert set(sd) == set(ck.keys())
    for k in sd:
        np.testing.assert_array_equal(sd[k], ck.get(k), err_msg=k)


def _rewrite(src, dst, edit):
    ck = Checkpoint(src)
    tensors = {k: np.array(ck.get(k)) for k in ck.keys()}
    edit(tensors)
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


def test_bad_checkpoints_name_the_key(saved, tmp_path):
    d, _ = saved
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    _rewrite(d, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="missing key.*layers.1.mlp.fc1.weight"):
        clip_ckpt.from_pretrained(str(tmp_path / "missing"))

    def extra(t):
        t["text_model.encoder.layers.5.self_attn.q_proj.weight"] = np.zeros((32, 32), np.float32)
    _rewrite(d, tmp_path / "extra", extra)
    with pytest.raises(CheckpointError, match="unexpected key.*layers.5.self_attn.q_proj.weight"):
        clip_ckpt.from_pretrained(str(tmp_path / "extra"))

    def bad_shape(t):
        t["text_projection.weight"] = np.zeros((24, 31), np.float32)
    _rewrite(d, tmp_path / "shape", bad_shape)
    with pytest.raises(CheckpointError, match="text_projection.weight.*shape"):
        clip_ckpt.from_pretrained(str(tmp_path / "shape"))

    # old checkpoints saved the position_ids buffers: tolerated
    def pos_ids(t):
        t["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    _rewrite(d, tmp_path / "posids", pos_ids)
    clip_ckpt.from_pretrained(str(tmp_path / "posids"))


def test_bf16_and_mesh_loading(saved):
    d, hf = saved
    from vans_jax.parallel import make_mesh

    mesh = make_mesh({"data": -1})
    model = clip_ckpt.from_pretrained(d, dtype="bfloat16", mesh=mesh)
    k = model.vision_model.layers.self_attn.q_proj.kernel[...]
    assert k.dtype == jnp.bfloat16 and k.shape == (3, 48, 48)
    assert model.logit_scale[...].dtype == jnp.float32
    px, _, _ = _inputs()
    with torch.no_grad():
        ref = hf.get_image_features(torch.tensor(px)).pooler_output.numpy()
    assert _rel(np.asarray(model.get_image_features(jnp.asarray(px)), np.float32), ref) < 5e-2


@pytest.mark.parametrize("hw", [(240, 320), (300, 224), (97, 131), (224, 224), (33, 41)])
def test_preprocess_matches_clip_image_processor(hw):
    proc = transformers.CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(clip.OPENAI_CLIP_MEAN), image_std=list(clip.OPENAI_CLIP_STD), do_convert_rgb=True)
    rs = np.random.RandomState(hw[0])
    frames = rs.randint(0, 256, (2,) + hw + (3,), dtype=np.uint8)
    ref = proc(images=list(frames), return_tensors="np")["pixel_values"]
    out = clip.preprocess_frames(frames, size=224)
    assert out.shape == ref.shape == (2, 3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def _tiny_tokenizer(path):
    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 16
    tok.save_pretrained(path)


def test_tokenizer_and_encoders_match_transformers(saved, tmp_path):
    d, hf = saved
    _tiny_tokenizer(str(tmp_path))
    tok = clip.load_tokenizer(str(tmp_path))
    texts = ["a cat", "a photo of a dog running", "zzz"]
    ids, mask = clip.tokenize(tok, texts, max_length=16)
    assert ids.shape == (3, 16) and ids.dtype == np.int32
    assert (ids[:, 0] == BOS).all() and ids[0, 5] == EOS and mask[0].sum() == 6  # <s> a</w> c a t</w> </s>
    model = clip_ckpt.from_pretrained(d)
    with torch.no_grad():
        ref = hf.get_text_features(torch.tensor(ids, dtype=torch.long),
                                   attention_mask=torch.tensor(mask)).pooler_output.numpy()
    assert _rel(clip.encode_texts(model, tok, texts), ref) < 1e-4
    # frames: uint8 videos (B, F, H, W, 3) through the processor and the image tower
    frames = np.random.RandomState(3).randint(0, 256, (2, 2, 40, 52, 3), dtype=np.uint8)
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    px = proc(images=list(frames.reshape(4, 40, 52, 3)), return_tensors="np")["pixel_values"]
    with torch.no_grad():
        ref_img = hf.get_image_features(torch.tensor(px)).pooler_output.numpy().reshape(2, 2, 24)
    feats = clip.encode_frames(model, frames, batch_size=3)
    assert feats.shape == (2, 2, 24)
    assert _rel(feats, ref_img) < 1e-4


def test_preprocess_crop_larger_than_resize_pads_like_transformers():
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 32, "width": 32})
    frames = np.random.RandomState(5).randint(0, 256, (1, 30, 25, 3), dtype=np.uint8)
    ref = proc(images=list(frames), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(clip.preprocess_frames(frames, size=20, crop_size=32), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hw,size,crop,resample", [((240, 320), 224, None, "bicubic"), ((97, 131), 50, None, "bicubic"),
                                                   ((64, 64), 32, None, "bilinear"), ((30, 25), 20, 32, "bicubic"),
                                                   ((33, 33), 33, None, "bicubic")])
def test_preprocess_on_device_is_bit_identical_to_pil(hw, size, crop, resample):
    """The device path (PIL's fixed-point filters emulated in int32) gives the PIL path's values
    exactly: random and smooth frames, down- and up-scaling, identity, a padded crop."""
    rs = np.random.RandomState(hw[0] + size)
    frames = rs.randint(0, 256, (3,) + hw + (3,), dtype=np.uint8)
    frames[1] = np.clip(np.cumsum(rs.randint(-3, 4, hw + (3,)), axis=1) + 128, 0, 255).astype(np.uint8)
    frames[2] = 0
    frames[2, hw[0] // 4:hw[0] // 2, hw[1] // 3:] = (250, 20, 30)   # a flat shape on black: the world's frames
    ref = clip.preprocess_frames(frames, size=size, crop_size=crop, resample=resample)
    out = clip.preprocess_frames_on_device(jnp.asarray(frames), size=size, crop_size=crop, resample=resample)
    assert isinstance(out, jax.Array) and out.shape == ref.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_preprocess_on_device_rejects_bad_frames():
    with pytest.raises(ValueError, match=r"uint8"):
        clip.preprocess_frames_on_device(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\).*\(8, 8, 3\)"):
        clip.preprocess_frames_on_device(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="lanczos"):
        clip.preprocess_frames_on_device(np.zeros((1, 8, 8, 3), np.uint8), resample="lanczos")
