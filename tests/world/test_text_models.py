"""The world's VDM text side (T5 tokenizer over the world's words, a tiny random UMT5) and the
assembled diffusers Wan directory: loads through our pipeline and through diffusers, generates
videos of the right shape, and matches diffusers' WanPipeline from the same noise."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from vans_jax.convert import umt5 as umt5_convert  # noqa: E402
from vans_jax.data import synthetic  # noqa: E402
from vans_jax.models.wan import pipeline as wp  # noqa: E402
from vans_jax.models.wan.text import encode_prompts  # noqa: E402
from vans_jax.models.wan.vae import WanVAE  # noqa: E402
from vans_jax.world import text_models as tm  # noqa: E402
from vans_jax.world.vae_train import TinyVAESpec, save_vae  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DIT = dict(dim=64, num_layers=2, num_heads=2, ffn_dim=128, patch_size=(1, 2, 2), in_channels=16, out_channels=16,
           text_dim=32, freq_dim=32, eps=1e-6, rope_max_seq_len=64)
CAPTIONS = ["The red ball keeps moving left.", "Place a blue block on top."]


@pytest.fixture(scope="module")
def texts():
    return synthetic.world_texts()


@pytest.fixture(scope="module")
def vdm_dir(tmp_path_factory, texts):
    d = str(tmp_path_factory.mktemp("vdm"))
    vae_src = str(tmp_path_factory.mktemp("vae_src"))
    vae = WanVAE(TinyVAESpec(base_dim=4).config(), rngs=nnx.Rngs(0))
    save_vae(vae, vae_src)
    info = tm.write_vdm_dir(d, DIT, vae_dir=vae_src, flow_shift=3.0, seed=0, texts=texts)
    return d, info


def test_tokenizer_covers_the_world(tmp_path, texts):
    tok = tm.build_umt5_tokenizer(str(tmp_path), texts)
    assert isinstance(tok, transformers.T5Tokenizer)
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    unk = tok.convert_tokens_to_ids(tm.UNK)
    assert (tok.pad_token_id, tok.eos_token_id, unk) == (0, 1, 2)
    for t in texts:
        ids = tok(t)["input_ids"]
        assert ids == again(t)["input_ids"] and ids[-1] == 1 and unk not in ids, t
        assert tok.decode(ids, skip_special_tokens=True) == t                       # lossless
        pieces = tok.convert_ids_to_tokens(ids[:-1])
        assert all(len(p) > 1 or not p.isalpha() for p in pieces), pieces           # no spelled-out words
    # text outside the world still tokenizes (characters), without unknown tokens for ASCII
    ids = tok("A zebra jumps 42 times!")["input_ids"]
    assert unk not in ids and tok.decode(ids, skip_special_tokens=True) == "A zebra jumps 42 times!"


def test_encoder_export_matches_transformers(tmp_path, texts):
    tok = tm.build_umt5_tokenizer(str(tmp_path / "tok"), texts)
    cfg = tm.tiny_umt5_config(len(tok), 32)
    enc = tm.build_umt5_encoder(cfg, seed=0)
    d = tm.save_umt5_encoder(enc, str(tmp_path / "te"))
    ours = umt5_convert.from_pretrained(d)
    ref = transformers.UMT5EncoderModel.from_pretrained(d).eval()
    ids = tok(CAPTIONS, padding="max_length", max_length=16, return_tensors="np")
    with torch.no_grad():
        r = ref(input_ids=torch.tensor(ids["input_ids"]), attention_mask=torch.tensor(ids["attention_mask"]))
    a = ours(jnp.asarray(ids["input_ids"]), jnp.asarray(ids["attention_mask"]))
    b = enc(jnp.asarray(ids["input_ids"]), jnp.asarray(ids["attention_mask"]))
    m = ids["attention_mask"][..., None] > 0
    assert rel_err(np.where(m, a, 0), np.where(m, r.last_hidden_state.numpy(), 0)) < 1e-4
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert torch.equal(ref.shared.weight, ref.encoder.embed_tokens.weight)       # tied as transformers ties


def test_captions_are_clearly_separated(tmp_path, texts):
    tok = tm.build_umt5_tokenizer(str(tmp_path), texts)
    enc = tm.build_umt5_encoder(tm.tiny_umt5_config(len(tok), 32), seed=0)
    captions = sorted({t for t in texts if t.count(".") == 1 and t.endswith(".") and "," not in t})
    assert len(captions) > 100
    s = tm.caption_separation(enc, tok, captions)
    # one differing word moves at least one position by a sizable fraction of a token's norm
    assert s["min_caption_distance"] > 0.5 * s["token_norm"], s


def test_vdm_dir_loads_and_generates(vdm_dir):
    d, info = vdm_dir
    assert set(os.listdir(d)) >= {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert info["text"]["d_model"] == 32 and info["bytes"] < 5_000_000
    models = wp.from_pretrained(d)
    assert models.dit.cfg.text_dim == 32 and models.text_encoder.config.d_model == 32
    assert models.scheduler.flow_shift == 3.0 and models.scheduler.unipc_mismatches() == []
    clip = np.random.default_rng(0).integers(0, 256, (2, 9, 64, 64, 3), dtype=np.uint8)
    refs = wp.reference_latents(models, clip, n_ref=3, height=None, width=None)
    assert refs.shape == (2, 16, 3, 8, 8)
    video = wp.generate(models, CAPTIONS, ref_latents=refs, num_steps=2, guidance_scale=3.0, height=64, width=64,
                        num_frames=9, max_sequence_length=32)
    assert video.shape == (2, 9, 64, 64, 3) and video.dtype == np.uint8


def _diffusers_pipeline(d):
    """diffusers.WanPipeline from the directory. Without ``accelerate`` diffusers cannot
    ``from_pretrained`` a WanTransformer3DModel (it keeps modules in fp32, which needs
    low_cpu_mem_usage): then the transformer is built from its config.json and loaded from its
    safetensors file (strict), and every other component comes from the directory as usual."""
    import importlib.util

    from safetensors.torch import load_file

    if importlib.util.find_spec("accelerate") is not None:
        return diffusers.WanPipeline.from_pretrained(d)
    dit = diffusers.WanTransformer3DModel.from_config(diffusers.WanTransformer3DModel.load_config(d, subfolder="transformer"))
    dit.load_state_dict(load_file(os.path.join(d, "transformer", "diffusion_pytorch_model.safetensors")), strict=True)
    return diffusers.WanPipeline.from_pretrained(d, transformer=dit.eval())


def test_vdm_dir_matches_diffusers_pipeline(vdm_dir):
    d, _ = vdm_dir
    pipe = _diffusers_pipeline(d)
    assert isinstance(pipe.scheduler, diffusers.UniPCMultistepScheduler) and pipe.scheduler.config.flow_shift == 3.0
    models = wp.from_pretrained(d)
    noise = np.random.default_rng(1).standard_normal((2, 16, 3, 4, 4)).astype(np.float32)
    kw = dict(height=32, width=32, num_frames=9)
    with torch.no_grad():
        ref = pipe(prompt=CAPTIONS, latents=torch.from_numpy(noise), num_inference_steps=3, guidance_scale=3.0,
                   max_sequence_length=32, output_type="np", **kw).frames
    ours = wp.generate(models, CAPTIONS, noise=noise, num_steps=3, guidance_scale=3.0, shift=None,
                       max_sequence_length=32, output_type="float", **kw)
    assert ours.shape == ref.shape == (2, 9, 32, 32, 3)
    assert rel_err(ours, ref) < 1e-4
    # the text side through the pipeline: the two captions differ clearly
    e = np.asarray(encode_prompts(models.text_encoder, models.tokenizer, CAPTIONS, 32))
    assert np.abs(e[0] - e[1]).max() > 0.5


def test_write_vdm_dir_reuses_and_checks(vdm_dir, tmp_path):
    d, _ = vdm_dir
    before = open(os.path.join(d, "text_encoder", "model.safetensors"), "rb").read()
    tm.write_vdm_dir(d, os.path.join(d, "transformer"))                  # same transformer, text side kept
    assert open(os.path.join(d, "text_encoder", "model.safetensors"), "rb").read() == before
    with pytest.raises(ValueError, match="text_dim is 48"):
        tm.write_vdm_dir(d, {**DIT, "text_dim": 48})
    with pytest.raises(FileNotFoundError, match="no VAE"):
        tm.write_vdm_dir(str(tmp_path / "empty"), DIT)
    idx = json.load(open(os.path.join(d, "model_index.json")))
    assert idx["_class_name"] == "WanPipeline" and idx["vae"] == ["diffusers", "AutoencoderKLWan"]
