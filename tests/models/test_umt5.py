"""UMT5 encoder + Wan prompt encoding: parity against transformers.UMT5EncoderModel and diffusers'
WanPipeline._get_t5_prompt_embeds on tiny random models and a tiny in-test tokenizer (no
downloads)."""
import json
import os
import shutil
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from vans_jax.convert import umt5 as convert  # noqa: E402
from vans_jax.convert.safetensors_io import Checkpoint, CheckpointError, save_file  # noqa: E402
from vans_jax.models.wan import text  # noqa: E402
from vans_jax.models.wan.umt5 import UMT5Config, UMT5Encoder, relative_position_bucket  # noqa: E402
from tests.utils import rel_err as _rel

VOCAB = 300
TINY = dict(vocab_size=VOCAB, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=2,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)


def _save(tmp, seed=0, **over):
    torch.manual_seed(seed)
    model = transformers.UMT5EncoderModel(transformers.UMT5Config(**{**TINY, **over})).eval()
    with torch.no_grad():  # non-trivial norm weights
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("umt5"))
    return d, _save(d)


@pytest.fixture(scope="module")
def loaded(saved):
    return convert.from_pretrained(saved[0], "float32")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    pieces = ["▁a", "▁cat", "▁dog", "▁the", "▁runs", "▁on", "▁red", "▁grass", "▁video", "▁of", "▁big"]
    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(p, -3.0) for p in pieces] + [(c, -6.0) for c in chars]
    tok = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    d = str(tmp_path_factory.mktemp("tok"))
    tok.save_pretrained(d)
    return text.load_tokenizer(d)


def _batch(seed=0, lens=(9, 17, 4), n=17):
    rs = np.random.RandomState(seed)
    ids = rs.randint(2, VOCAB, (len(lens), n))
    mask = np.zeros_like(ids)
    for b, l in enumerate(lens):
        ids[b, l - 1] = 1           # </s>
        ids[b, l:] = 0              # <pad>
        mask[b, :l] = 1
    return ids, mask


def _hf(model, ids, mask):
    with torch.no_grad():
        return model(torch.as_tensor(ids), torch.as_tensor(mask)).last_hidden_state.numpy()


# ------------------------------------------------------------------------------------------ model


def test_relative_buckets_match_transformers():
    from transformers.models.umt5.modeling_umt5 import UMT5Attention
    rel = np.arange(-1500, 1500)
    for nb, md in ((32, 128), (16, 20), (64, 256)):
        att = UMT5Attention(transformers.UMT5Config(**{**TINY, "relative_attention_num_buckets": nb,
                                                       "relative_attention_max_distance": md}),
                            has_relative_attention_bias=True)
        ref = att._relative_position_bucket(torch.as_tensor(rel)).numpy()
        np.testing.assert_array_equal(relative_position_bucket(rel, nb, md), ref)


def test_config_from_dict():
    cfg = UMT5Config.from_dict({"model_type": "umt5", **TINY, "feed_forward_proj": "gated-gelu",
                                "dense_act_fn": "gelu", "is_gated_act": False})
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new" and cfg.d_model == 64  # as transformers
    assert UMT5Config.from_dict({"feed_forward_proj": "relu"}).is_gated_act is False
    assert UMT5Config().d_model == 4096 and UMT5Config().num_heads == 64  # umt5-xxl defaults
    with pytest.raises(ValueError, match="model_type"):
        UMT5Config.from_dict({"model_type": "t5"})
    # per-layer relative bias: one stacked (layers, buckets, heads) parameter, heads logically sharded
    from vans_jax.parallel import variable_axes
    enc = UMT5Encoder(cfg)
    assert enc.layers.relative_attention_bias[...].shape == (2, 32, 4)
    assert variable_axes(enc.layers.relative_attention_bias) == ("layers", None, "heads")
    with pytest.raises(ValueError, match="feed_forward_proj"):
        UMT5Config.from_dict({"feed_forward_proj": "gelu-gated"})
    with pytest.raises(ValueError, match="unsupported activation"):
        UMT5Config.from_dict({"feed_forward_proj": "gated-foo"})


def test_parity_fp32_with_padding(saved, loaded):
    _, hf = saved
    ids, mask = _batch()
    ref = _hf(hf, ids, mask)
    out = np.asarray(loaded(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == ref.shape and out.dtype == np.float32
    for b, l in enumerate(mask.sum(1)):
        assert _rel(out[b, :l], ref[b, :l]) < 1e-4, b
    # padded query positions are computed the same way too
    assert _rel(out, ref) < 1e-4
    # no mask = all valid
    ref2 = _hf(hf, ids, np.ones_like(mask))
    assert _rel(loaded(jnp.asarray(ids)), ref2) < 1e-4


def test_parity_not_gated(tmp_path):
    hf = _save(str(tmp_path), seed=1, feed_forward_proj="relu", num_layers=1)
    enc = convert.from_pretrained(str(tmp_path))
    assert enc.layers.wi_1 is None
    ids, mask = _batch(1, lens=(5, 8), n=8)
    assert _rel(enc(ids, mask), _hf(hf, ids, mask)) < 1e-4


def test_bf16(saved):
    d, hf = saved
    enc = convert.from_pretrained(d, "bfloat16")
    assert enc.layers.q.kernel[...].dtype == jnp.bfloat16
    ids, mask = _batch()
    out = enc(ids, mask)
    assert out.dtype == jnp.bfloat16
    ref = _hf(hf, ids, mask)
    for b, l in enumerate(mask.sum(1)):
        assert _rel(np.asarray(out[b, :l], np.float32), ref[b, :l]) < 3e-2


# ------------------------------------------------------------------------------------------ loading


def _rewrite(src, dst, edit):
    """Copies a save_pretrained dir, editing its tensors dict with ``edit``."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = {k: np.array(v) for k, v in Checkpoint(src).items()}
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_diffusers_layout_and_tied_embedding_keys(saved, loaded, tmp_path):
    src, _ = saved
    ids, mask = _batch()
    want = np.asarray(loaded(ids, mask))
    # diffusers Wan pipeline dir: <root>/text_encoder holds the UMT5EncoderModel; both embed keys
    root = tmp_path / "wan"
    _rewrite(src, str(root / "text_encoder"),
             lambda t: t.__setitem__("encoder.embed_tokens.weight", t["shared.weight"].copy()))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    np.testing.assert_array_equal(np.asarray(convert.from_pretrained(str(root))(ids, mask)), want)
    # only the encoder's copy of the embedding
    only = _rewrite(src, str(tmp_path / "only"),
                    lambda t: t.__setitem__("encoder.embed_tokens.weight", t.pop("shared.weight")))
    np.testing.assert_array_equal(np.asarray(convert.from_pretrained(only)(ids, mask)), want)
    # untied values are refused
    def untie(t):
        t["encoder.embed_tokens.weight"] = t["shared.weight"] + 1.0
    with pytest.raises(CheckpointError, match="different values"):
        convert.from_pretrained(_rewrite(src, str(tmp_path / "untied"), untie))


def test_ignore_decoder(saved, tmp_path):
    src, _ = saved
    d = _rewrite(src, str(tmp_path / "full"), lambda t: t.update(
        {"decoder.final_layer_norm.weight": np.ones(64, np.float32),
         "lm_head.weight": np.zeros((VOCAB, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected key.*ignore_decoder=True.*decoder\.final_layer_norm"):
        convert.from_pretrained(d)
    convert.from_pretrained(d, ignore_decoder=True)


def test_bad_keys(saved, tmp_path):
    src, _ = saved
    k_bias = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    k_wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"

    def edit(t):
        del t[k_bias]
        t["encoder.block.0.layer.0.SelfAttention.bogus.weight"] = np.zeros(3, np.float32)
        t[k_wo] = t[k_wo][:, :50]
    d = _rewrite(src, str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointError) as e:
        convert.from_pretrained(d)
    msg = str(e.value)
    assert "1 missing key(s)" in msg and k_bias in msg
    assert "1 unexpected key(s)" in msg and "SelfAttention.bogus.weight" in msg
    assert "1 mis-shaped key(s)" in msg and f"{k_wo}: checkpoint (64, 50), model expects (64, 96)" in msg
    # config / checkpoint disagreement (one more layer in the config)
    d2 = _rewrite(src, str(tmp_path / "layers"), lambda t: None)
    cfg = json.load(open(os.path.join(d2, "config.json")))
    json.dump({**cfg, "num_layers": 3}, open(os.path.join(d2, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"missing key.*encoder\.block\.2\."):
        convert.from_pretrained(d2)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------------ text


def _diffusers_embeds(hf, tok, prompts, max_len):
    """diffusers' own WanPipeline._get_t5_prompt_embeds, called on a stand-in pipeline object."""
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline
    pipe = types.SimpleNamespace(text_encoder=hf, tokenizer=tok)
    with torch.no_grad():
        return WanPipeline._get_t5_prompt_embeds(pipe, prompt=prompts, max_sequence_length=max_len,
                                                 device=torch.device("cpu"), dtype=torch.float32).numpy()


PROMPTS = ["a  cat runs on the red grass\n", "the dog",
           "&amp;a big video of a cat on the grass the dog runs on the red grass of the big dog", "zzz"]
LONG = ["the big dog runs " * 12, "a cat"]  # truncated to max_length (</s> kept)


def test_encode_prompts_matches_diffusers(saved, loaded, tokenizer):
    _, hf = saved
    max_len = 40
    ref = _diffusers_embeds(hf, tokenizer, PROMPTS, max_len)
    ids, mask = text.tokenize(tokenizer, PROMPTS, max_len)
    lens = mask.sum(1)
    assert lens.max() > 16 and lens.min() < lens.max()  # bucketing actually trims
    for bucket in (True, False):
        out = np.asarray(text.encode_prompts(loaded, tokenizer, PROMPTS, max_len, bucket=bucket))
        assert out.shape == (len(PROMPTS), max_len, 64)
        for b, l in enumerate(lens):
            assert not out[b, l:].any() and not ref[b, l:].any()
            assert _rel(out[b, :l], ref[b, :l]) < 1e-4
    # truncation
    ref = _diffusers_embeds(hf, tokenizer, LONG, max_len)
    assert not (ref[0] == 0).all(axis=-1).any()
    assert _rel(text.encode_prompts(loaded, tokenizer, LONG, max_len), ref) < 1e-4
    # a single string works too
    assert text.encode_prompts(loaded, tokenizer, "the dog", max_len).shape == (1, max_len, 64)


def test_negative_prompt_cache(loaded, tokenizer, monkeypatch):
    calls = []
    real = text.encode_prompts
    monkeypatch.setattr(text, "encode_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = text.NegativePromptCache(loaded, tokenizer, "", max_length=24)
    a, b = cache.get(3), cache.get(1)
    assert len(calls) == 1 and a.shape == (3, 24, 64) and b.shape == (1, 24, 64)
    np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(b), np.asarray(real(loaded, tokenizer, [""], 24)))
    assert not np.asarray(b[0, 1:]).any() and np.asarray(b[0, 0]).any()  # "" -> just </s>


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text.load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        text.load_tokenizer(str(tmp_path))
