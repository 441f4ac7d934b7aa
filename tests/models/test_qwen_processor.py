"""Parity of the NumPy Qwen2.5-VL processor / prompt helpers with transformers.

References (transformers 5.x, CPU, no torchvision):
* images: ``Qwen2VLImageProcessorPil`` -- compared bit-exactly (tolerance 0).
* videos: HF's ``Qwen2VLVideoProcessor`` needs torchvision (not installed), so
  the reference is ``Qwen2VLImageProcessorPil`` run per frame, re-assembled
  into temporal patches (slot k of the temporal patch comes from frame 2t+k,
  last frame repeated for odd counts); also tolerance 0.  The patch
  permutation itself is checked against a torch transcription of
  ``Qwen2VLVideoProcessor.patchify``.
* prompt expansion: the real ``Qwen2_5_VLProcessor`` with the tiny tokenizer,
  the PIL image processor and a stand-in video processor that returns our
  pixel values / grids (HF does the token replacement, tokenisation, padding
  and ``second_per_grid_ts``).
"""


import numpy as np
import pytest

from vans_jax.models.qwen2_5_vl import processor as P
from vans_jax.models.qwen2_5_vl import tokenizer as T
from vans_jax.rl.format import TAGS, format_response, parse_response  # noqa: E402

hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


def _rand(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen_tok")
    ids = T.build_tiny_tokenizer(d, added_tokens=TAGS)
    return T.load_tokenizer(d), ids, d


# --------------------------------------------------------------------------- #
# smart_resize
# --------------------------------------------------------------------------- #
def test_smart_resize_matches_hf():
    sizes = [1, 5, 13, 14, 27, 28, 29, 41, 42, 55, 56, 57, 99, 224, 333, 480, 719, 720, 1080, 1920, 4000]
    limits = [(P.IMAGE_MIN_PIXELS, P.IMAGE_MAX_PIXELS), (P.VIDEO_MIN_PIXELS, P.VIDEO_MAX_PIXELS),
              (28 * 28 * 4, 28 * 28 * 16)]
    n = 0
    for h in sizes:
        for w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in limits:
                assert P.smart_resize(h, w, 28, lo, hi) == hf_pil.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
                n += 1
    assert n > 1000


def test_smart_resize_errors():
    with pytest.raises(ValueError, match="aspect ratio"):
        P.smart_resize(10, 2010)
    with pytest.raises(ValueError):  # HF raises too
        hf_pil.smart_resize(10, 2010)
    with pytest.raises(ValueError, match="positive"):
        P.smart_resize(0, 50)


# --------------------------------------------------------------------------- #
# images
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "shape,kw",
    [((50, 70), {}), ((224, 224), {}), ((17, 300), {}), ((500, 90), {}), ((33, 47), {}),
     ((240, 320), {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16})],
)
def test_images_match_hf(shape, kw):
    img = _rand((*shape, 3), seed=shape[0] * 1000 + shape[1])
    hf = hf_pil.Qwen2VLImageProcessorPil(**kw)(images=[img], return_tensors="np")
    pv, grid = P.preprocess_images([img], **kw)
    assert pv.dtype == np.float32 and grid.dtype == np.int64
    np.testing.assert_array_equal(grid, hf["image_grid_thw"])
    assert pv.shape == hf["pixel_values"].shape and pv.shape[1] == 1176
    np.testing.assert_array_equal(pv, hf["pixel_values"])  # bit-exact (tolerance 0)


def test_multiple_images_concat_match_hf():
    imgs = [_rand((60, 90, 3), 1), _rand((130, 40, 3), 2)]
    hf = hf_pil.Qwen2VLImageProcessorPil()(images=imgs, return_tensors="np")
    pv, grid = P.preprocess_images(imgs)
    np.testing.assert_array_equal(grid, hf["image_grid_thw"])
    np.testing.assert_array_equal(pv, hf["pixel_values"])


# --------------------------------------------------------------------------- #
# videos
# --------------------------------------------------------------------------- #
def _hf_video_reference(video, min_pixels, max_pixels):
    """HF PIL image processor per frame, re-assembled into temporal patches."""
    proc = hf_pil.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    per_frame, grid = [], None
    for f in video:
        out = proc(images=[f], return_tensors="np")
        g = out["image_grid_thw"][0]
        rows = out["pixel_values"].reshape(g[1] * g[2], 3, 2, 14, 14)
        np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])  # image = frame duplicated
        per_frame.append(rows[:, :, 0])
        grid = g
    if len(per_frame) % 2:
        per_frame.append(per_frame[-1])
    groups = [np.stack([per_frame[2 * t], per_frame[2 * t + 1]], axis=2) for t in range(len(per_frame) // 2)]
    pv = np.concatenate([g.reshape(g.shape[0], -1) for g in groups], axis=0)
    return pv, [len(per_frame) // 2, int(grid[1]), int(grid[2])]


def test_videos_match_hf_per_frame():
    # two videos of different sizes, odd and even frame counts, a 1-frame video
    videos = [_rand((5, 60, 84, 3), 3), _rand((4, 100, 46, 3), 4), _rand((1, 72, 72, 3), 5)]
    fps = [2.0, 3.0, 1.0]
    lo, hi = 28 * 28 * 4, 28 * 28 * 12  # small limits keep the test fast
    pv, grid, spg = P.preprocess_videos(videos, fps, min_pixels=lo, max_pixels=hi)
    refs = [_hf_video_reference(v, lo, hi) for v in videos]
    np.testing.assert_array_equal(grid, np.array([r[1] for r in refs]))
    np.testing.assert_array_equal(pv, np.concatenate([r[0] for r in refs], axis=0))
    assert spg.dtype == np.float32
    np.testing.assert_array_equal(spg, np.array([2 / f for f in fps], dtype=np.float32))
    assert grid[:, 0].tolist() == [3, 2, 1]


def test_video_defaults_are_hf_video_defaults():
    v = _rand((2, 90, 160, 3), 6)
    _, grid, _ = P.preprocess_videos([v], 1.0)
    h, w = hf_pil.smart_resize(90, 160, 28, 128 * 28 * 28, 768 * 28 * 28)
    assert grid.tolist() == [[1, h // 14, w // 14]]
    _, g2, _ = P.preprocess_videos(v, 1.0, min_pixels=56 * 56, max_pixels=56 * 56)  # caller override
    assert g2.tolist() == [[1, 2, 4]]


def test_patchify_matches_hf_video_permutation():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    for t in (1, 3, 4):
        x = rng.standard_normal((t, 3, 56, 84)).astype(np.float32)
        rows, (gt, gh, gw) = P.patchify(x)
        # transcription of Qwen2VLVideoProcessor.patchify (batch of 1)
        v = torch.from_numpy(x)[None]
        if pad := -t % 2:
            v = torch.cat([v, v[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        ref = v.view(1, v.shape[1] // 2, 2, 3, 2, 2, 14, 3, 2, 14).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        ref = ref.reshape(-1, 3 * 2 * 14 * 14).numpy()
        assert (gt, gh, gw) == ((t + 1) // 2, 4, 6)
        np.testing.assert_array_equal(rows, ref)


# --------------------------------------------------------------------------- #
# frame sampling
# --------------------------------------------------------------------------- #
def _indexed_clip(n):
    clip = np.zeros((n, 4, 4, 3), dtype=np.uint8)
    clip[:, 0, 0, 0] = np.arange(n)
    return clip


def test_sample_frames_for_vlm():
    clip = _indexed_clip(300)  # 10 s at 30 fps
    frames, eff = P.sample_frames_for_vlm(clip, 30.0)
    assert frames[:, 0, 0, 0].tolist() == [0, 30, 60, 90, 120, 150] and eff == 1.0
    frames, eff = P.sample_frames_for_vlm(_indexed_clip(100), 12.5)  # non-integer stride, round half up
    assert frames[:, 0, 0, 0].tolist() == [0, 13, 25, 38, 50, 63] and eff == 1.0
    frames, eff = P.sample_frames_for_vlm(_indexed_clip(60), 12.5)  # 4.8 s < 5 s needed -> spread
    assert frames[:, 0, 0, 0].tolist() == [0, 12, 24, 35, 47, 59] and eff == pytest.approx(5 * 12.5 / 59)
    # exactly long enough: last index 5*fps must exist
    frames, eff = P.sample_frames_for_vlm(_indexed_clip(51), 10.0)
    assert frames[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40, 50] and eff == 1.0
    # short clip -> spread over the clip with repeats, effective fps reported
    frames, eff = P.sample_frames_for_vlm(_indexed_clip(3), 30.0)
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert eff == pytest.approx(5 * 30.0 / 2)
    frames, eff = P.sample_frames_for_vlm(_indexed_clip(1), 24.0)
    assert frames.shape == (6, 4, 4, 3) and eff == 1.0
    frames, eff = P.sample_frames_for_vlm(_indexed_clip(100), 4.0, num_frames=4, sample_fps=2.0)
    assert frames[:, 0, 0, 0].tolist() == [0, 2, 4, 6] and eff == 2.0


# --------------------------------------------------------------------------- #
# bad inputs
# --------------------------------------------------------------------------- #
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="zero frames"):
        P.preprocess_videos([np.zeros((0, 32, 32, 3), np.uint8)], 1.0)
    with pytest.raises(ValueError, match="zero frames"):
        P.preprocess_videos([[]], 1.0)
    with pytest.raises(ValueError, match="uint8"):
        P.preprocess_videos([np.zeros((2, 32, 32, 3), np.float32)], 1.0)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        P.preprocess_videos([np.zeros((2, 32, 32), np.uint8)], 1.0)
    with pytest.raises(ValueError, match=r"\(0, 32, 3\)"):
        P.preprocess_videos([np.zeros((2, 0, 32, 3), np.uint8)], 1.0)
    with pytest.raises(ValueError, match=r"\(2, 900, 3\)"):  # aspect ratio 450 names the frame shape
        P.preprocess_videos([np.zeros((2, 2, 900, 3), np.uint8)], 1.0)
    with pytest.raises(ValueError, match="fps"):
        P.preprocess_videos([_rand((2, 32, 32, 3))], [1.0, 2.0])
    with pytest.raises(ValueError, match="fps"):
        P.preprocess_videos([_rand((2, 32, 32, 3))], 0.0)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        P.preprocess_images([np.zeros((32, 32, 4), np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        P.preprocess_images([np.zeros((32, 32, 3), np.int64)])
    with pytest.raises(ValueError, match="empty"):
        P.preprocess_images([])
    with pytest.raises(ValueError, match="zero frames"):
        P.sample_frames_for_vlm(np.zeros((0, 8, 8, 3), np.uint8), 30.0)
    # a frame smaller than one 14x14 patch is an error (HF v5 would silently upsample it)
    with pytest.raises(ValueError, match=r"image 0: frame of shape \(3, 5, 3\) is smaller than one 14x14 patch"):
        P.preprocess_images([_rand((3, 5, 3))])
    with pytest.raises(ValueError, match=r"video 0: frames of shape \(10, 300, 3\) are smaller than one 14x14"):
        P.preprocess_videos([_rand((4, 10, 300, 3))], 2.0)
    # small frames of at least one patch are upscaled to min_pixels like HF v5
    pv, g = P.preprocess_images([_rand((14, 20, 3))])
    assert g.tolist() == [[1, 4, 6]] and pv.shape == (24, 1176)


# --------------------------------------------------------------------------- #
# tokenizer / prompts
# --------------------------------------------------------------------------- #
def test_tiny_tokenizer_loads(tiny_tok):
    from tokenizers import Tokenizer

    tok, ids, d = tiny_tok
    assert type(tok).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast", "PreTrainedTokenizerFast")
    assert ids["vocab_size"] == len(tok) < 500
    assert T.special_token_ids(tok) == {k: ids[k] for k in T.special_token_ids(tok)}
    assert tok.eos_token_id == ids["im_end"] and tok.pad_token_id == ids["endoftext"]
    for t in TAGS:
        assert tok.encode(t, add_special_tokens=False) == [ids[t]]
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    text = T.build_prompt_text("What happens next, after 12 steps?", 5) + "[Think]x y[/Think][Ans]Él café.[/Ans]<|im_end|>"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert enc == raw.encode(text).ids
    assert tok.decode(enc) == text
    with pytest.raises(FileNotFoundError, match="nope_dir"):
        T.load_tokenizer(d / "nope_dir")


def test_prompt_text_matches_chat_template(tiny_tok):
    tok, _, _ = tiny_tok
    q = "What will the person do next?"
    msgs = [{"role": "system", "content": T.VANS_SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}]
    ref = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ref == T.build_prompt_text(q)
    assert ref.startswith("<|im_start|>system\nYou will be given a video.")
    msgs[1]["content"] = [{"type": "text", "text": q}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == T.build_prompt_text(
        q, with_video=False)
    assert T.build_prompt_text(q, 3).count("<|video_pad|>") == 3


@pytest.fixture
def hf_processor(tiny_tok, monkeypatch):
    """Real Qwen2_5_VLProcessor; the video processor is a stand-in returning our outputs."""
    from transformers import BatchFeature, Qwen2_5_VLProcessor
    from transformers.video_processing_utils import VideoProcessorMixin
    from transformers.video_utils import VideoMetadata

    class StandInVideoProcessor(VideoProcessorMixin):
        merge_size = 2
        temporal_patch_size = 2

        def __init__(self, fps):
            super().__init__()
            self._fps = fps

        def __call__(self, videos, **kwargs):
            pv, grid, _ = P.preprocess_videos(list(videos), self._fps, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 12)
            md = [VideoMetadata(total_num_frames=len(v), fps=f, frames_indices=list(range(len(v))))
                  for v, f in zip(videos, self._fps)]
            return BatchFeature({"pixel_values_videos": pv, "video_grid_thw": grid, "video_metadata": md})

    # the class check looks up "VideoProcessorMixin" in the top-level transformers
    # namespace, which is a dummy without torchvision; skip it for the stand-in only
    orig = Qwen2_5_VLProcessor.check_argument_for_proper_class

    def check(self, name, arg):
        return type(arg) if name == "video_processor" else orig(self, name, arg)

    monkeypatch.setattr(Qwen2_5_VLProcessor, "check_argument_for_proper_class", check)
    tok = tiny_tok[0]

    def make(fps):
        return Qwen2_5_VLProcessor(image_processor=hf_pil.Qwen2VLImageProcessorPil(), tokenizer=tok,
                                   video_processor=StandInVideoProcessor(fps), chat_template=T.QWEN2_VL_CHAT_TEMPLATE)

    return make


def test_video_token_expansion_matches_hf_processor(tiny_tok, hf_processor):
    tok, ids, _ = tiny_tok
    fps = [1.0, 3.0]
    videos = [_rand((5, 60, 84, 3), 8), _rand((6, 100, 46, 3), 9)]
    questions = ["What happens next?", "Describe the next event in detail, please."]
    texts = [T.build_prompt_text(q) for q in questions]
    hf = hf_processor(fps)(text=texts, videos=videos, padding=True, padding_side="left", return_tensors="np")
    pv, grid, spg = P.preprocess_videos(videos, fps, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 12)
    np.testing.assert_array_equal(hf["video_grid_thw"], grid)
    np.testing.assert_allclose(hf["second_per_grid_ts"], spg, rtol=1e-7)
    mine = T.encode_prompts(tok, questions, grid, merge_size=2, padding_side="left")
    np.testing.assert_array_equal(mine["input_ids"], hf["input_ids"])
    np.testing.assert_array_equal(mine["attention_mask"], hf["attention_mask"])
    n_vid = (mine["input_ids"] == ids["video_pad"]).sum(1)
    np.testing.assert_array_equal(n_vid, P.num_vision_tokens(grid))
    # left padding: real tokens end each row, the shorter row starts with pads
    assert mine["attention_mask"][:, -1].all()
    short = int(np.argmin(mine["attention_mask"].sum(1)))
    assert mine["attention_mask"][short, 0] == 0 and mine["input_ids"][short, 0] == ids["pad"]
    right = T.encode_prompts(tok, questions, grid, padding_side="right")
    for i in range(2):
        np.testing.assert_array_equal(right["input_ids"][i][right["attention_mask"][i] == 1],
                                      mine["input_ids"][i][mine["attention_mask"][i] == 1])


def test_image_token_expansion_matches_hf_processor(tiny_tok, hf_processor):
    tok, ids, _ = tiny_tok
    img = _rand((70, 130, 3), 10)
    text = T.build_prompt_text("q").replace("<|video_pad|>", "<|image_pad|>")
    hf = hf_processor([1.0])(text=[text], images=[img], return_tensors="np")
    pv, grid = P.preprocess_images([img])
    np.testing.assert_array_equal(hf["pixel_values"], pv)
    np.testing.assert_array_equal(hf["image_grid_thw"], grid)
    assert int((hf["input_ids"] == ids["image_pad"]).sum()) == int(P.num_vision_tokens(grid)[0])


def test_sft_example_loss_mask(tiny_tok):
    tok, ids, _ = tiny_tok
    grid = (3, 4, 6)
    think, caption = "The cook has cut onions, so", "she puts the onions into the hot pan."
    ex = T.sft_example(tok, "What next?", format_response(think, caption), grid)
    ids_, mask = ex["input_ids"], ex["loss_mask"]
    target = f"[Think]{think}[/Think][Ans]{caption}[/Ans]<|im_end|>"
    full = T.build_prompt_text("What next?", 18) + target
    assert ids_.tolist() == tok(full, add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(T.build_prompt_text("What next?", 18), add_special_tokens=False)["input_ids"])
    assert ex["prompt_len"] == n_prompt
    assert mask[:n_prompt].sum() == 0 and mask[n_prompt:].all()
    assert tok.decode(ids_[mask == 1]) == target
    assert ids_[mask == 1][0] == ids["[Think]"] and ids_[-1] == ids["im_end"]
    assert (ids_ == ids["video_pad"]).sum() == 18
    # the assistant header is not in the loss
    assert tok.decode(ids_[mask == 0]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("[Think]reason[/Think][Ans]cap[/Ans]", ("reason", "cap", True)),
        ("  [Think] r \n[/Think]\n [Ans] c [/Ans]\n<|im_end|>", ("r", "c", True)),
        ("[Think][/Think][Ans][/Ans]", ("", "", True)),
        ("[Think]r[/Think]", ("r", "", False)),
        ("[Ans]c[/Ans]", ("", "c", False)),
        ("[Ans]c[/Ans][Think]r[/Think]", ("r", "c", False)),
        ("hi [Think]r[/Think][Ans]c[/Ans]", ("r", "c", False)),
        ("[Think]r[/Think]x[Ans]c[/Ans]", ("r", "c", False)),
        ("[Think]r[/Think][Ans]c[/Ans] tail", ("r", "c", False)),
        ("[Think]r[/Think][Ans]c", ("r", "c", False)),
        ("[Think]a[Think]b[/Think][Ans]c[/Ans]", ("a[Think]b", "c", False)),
        ("[Think]r[/Think][Ans]c[/Ans][Ans]d[/Ans]", ("r", "c", False)),
        ("plain caption", ("", "", False)),
    ],
)
def test_parse_response(text, expected):
    out = parse_response(text)
    assert (out["think"], out["caption"], out["valid_format"]) == expected
