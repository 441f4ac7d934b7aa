"""VANSPipeline end to end on tiny random HF Qwen2.5-VL + diffusers Wan directories: shapes, the
response parsing and fallback, determinism, the reference-latent path, batching (multi-future,
still images), one compilation per shape, the fine-tuned DiT / LoRA arguments and bad input."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tests import tiny as T  # noqa: E402
from vans_jax.convert.wan_dit import iter_dit_tensors  # noqa: E402
from vans_jax.convert.safetensors_io import save_file  # noqa: E402
from vans_jax.data.video_io import (VideoError, read_video, reference_clip, resize_center_crop,  # noqa: E402
                                    write_video)
from vans_jax.sampling import text as generation  # noqa: E402
from vans_jax.sampling import wan as wp  # noqa: E402
from vans_jax.pipeline import (InvalidResponseError, InvalidResponseWarning, VANSPipeline,  # noqa: E402
                               VANSSettings, load_clip)
from vans_jax.rl.rewards import extract_answer  # noqa: E402
from vans_jax.sampling import flow  # noqa: E402

Q = "What will happen next?"


@pytest.fixture(scope="module")
def dirs(tiny_vans):
    return tiny_vans


@pytest.fixture(scope="module")
def pipe(dirs):
    return VANSPipeline.from_pretrained(dirs["vlm"], dirs["vdm"], settings=VANSSettings(**T.SETTINGS))


@pytest.fixture(scope="module")
def first(pipe, dirs):
    with pytest.warns(InvalidResponseWarning, match="no valid"):
        return pipe(dirs["clip"], Q, seed=0)


def test_end_to_end_outputs(first, pipe):
    assert len(first) == 1 and first.videos.shape == (1, T.F, T.H, T.W, 3) and first.videos.dtype == np.uint8
    a = first[0]
    assert a.video.shape == (T.F, T.H, T.W, 3) and a.question == Q and a.seed == 0
    assert 1 <= a.num_tokens <= T.SETTINGS["max_new_tokens"] and isinstance(a.text, str) and a.text.strip()
    # a random VLM writes no [Ans] block: reported, and the caption is the documented fallback
    assert not a.valid_format and a.fallback_used
    assert a.caption == extract_answer(a.text) == a.text.strip()
    assert set(first.timings) >= {"vlm_s", "vdm_s", "reference_s", "diffusion_s", "total_s"}
    assert first.settings == pipe.settings and first.texts == [a.text] and first.captions == [a.caption]
    # not a blank or saturated video
    assert 5 < a.video.std() and a.video.min() < 250 and a.video.max() > 5
    assert a.to_json()["fallback_used"] is True and "video" not in a.to_json()


def test_same_seed_same_output_and_compiled_once(pipe, dirs, first):
    caches = lambda: (generation._generate_jit._cache_size(), flow._sample_jit._cache_size(),
                      wp._encode_jit._cache_size(), wp._decode_jit._cache_size())
    before = caches()
    with pytest.warns(InvalidResponseWarning):
        again = pipe(dirs["clip"], Q, seed=0)
        # another question (same prompt bucket) and seed: same shapes, nothing recompiles
        other = pipe(dirs["clip"], "What should I do next?", seed=7)
    assert caches() == before
    assert again[0].text == first[0].text
    np.testing.assert_array_equal(again.videos, first.videos)
    assert np.abs(other.videos.astype(int) - first.videos.astype(int)).max() > 10


def test_reference_latents_carry_the_input_clip(pipe, dirs, monkeypatch):
    """Same caption and seed: the video follows the input clip through the reference latents
    (exactly those of the documented reference clip), and without references (n_ref=0, plain T2V)
    it does not depend on the clip at all."""
    cap = "the red cat runs"
    a = pipe.render(dirs["clip"], cap, seed=3)
    np.testing.assert_array_equal(a, pipe.render(dirs["clip"], cap, seed=3))
    b = pipe.render(dirs["other"], cap, seed=3)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() >= 4 and diff.mean() > 0.2
    t2v_a = pipe.render(dirs["clip"], cap, seed=3, n_ref=0)
    np.testing.assert_array_equal(t2v_a, pipe.render(dirs["other"], cap, seed=3, n_ref=0))
    assert np.abs(t2v_a.astype(int) - a.astype(int)).max() >= 3

    # what reaches the sampler: the last 5 frames at 8 fps, resized + cropped, VAE mean, frames floor(linspace)
    seen = {}
    real = wp.generate
    monkeypatch.setattr(wp, "generate", lambda *args, **kw: seen.update(kw) or real(*args, **kw))
    pipe.render(dirs["clip"], cap, seed=3)
    frames, fps = read_video(dirs["clip"])
    ref_clip = reference_clip(frames, fps, 5, T.H, T.W, T.FPS, mode="last")
    np.testing.assert_array_equal(ref_clip, resize_center_crop(frames[-5:], T.H, T.W))  # 8 fps in, 8 fps out
    want = wp.reference_latents(pipe.vdm, ref_clip, n_ref=3, height=None, width=None)
    assert seen["ref_latents"].shape == (1, T.Z, 3, T.H // 8, T.W // 8)
    np.testing.assert_allclose(np.asarray(seen["ref_latents"]), np.asarray(want), rtol=0, atol=1e-6)


def test_parsed_caption_drives_the_video(pipe, dirs, monkeypatch):
    """A response in the VANS format: think and caption are parsed and the caption (only) is rendered."""
    monkeypatch.setattr(pipe.tokenizer, "decode", lambda *a, **k: "[Think] it moves right [/Think][Ans] the red cat "
                                                                  "runs [/Ans]")
    out = pipe(dirs["clip"], Q, seed=0)
    a = out[0]
    assert a.valid_format and a.think == "it moves right" and a.caption == "the red cat runs"
    np.testing.assert_array_equal(a.video, pipe.render(dirs["clip"], "the red cat runs", seed=0)[0])
    # fallback: an open [Ans] without its closing tag -> extract_answer's text; "error" refuses
    monkeypatch.setattr(pipe.tokenizer, "decode", lambda *a, **k: "[Think] hmm [/Think] [Ans] the dog")
    with pytest.warns(InvalidResponseWarning):
        assert pipe.answer(dirs["clip"], Q)[0].caption == "the dog"
    with pytest.raises(InvalidResponseError, match=r"no valid \[Think\]"):
        pipe(dirs["clip"], Q, fallback="error")


@pytest.mark.slow
def test_multi_future_image_and_batch_independence(pipe, dirs, first):
    q2 = "What should I do next?"
    with pytest.warns(InvalidResponseWarning):
        multi = pipe(dirs["clip"], [Q, q2], seed=0)          # two futures of one clip, one batch
        single = pipe(dirs["clip"], q2, seed=1)
    assert len(multi) == 2 and multi.videos.shape == (2, T.F, T.H, T.W, 3)
    assert [a.seed for a in multi] == [0, 1] and [a.question for a in multi] == [Q, q2]
    # sample i of a batch is the sample alone with seed + i
    assert multi[0].text == first[0].text and multi[1].text == single[0].text
    assert np.abs(multi.videos[0].astype(int) - first.videos[0].astype(int)).max() <= 2
    assert np.abs(multi.videos[1].astype(int) - single.videos[0].astype(int)).max() <= 2
    # what varies with the batch is float rounding only: the same batch reproduces the run exactly
    with pytest.warns(InvalidResponseWarning):
        again = pipe(dirs["clip"], [Q, q2], seed=0)
    assert [a.text for a in again] == [a.text for a in multi] and np.array_equal(again.videos, multi.videos)

    # a still image (file or array) is a static clip; several clips with one question pair up
    img = T.moving_square()[6]
    png = str(dirs["root"] / "still.png")
    from PIL import Image
    Image.fromarray(img).save(png)
    clip = load_clip(png, image_fps=T.FPS)
    assert clip.is_image and clip.frames.shape == (1,) + img.shape
    with pytest.warns(InvalidResponseWarning):
        from_file = pipe.render(png, "the red cat", seed=0)
        from_array = pipe.render(img, "the red cat", seed=0)
        static = pipe.render((np.repeat(img[None], 12, 0), T.FPS), "the red cat", seed=0)
        pair = pipe.answer([png, dirs["clip"]], Q)
    np.testing.assert_array_equal(from_file, from_array)
    np.testing.assert_array_equal(from_file, static)
    assert [a.source for a in pair] == [png, dirs["clip"]]

    # G sampled answers per pair from one prefill
    with pytest.warns(InvalidResponseWarning):
        sampled = pipe.answer(dirs["clip"], Q, seed=5, num_futures=3, temperature=1.0)
    assert [a.seed for a in sampled] == [5, 6, 7] and {a.question for a in sampled} == {Q}
    assert len(set(sampled.texts)) > 1 and sampled.videos is None


def test_short_clip_repeats_frames(pipe, dirs):
    """A clip shorter than the reference clip: the reference clip is its frames re-timed to fps,
    padded in FRONT with the first frame (documented); a one-frame clip works too."""
    frames = T.moving_square(num_frames=2, height=T.H, width=T.W)
    got = pipe.render((frames, T.FPS), "the dog", seed=0)
    padded = np.concatenate([np.repeat(frames[:1], 4, 0), frames[1:]])       # 5 = reference_frames
    want = pipe.render((padded, T.FPS), "the dog", seed=0)
    np.testing.assert_array_equal(got, want)
    with pytest.warns(InvalidResponseWarning):
        assert pipe(frames[:1], Q, video_fps=T.FPS)[0].video.shape == (T.F, T.H, T.W, 3)


def test_bad_input(pipe, dirs, tmp_path):
    with pytest.raises(VideoError, match="missing"):
        pipe(str(tmp_path / "nope.mp4"), Q)
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(os.urandom(3000))
    with pytest.raises(VideoError, match="corrupt"):
        pipe(str(bad), Q)
    with pytest.raises(VideoError, match="missing"):
        pipe(str(tmp_path / "nope.png"), Q)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(VideoError, match="corrupt"):
        pipe(str(tmp_path / "bad.png"), Q)
    with pytest.raises(ValueError, match="question 0 is empty"):
        pipe(dirs["clip"], "   ")
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe(dirs["clip"], Q, height=40)
    with pytest.raises(ValueError, match="4k\\+1"):
        pipe(dirs["clip"], Q, num_frames=6)
    with pytest.raises(ValueError, match="reference_frames"):
        pipe(dirs["clip"], Q, reference_frames=8)
    with pytest.raises(ValueError, match="video_fps"):
        pipe(T.moving_square(), Q)
    with pytest.raises(ValueError, match="2 videos and 3 questions"):
        pipe([dirs["clip"], dirs["clip"]], [Q, Q, Q])
    with pytest.raises(ValueError, match="fallback"):
        pipe(dirs["clip"], Q, fallback="guess")
    with pytest.raises(TypeError, match="unknown setting"):
        pipe(dirs["clip"], Q, nun_steps=3)
    with pytest.raises(ValueError, match="num_futures"):
        pipe.answer(dirs["clip"], Q, num_futures=0)
    with pytest.raises(ValueError, match="2 seeds for 1 samples"):
        pipe(dirs["clip"], Q, seed=[1, 2])


def test_settings_from_dict():
    s = VANSSettings.from_dict({"height": 64, "num_steps": 4, "fps": 4})
    assert (s.height, s.num_steps, s.fps, s.width) == (64, 4, 4.0, 640)
    with pytest.warns(UserWarning, match="unknown"):
        VANSSettings.from_dict({"height": 64, "colour": "red"})
    d = VANSSettings().to_dict()
    assert d["num_frames"] == 33 and d["cfg_scale"] == 5.0 and d["n_ref"] == 6 and d["fps"] == 11.0


def test_vans_dit_file_replaces_the_transformer(pipe, dirs, tmp_path):
    """The released VANS layout (original Wan keys with a ``dit.`` prefix) loads as vans_dit."""
    tensors = {"dit." + k: np.asarray(v) * (1.5 if k.endswith("ffn.0.weight") else 1.0)
               for k, v in iter_dit_tensors(pipe.vdm.dit, "wan")}
    f = str(tmp_path / "vdm.safetensors")
    save_file(tensors, f)
    tuned = VANSPipeline.from_pretrained(dirs["vlm"], dirs["vdm"], vans_dit=f, settings=pipe.settings)
    assert tuned.sources["dit"] == f
    base = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(pipe.vdm.dit, nnx.Param))}
    new = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(tuned.vdm.dit, nnx.Param))}
    changed = [k for k in base if not np.array_equal(base[k], new[k])]
    assert changed and all("ffn" in ".".join(map(str, k)) for k in changed)


def test_lora_adapter_is_merged_into_the_vlm(pipe, dirs, tmp_path):
    """``lora=`` takes a PEFT adapter directory: the VLM's weights become the merged ones."""
    from vans_jax.convert.peft_lora import export_peft_adapter
    from vans_jax.models import qwen2_5_vl as qwen
    from vans_jax.models.lora import lora_state, merge_lora

    adapted = qwen.from_pretrained(dirs["vlm"], lora=qwen.LoRAConfig(rank=2, alpha=4))
    rng = np.random.default_rng(0)
    nnx.update(adapted, jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(x.dtype), lora_state(adapted)))
    adapter = export_peft_adapter(adapted, str(tmp_path / "adapter"))
    tuned = VANSPipeline.from_pretrained(dirs["vlm"], dirs["vdm"], lora=adapter, settings=pipe.settings)
    merge_lora(adapted)
    assert tuned.sources["lora"] == adapter
    for name in ("q_proj", "down_proj"):
        want = np.asarray(getattr(adapted.layers, name).kernel[...])
        got = np.asarray(getattr(tuned.vlm.layers, name).kernel[...])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert np.abs(got - np.asarray(getattr(pipe.vlm.layers, name).kernel[...])).max() > 1e-3
