"""VANS inference: a video (or a still image) and a question -> a reasoning, a caption of the next
event and a video of it.

    pipe = VANSPipeline.from_pretrained("/ckpt/Qwen2.5-VL-3B-Instruct", "/ckpt/Wan2.1-T2V-1.3B-Diffusers",
                                        vans_dit="/ckpt/vans/vdm.safetensors", lora="/ckpt/vans/vlm_lora")
    out = pipe("clip.mp4", "What will happen next?", seed=0)
    out[0].text, out[0].think, out[0].caption, out[0].video     # video: uint8 (33, 352, 640, 3)

The flow (SPEC section 1), each stage batched over the samples and jit-compiled once per shape:

1. **VLM** (Qwen2.5-VL): ``vlm_num_frames`` frames sampled at ``vlm_sample_fps``
   (``processor.sample_frames_for_vlm``: the frame nearest each whole second; a clip too short for
   that spreads the frames over the whole clip, repeating frames when it has fewer), the VANS
   system prompt and the question; greedy decoding by default (``temperature=0``).
2. **Parse** ``[Think]..[/Think][Ans]..[/Ans]`` with ``rl.format.parse_response`` (the one strict
   format definition). A response that does not follow it is a reported failure
   (``VANSAnswer.valid_format`` False, an ``InvalidResponseWarning``) with the configurable
   ``fallback``: ``"full"`` (default) takes ``rl.format.extract_answer(text)`` as the caption -- the
   [Ans] text if an ``[Ans]`` tag is there at all, else the text after the last ``[/Think]``, else
   the whole text (the rule the evaluator applies to a prediction without a caption);
   ``"error"`` raises ``InvalidResponseError`` before any video is generated.
3. **Reference latents**: the input clip re-timed to ``fps`` and its LAST ``reference_frames``
   frames (4k+1; ``data.video_io.reference_clip(mode="last")``: a shorter clip is padded in FRONT by
   repeating its first frame), resized to cover ``height x width`` and centre-cropped, VAE-encoded;
   ``n_ref`` latent frames at ``floor(linspace(0, T_lat - 1, n_ref))`` (``wan.reference_latents``).
   ``n_ref=0`` is plain Wan text-to-video.
4. **VDM** (Wan2.1 + the VANS DiT): the caption through UMT5, CFG ``cfg_scale`` against
   ``negative_prompt`` (default: Wan2.1's own negative prompt), ``num_steps`` UniPC steps at flow
   ``shift``, the clean references in front on the time axis; VAE decode to ``num_frames`` frames
   of ``height x width`` (multiples of 16; frames 4k+1 -- both checked before anything runs).

Inputs: a video path (anything PyAV reads; only the frames the settings sample are decoded, picked
by presentation timestamp, scaled down and turned upright as decoded -- ``data.video_io.sample_video``;
a file of which too little decodes is ``VideoError`` ``damaged``, a partly damaged one warns and
``Clip.input_record()`` says so), an image path (``.png``, ``.jpg``, ...: a static clip, EXIF-upright),
a uint8 array ``(T, H, W, 3)`` with ``video_fps=``, a ``(frames, fps)`` pair, an ``(H, W, 3)``
array or a PIL image (a static clip), or a ``Clip``. Several questions on one clip give several
futures in one batch (the paper's multi-future use); several clips with one question, or equal-length
lists, pair up; ``num_futures=G`` samples G answers per pair from one prefill.

Seeds: sample ``i`` (of ``N = pairs x G``) uses ``seed + i`` (or ``seed[i]`` for a list): its initial
video noise is ``normal(fold_in(key(seed_i), 1))`` of one sample's latent shape, so a sample's video
does not depend on what else is in the batch. Sampled text (``temperature > 0``) uses one key for
the batch, ``key(seed_0)``; greedy text is deterministic.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from .data.video_io import (ReadReport, SampledVideo, VideoDamageWarning, VideoError, check_vae_frames,
                            reference_clip, resize_center_crop, sample_video)
from .models import qwen2_5_vl as qwen
from .models.qwen2_5_vl import processor
from .models.qwen2_5_vl import tokenizer as tok_lib
from .rl.format import extract_answer, parse_response
from .sampling import wan

__all__ = ["WAN_NEGATIVE_PROMPT", "FALLBACKS", "IMAGE_EXTENSIONS", "VANSSettings", "Clip", "load_clip",
           "VANSAnswer", "VANSOutput", "VANSPipeline", "InvalidResponseError", "InvalidResponseWarning"]

# Wan2.1's default negative prompt (``sample_neg_prompt`` of the Wan2.1 release configs).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
FALLBACKS = ("full", "error")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class InvalidResponseError(ValueError):
    """The VLM's response has no valid ``[Think]..[/Think][Ans]..[/Ans]`` block (``fallback="error"``)."""


class InvalidResponseWarning(UserWarning):
    """Some responses had no valid [Ans] block; the ``fallback`` caption was used."""


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class VANSSettings:
    """Every inference setting. The defaults are VANS' (SPEC sections 1 and 7): 352x640x33 at 11 fps,
    50 UniPC steps, CFG 5, shift 5, 6 reference latents from the last 33 frames, 6 VLM frames at 1 fps."""
    height: int = 352
    width: int = 640
    num_frames: int = 33
    fps: float = 11.0                     # output video rate; the input clip is re-timed to it for the references
    num_steps: int = 50
    cfg_scale: float = 5.0
    shift: float = 5.0
    n_ref: int = 6                        # reference latent frames (0: plain text-to-video)
    reference_frames: int = 33            # input frames (4k+1) VAE-encoded for the references
    vlm_num_frames: int = 6
    vlm_sample_fps: float = 1.0
    video_min_pixels: int = processor.VIDEO_MIN_PIXELS
    video_max_pixels: int = processor.VIDEO_MAX_PIXELS
    max_new_tokens: int = 256
    temperature: float = 0.0              # 0 = greedy
    top_p: float = 1.0
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    fallback: str = "full"                # see the module docstring
    sampler: str = "unipc"                # "unipc" | "euler"
    prompt_bucket: int = 64               # prompts are left-padded to a multiple of this: fewer VLM compiles

    @classmethod
    def from_dict(cls, d: dict, base: "VANSSettings | None" = None) -> "VANSSettings":
        """``base`` (default: the VANS defaults) updated with ``d``; unknown keys are ignored with a warning."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(f"VANSSettings: ignoring unknown setting(s) {unknown}")
        return (base or cls()).replace(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "VANSSettings":
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(changes) - names)
        if bad:
            raise TypeError(f"unknown setting(s) {bad}; known: {sorted(names)}")
        typed = {}
        for f in dataclasses.fields(self):
            if f.name in changes and changes[f.name] is not None:
                v = changes[f.name]
                typed[f.name] = type(getattr(self, f.name))(v) if not isinstance(getattr(self, f.name), str) else str(v)
        return dataclasses.replace(self, **typed)

    def validate(self) -> "VANSSettings":
        """Clear errors for settings that cannot work (sizes against the model: ``VANSPipeline``)."""
        check_vae_frames(self.num_frames, "num_frames")
        check_vae_frames(self.reference_frames, "reference_frames")
        problems = []
        if self.height <= 0 or self.width <= 0:
            problems.append(f"height and width must be positive, got {self.height}x{self.width}")
        if not (self.fps > 0 and math.isfinite(self.fps)):
            problems.append(f"fps must be positive, got {self.fps}")
        if self.num_steps < 1:
            problems.append(f"num_steps must be >= 1, got {self.num_steps}")
        if self.n_ref < 0:
            problems.append(f"n_ref must be >= 0, got {self.n_ref}")
        if self.vlm_num_frames < 1 or not self.vlm_sample_fps > 0:
            problems.append(f"vlm_num_frames must be >= 1 and vlm_sample_fps > 0, got {self.vlm_num_frames}, "
                            f"{self.vlm_sample_fps}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            problems.append(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.fallback not in FALLBACKS:
            problems.append(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.sampler not in ("unipc", "euler"):
            problems.append(f"sampler must be 'unipc' or 'euler', got {self.sampler!r}")
        if self.prompt_bucket < 1:
            problems.append(f"prompt_bucket must be >= 1, got {self.prompt_bucket}")
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- inputs


def _decode_max_pixels(s: VANSSettings) -> int:
    """Frames are scaled down to this many pixels as they are decoded: twice the VLM's largest
    frame and four times the generated one, so neither stage upsamples."""
    return int(max(2 * s.video_max_pixels, 4 * s.height * s.width))


def _sample_key(s: VANSSettings) -> tuple:
    return (s.vlm_num_frames, float(s.vlm_sample_fps), s.reference_frames, float(s.fps), _decode_max_pixels(s))


def _sample_file(path: str, s: VANSSettings) -> SampledVideo:
    """Decode only the frames the settings use (VLM, reference, a 6-frame preview), by timestamp."""
    return sample_video(path, {"vlm": ("vlm", s.vlm_num_frames, s.vlm_sample_fps),
                               "reference": ("clip", s.reference_frames, s.fps, "last"),
                               "preview": ("spread", 6)}, max_pixels=_decode_max_pixels(s))


@dataclasses.dataclass
class Clip:
    """An input clip: uint8 frames (T, H, W, 3), their rate, where they came from.

    A video file is not held whole: ``load_clip`` decodes only the frames the settings use
    (``sampled``, ``data.video_io.sample_video``; ``frames`` is None) and keeps how the file read
    (``report``: decoded against announced frames, rotation, damage warning)."""
    frames: np.ndarray | None
    fps: float
    source: str = "<array>"
    is_image: bool = False
    sampled: SampledVideo | None = None
    sample_key: tuple | None = None

    @property
    def report(self) -> ReadReport | None:
        return None if self.sampled is None else self.sampled.report

    @property
    def num_frames(self) -> int:
        return self.report.decoded_frames if self.frames is None else int(self.frames.shape[0])

    def _sampled_for(self, s: VANSSettings) -> SampledVideo:
        if self.sample_key != _sample_key(s):   # other settings than it was loaded with: read the file again
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", VideoDamageWarning)   # warned when it was loaded
                self.sampled, self.sample_key = _sample_file(self.source, s), _sample_key(s)
        return self.sampled

    def vlm_input(self, s: VANSSettings) -> tuple[np.ndarray, float]:
        """The VLM's frames and their rate (``processor.sample_frames_for_vlm``'s rule; on timestamps for a file)."""
        if self.frames is not None:
            return processor.sample_frames_for_vlm(self.frames, self.fps, num_frames=s.vlm_num_frames,
                                                   sample_fps=s.vlm_sample_fps)
        sv = self._sampled_for(s)
        return sv.frames["vlm"], sv.rates["vlm"]

    def reference_input(self, s: VANSSettings) -> np.ndarray:
        """The reference clip: the last ``reference_frames`` at ``fps``, ``height x width``."""
        if self.frames is not None:
            return reference_clip(self.frames, self.fps, s.reference_frames, s.height, s.width, s.fps, mode="last")
        return resize_center_crop(self._sampled_for(s).frames["reference"], s.height, s.width)

    def preview(self) -> np.ndarray:
        """Frames spread over the clip (for pictures of it)."""
        return self.frames if self.frames is not None else self.sampled.frames["preview"]

    def input_record(self) -> dict:
        """``answer.json``'s ``input``: the source, decoded vs expected frames and seconds, the
        frame rate, the rotation undone, decode errors and the damage warning (None when clean)."""
        if self.report is not None:
            r = self.report.to_dict()
            return {"source": self.source, "is_image": False, "decoded_frames": r["decoded_frames"],
                    "expected_frames": r["expected_frames"], "decoded_duration_s": r["decoded_duration"],
                    "expected_duration_s": r["expected_duration"], "fps": r["fps"], "rotation": r["rotation"],
                    "decode_errors": r["decode_errors"], "substituted_frames": r["substituted"],
                    "warning": r["warning"]}
        n = int(self.frames.shape[0])
        return {"source": self.source, "is_image": bool(self.is_image), "decoded_frames": n, "expected_frames": n,
                "decoded_duration_s": round(n / float(self.fps), 4), "expected_duration_s": round(n / float(self.fps), 4),
                "fps": float(self.fps), "rotation": 0, "decode_errors": 0, "substituted_frames": 0, "warning": None}


def _image_array(img, source: str) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = ImageOps.exif_transpose(img).convert("RGB")   # EXIF orientation: upright
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"{source}: an image must be uint8 (H, W, 3), got {a.dtype} {a.shape}")
    return a


def load_clip(video, video_fps: float | None = None, image_fps: float = 11.0, *,
              settings: VANSSettings | None = None) -> Clip:
    """One input (see the module docstring) -> ``Clip``. Files that cannot be read raise
    ``VideoError`` (``missing``, ``corrupt``, ``damaged`` ...) naming the file; a still image becomes
    a one-frame clip at ``image_fps`` (every sampled frame is that image), turned upright by its EXIF
    orientation. A video file is decoded only where ``settings`` (default: VANS') sample it, by
    presentation timestamp, upright (display matrix); a partly damaged one warns
    (``VideoDamageWarning``) and says so in ``clip.input_record()``."""
    if isinstance(video, Clip):
        return video
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            if not os.path.isfile(path):
                raise VideoError(path, "missing", "file does not exist")
            try:
                with Image.open(path) as im:
                    frame = _image_array(im, path)
            except (OSError, SyntaxError) as e:
                raise VideoError(path, "corrupt", f"not a readable image: {e}") from None
            return Clip(frame[None], float(image_fps), path, True)
        s = settings or VANSSettings()
        sampled = _sample_file(path, s)
        return Clip(None, sampled.timeline.fps, path, False, sampled, _sample_key(s))
    if isinstance(video, Image.Image):
        return Clip(_image_array(video, "<image>")[None], float(image_fps), "<image>", True)
    if isinstance(video, tuple) and len(video) == 2 and isinstance(video[0], np.ndarray) and np.isscalar(video[1]):
        video, video_fps = video
    if isinstance(video, np.ndarray):
        if video.ndim == 3:
            return Clip(_image_array(video, "<array>")[None], float(image_fps), "<array>", True)
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or video.shape[0] == 0:
            raise ValueError(f"a video array must be uint8 (T, H, W, 3) with T >= 1, got {video.dtype} {video.shape}")
        if video_fps is None:
            raise ValueError("a video given as an array needs its frame rate: pass video_fps= or (frames, fps)")
        if not (float(video_fps) > 0 and math.isfinite(float(video_fps))):
            raise ValueError(f"video_fps must be positive, got {video_fps}")
        return Clip(video, float(video_fps), "<array>", video.shape[0] == 1)
    raise TypeError(f"cannot use {type(video).__name__} as a video: give a path, a uint8 array, "
                    f"(frames, fps), a PIL image or a Clip")


def _as_list(x, single_types) -> list:
    if isinstance(x, single_types) or (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], np.ndarray)
                                       and np.isscalar(x[1])):
        return [x]
    if isinstance(x, np.ndarray):
        return [x]
    return list(x)


# ----------------------------------------------------------------------------- outputs


@dataclasses.dataclass
class VANSAnswer:
    question: str
    text: str                 # the full VLM output (special tokens skipped)
    think: str
    caption: str              # what the VDM rendered
    valid_format: bool        # False: no valid [Think]..[Ans].. block; caption from the fallback
    seed: int
    source: str               # the input clip
    num_tokens: int
    video: np.ndarray | None = None   # uint8 (F, H, W, 3)

    @property
    def fallback_used(self) -> bool:
        return not self.valid_format

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "video"} | {
            "fallback_used": self.fallback_used}


@dataclasses.dataclass
class VANSOutput:
    answers: list[VANSAnswer]
    videos: np.ndarray | None     # uint8 (N, F, H, W, 3), None when only the VLM ran
    settings: VANSSettings
    timings: dict

    def __len__(self):
        return len(self.answers)

    def __getitem__(self, i) -> VANSAnswer:
        return self.answers[i]

    def __iter__(self):
        return iter(self.answers)

    @property
    def texts(self) -> list[str]:
        return [a.text for a in self.answers]

    @property
    def thinks(self) -> list[str]:
        return [a.think for a in self.answers]

    @property
    def captions(self) -> list[str]:
        return [a.caption for a in self.answers]


# ----------------------------------------------------------------------------- the pipeline


def _default_dtype() -> str:
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


class VANSPipeline:
    """The VANS system: a Qwen2.5-VL VLM (+ its tokenizer) and a Wan2.1 VDM (``wan.WanModels``)."""

    def __init__(self, vlm: qwen.Qwen2_5_VLModel, tokenizer, vdm: wan.WanModels,
                 settings: VANSSettings | None = None, sources: dict | None = None):
        self.vlm, self.tokenizer, self.vdm = vlm, tokenizer, vdm
        self.settings = (settings or VANSSettings()).validate()
        self.sources = dict(sources or {})
        vocab = int(vlm.config.text.vocab_size)
        if len(tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the VLM's vocabulary has {vocab}: "
                             f"they do not belong together")

    @classmethod
    def from_pretrained(cls, vlm_dir, vdm_dir, vans_dit=None, lora=None, dtype="auto", mesh=None, *,
                        settings: VANSSettings | None = None, tokenizer_dir=None,
                        attn_impl: str = "auto") -> "VANSPipeline":
        """Loads both models from local directories.

        vlm_dir: a Hugging Face Qwen2.5-VL directory with its tokenizer (or ``tokenizer_dir=``); a
        directory from ``qwen.export_pretrained`` (LoRA merged) works as is.
        vdm_dir: a diffusers Wan2.1 directory (transformer/, vae/, text_encoder/, tokenizer/, [scheduler/]).
        vans_dit: a fine-tuned DiT replacing transformer/: the released VANS ``vdm.safetensors``
        (original Wan keys, optional ``dit.`` prefix), a diffusers transformer directory or our
        export (``convert.wan_dit.export_dit_diffusers``).
        lora: a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors),
        merged into the VLM's weights (``convert.peft_lora``).
        dtype: parameter dtype of the VLM, DiT and text encoder ("auto": bfloat16 on GPU/TPU,
        float32 on CPU); the VAE stays float32. mesh: shards every parameter by its logical axes.
        """
        from .convert.peft_lora import merge_peft_adapter

        dtype = _default_dtype() if dtype in (None, "auto") else dtype
        vlm_dir, vdm_dir = os.fspath(vlm_dir), os.fspath(vdm_dir)
        for what, d in (("VLM", vlm_dir), ("VDM", vdm_dir)):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"the {what} directory {d} does not exist" if not os.path.exists(d) else
                                        f"the {what} path {d} is a file, not a model directory")
        tok_dir = os.fspath(tokenizer_dir) if tokenizer_dir is not None else vlm_dir
        try:
            tokenizer = tok_lib.load_tokenizer(tok_dir)
        except FileNotFoundError as e:
            hint = "" if tokenizer_dir is not None else (
                " (a directory written by export_pretrained holds no tokenizer: copy the base model's "
                "tokenizer files into it or pass tokenizer_dir=)")
            raise FileNotFoundError(f"{e}{hint}") from None
        vlm = qwen.from_pretrained(vlm_dir, dtype=dtype, mesh=mesh, attn_impl=attn_impl)
        if lora is not None:
            merge_peft_adapter(vlm, lora)
        vdm = wan.from_pretrained(vdm_dir, dtype=dtype, mesh=mesh, dit_path=vans_dit, attn_impl=attn_impl)
        sources = {"vlm": vlm_dir, "vdm": vdm_dir, "dit": None if vans_dit is None else os.fspath(vans_dit),
                   "lora": None if lora is None else os.fspath(getattr(lora, "path", lora)), "dtype": str(dtype)}
        return cls(vlm, tokenizer, vdm, settings, sources)

    # ------------------------------------------------------------------ settings / inputs

    def resolve_settings(self, **overrides) -> VANSSettings:
        """The pipeline's settings with the non-None ``overrides``, checked against the models."""
        s = self.settings.replace(**overrides).validate()
        wan.check_generation_size(self.vdm, s.height, s.width, s.num_frames)
        return s

    def _pairs(self, video, texts, video_fps, image_fps, what: str = "question", settings=None):
        videos = _as_list(video, (str, os.PathLike, np.ndarray, Image.Image, Clip))
        texts = _as_list(texts, (str,))
        if not videos:
            raise ValueError("no video given")
        if not texts:
            raise ValueError(f"no {what} given")
        for i, q in enumerate(texts):
            if not isinstance(q, str):
                raise ValueError(f"{what} {i} must be a string, got {type(q).__name__}")
            if what == "question" and not q.strip():
                raise ValueError(f"question {i} is empty")
        if len(videos) == 1:
            clip_index = [0] * len(texts)
        elif len(texts) == 1:
            clip_index, texts = list(range(len(videos))), texts * len(videos)
        elif len(videos) == len(texts):
            clip_index = list(range(len(videos)))
        else:
            raise ValueError(f"{len(videos)} videos and {len(texts)} {what}s: give one video, one {what}, "
                             f"or as many of each")
        clips = [load_clip(v, video_fps, image_fps, settings=settings) for v in videos]
        return clips, clip_index, [q.strip() for q in texts]

    @staticmethod
    def _seeds(seed, n: int) -> list[int]:
        if isinstance(seed, (int, np.integer)):
            return [int(seed) + i for i in range(n)]
        seeds = [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} samples")
        return seeds

    # ------------------------------------------------------------------ stage 1: the VLM

    def _vlm_stage(self, clips, clip_index, questions, s: VANSSettings, seeds, num_futures: int):
        vcfg = self.vlm.config.vision
        per_clip = {}
        for c in sorted(set(clip_index)):
            frames, fps = clips[c].vlm_input(s)
            per_clip[c] = processor.preprocess_videos(
                [frames], fps, min_pixels=s.video_min_pixels, max_pixels=s.video_max_pixels,
                patch_size=vcfg.patch_size, temporal_patch_size=vcfg.temporal_patch_size,
                merge_size=vcfg.spatial_merge_size)
        pixels = np.concatenate([per_clip[c][0] for c in clip_index])
        grid = np.concatenate([per_clip[c][1] for c in clip_index])
        seconds = np.concatenate([per_clip[c][2] for c in clip_index])
        merge = vcfg.spatial_merge_size
        enc = tok_lib.encode_prompts(self.tokenizer, questions, grid, merge_size=merge)
        length = enc["input_ids"].shape[1]
        bucketed = -(-length // s.prompt_bucket) * s.prompt_bucket
        if bucketed != length:
            enc = tok_lib.encode_prompts(self.tokenizer, questions, grid, merge_size=merge, pad_to=bucketed)
        batch = qwen.prepare_inputs(self.vlm.config, enc["input_ids"], enc["attention_mask"], pixels, grid, seconds)
        out = qwen.generate(self.vlm, batch, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                            top_p=s.top_p, greedy=s.temperature == 0, num_return_sequences=num_futures,
                            rng=jax.random.key(seeds[0]))
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        answers = []
        for i in range(tokens.shape[0]):
            pair = i // num_futures
            text = self.tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
            parsed = parse_response(text)
            caption = parsed["caption"] if parsed["valid_format"] else extract_answer(text, fallback="full")
            answers.append(VANSAnswer(question=questions[pair], text=text, think=parsed["think"], caption=caption,
                                      valid_format=bool(parsed["valid_format"]), seed=seeds[i],
                                      source=clips[clip_index[pair]].source, num_tokens=int(lengths[i])))
        invalid = [i for i, a in enumerate(answers) if not a.valid_format]
        if invalid:
            shown = "; ".join(f"sample {i}: {answers[i].text[:120]!r}" for i in invalid[:3])
            if s.fallback == "error":
                raise InvalidResponseError(
                    f"{len(invalid)} of {len(answers)} VLM response(s) have no valid [Think]..[/Think][Ans]..[/Ans] "
                    f"block ({shown}); use fallback='full' to render the extracted text instead")
            warnings.warn(InvalidResponseWarning(
                f"{len(invalid)} of {len(answers)} VLM response(s) have no valid [Think]..[/Think][Ans]..[/Ans] block; "
                f"caption from fallback='full' (rl.format.extract_answer) ({shown})"), stacklevel=3)
        return answers

    # ------------------------------------------------------------------ stage 2: the VDM

    def _vdm_stage(self, clips, sample_clip, captions, s: VANSSettings, seeds):
        t0 = time.perf_counter()
        ref = None
        if s.n_ref > 0:
            used = sorted(set(sample_clip))
            ref_clips = np.stack([clips[c].reference_input(s) for c in used])
            ref_unique = wan.reference_latents(self.vdm, ref_clips, n_ref=s.n_ref, height=None, width=None)
            ref = ref_unique[jnp.asarray([used.index(c) for c in sample_clip])]
            ref = jax.block_until_ready(ref)
        t1 = time.perf_counter()
        t_lat, h, w = wan.check_generation_size(self.vdm, s.height, s.width, s.num_frames)
        shape = (self.vdm.latent_channels, t_lat, h, w)
        noise = jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.key(sd), 1), shape, jnp.float32)
                           for sd in seeds])
        videos = wan.generate(self.vdm, captions, ref_latents=ref, noise=noise, num_steps=s.num_steps,
                              guidance_scale=s.cfg_scale, shift=s.shift, height=s.height, width=s.width,
                              num_frames=s.num_frames, negative_prompt=s.negative_prompt, mode=s.sampler)
        return videos, {"reference_s": t1 - t0, "diffusion_s": time.perf_counter() - t1}

    # ------------------------------------------------------------------ public entry points

    def answer(self, video, question, *, seed=0, num_futures: int = 1, video_fps: float | None = None,
               **overrides) -> VANSOutput:
        """The VLM stage alone: reasoning + caption per sample (``videos`` is None)."""
        s = self.resolve_settings(**overrides)
        if num_futures < 1:
            raise ValueError(f"num_futures must be >= 1, got {num_futures}")
        clips, clip_index, questions = self._pairs(video, question, video_fps, s.fps, settings=s)
        seeds = self._seeds(seed, len(questions) * num_futures)
        t0 = time.perf_counter()
        answers = self._vlm_stage(clips, clip_index, questions, s, seeds, int(num_futures))
        return VANSOutput(answers, None, s, {"vlm_s": round(time.perf_counter() - t0, 4)})

    def render(self, video, caption, *, seed=0, video_fps: float | None = None, **overrides) -> np.ndarray:
        """The VDM stage alone: captions + their input clips -> uint8 videos (N, F, H, W, 3)."""
        s = self.resolve_settings(**overrides)
        clips, clip_index, captions = self._pairs(video, caption, video_fps, s.fps, what="caption", settings=s)
        videos, _ = self._vdm_stage(clips, clip_index, captions, s, self._seeds(seed, len(captions)))
        return videos

    def __call__(self, video, question, *, seed=0, num_steps: int | None = None, cfg_scale: float | None = None,
                 shift: float | None = None, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 num_futures: int = 1, video_fps: float | None = None, progress=None, **overrides) -> VANSOutput:
        """Video(s) + question(s) -> ``VANSOutput`` (answers with text, think, caption, video).
        Unset settings (None) come from ``self.settings``; ``overrides`` may set any other
        ``VANSSettings`` field (``n_ref``, ``fps``, ``fallback``, ``negative_prompt``, ...).
        ``progress``: called with a line of text before and after each stage (what it will do, the
        tokens written, the seconds taken; a stage's first call at a shape includes compiling it)."""
        say = progress or (lambda msg: None)
        s = self.resolve_settings(num_steps=num_steps, cfg_scale=cfg_scale, shift=shift, height=height, width=width,
                                  num_frames=num_frames, temperature=temperature, top_p=top_p, **overrides)
        if num_futures < 1:
            raise ValueError(f"num_futures must be >= 1, got {num_futures}")
        t_start = time.perf_counter()
        clips, clip_index, questions = self._pairs(video, question, video_fps, s.fps, settings=s)
        seeds = self._seeds(seed, len(questions) * num_futures)
        t0 = time.perf_counter()
        n = len(questions) * num_futures
        say(f"VLM: {n} answer(s), up to {s.max_new_tokens} new tokens each "
            f"({'greedy' if s.temperature == 0 else f'temperature {s.temperature:g}'})")
        answers = self._vlm_stage(clips, clip_index, questions, s, seeds, int(num_futures))
        t1 = time.perf_counter()
        say(f"VLM: {sum(a.num_tokens for a in answers)} tokens in {t1 - t0:.1f}s")
        say(f"VDM: {n} video(s) of {s.num_frames} frames at {s.height}x{s.width}, {s.num_steps} denoising steps "
            f"(CFG {s.cfg_scale:g}, {s.n_ref} reference latent frames)")
        sample_clip = [clip_index[i // num_futures] for i in range(len(answers))]
        videos, vdm_t = self._vdm_stage(clips, sample_clip, [a.caption for a in answers], s, seeds)
        t2 = time.perf_counter()
        say(f"VDM: done in {t2 - t1:.1f}s ({(t2 - t1) / max(s.num_steps, 1):.2f}s a step, decoding included)")
        for a, v in zip(answers, videos):
            a.video = v
        timings = {"load_inputs_s": t0 - t_start, "vlm_s": t1 - t0, **vdm_t, "vdm_s": t2 - t1,
                   "total_s": t2 - t_start}
        return VANSOutput(answers, videos, s, {k: round(v, 4) for k, v in timings.items()})
