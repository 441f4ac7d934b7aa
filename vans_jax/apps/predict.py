"""``vans-jax predict``: VANS inference from the command line.

One clip::

    vans-jax predict --vlm QWEN_DIR --vdm WAN_DIR [--dit vdm.safetensors] [--lora ADAPTER_DIR] \\
        --video clip.mp4 --question "What will happen next?" --output_dir out/

writes ``out/answer.json`` (full text, think, caption, valid_format, settings, seed, timings,
models, ``input``: how the input read -- decoded vs expected frames and seconds, rotation, decode
errors, a damage ``warning``), ``out/answer.mp4`` (the generated video at ``--fps``, 11 by default) and
``out/answer_strip.png`` (input frames, a white gap, answer frames, side by side).

A dataset (VANS-Data CSV layout, SPEC section 7)::

    vans-jax predict --vlm ... --vdm ... --csv eval.csv --video_root VIDEOS --output_dir PRED_DIR

writes ``PRED_DIR/<row index>/answer.json`` + ``answer.mp4`` (+ the strip), the prediction
directory ``vans-jax eval`` reads. Resumable: a row whose ``answer.json`` (readable, with a
``text``) and ``answer.mp4`` exist is skipped; every file is written under a temporary name and
renamed, ``answer.json`` last, so a killed run never leaves a row that counts as finished without
being finished (such a row is redone). A row whose video cannot be read (or, with ``--fallback
error``, whose response has no valid [Ans] block) gets ``error.json`` instead, is reported, and is
retried on the next run; the exit code is 1 when any row failed. Row ``i`` uses seed ``--seed + i``
and its video noise depends on that seed alone, so resuming gives the same results and the
randomness does not depend on ``--batch_size``. The arithmetic does, slightly: XLA picks kernels by
the batch's shape (and prompts are padded to the batch's longest), so another ``--batch_size`` can
change a video by float rounding (4 of the world's eval clips: at most 1/255 on 2e-6 of the pixels
between batch 1 and 2, none between 1 and 4; a real clip showed 9/255) and, near a tie, a greedy
token. The same ``--batch_size`` reproduces a run exactly.

Models: without ``--vlm``/``--vdm`` the shipped tiny models of the synthetic world are used
(``vans_jax.apps.tiny_world``; their ``defaults.json`` gives the settings), and without ``--video`` an
eval-split scene of the synthetic world is rendered as the input (written as ``input.mp4``, its
ground truth in ``answer.json``). With explicit model directories the settings are VANS' (352x640x33
at 11 fps, 50 steps, CFG 5, shift 5, 6 reference latents, 6 VLM frames at 1 fps). Every setting can
be overridden (``--num_steps 20``, ``--height 480`` ...).

Input clips shorter than needed are padded by repeating frames (the VLM's frames spread over the
clip; the reference clip's first frame in front), see ``vans_jax.pipeline``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

from vans_jax._files import atomic_path, remove_stale_tmp, write_json

__all__ = ["SETTING_ARGS", "add_arguments", "run_cli", "resolve_models", "write_prediction", "strip_image",
           "prepare_input", "predict_one", "predict_csv", "is_finished"]

ANSWER_JSON, ANSWER_MP4, STRIP_PNG, ERROR_JSON = "answer.json", "answer.mp4", "answer_strip.png", "error.json"

# every pipeline.VANSSettings field, overridable on the command line (a test keeps this table in step)
SETTING_ARGS = {
    "height": (int, "video height (multiple of 16)"),
    "width": (int, "video width (multiple of 16)"),
    "num_frames": (int, "generated frames (4k+1)"),
    "fps": (float, "frame rate of answer.mp4; the input is re-timed to it for the reference clip"),
    "num_steps": (int, "sampler steps"),
    "cfg_scale": (float, "classifier-free guidance scale"),
    "shift": (float, "flow shift"),
    "n_ref": (int, "reference latent frames from the input clip (0: plain text-to-video)"),
    "reference_frames": (int, "last input frames (4k+1, at --fps) VAE-encoded for the references"),
    "vlm_num_frames": (int, "frames the VLM sees"),
    "vlm_sample_fps": (float, "rate at which the VLM frames are sampled"),
    "video_min_pixels": (int, "VLM frame area lower bound (Qwen smart_resize)"),
    "video_max_pixels": (int, "VLM frame area upper bound"),
    "max_new_tokens": (int, "VLM response length limit"),
    "temperature": (float, "VLM sampling temperature (0: greedy)"),
    "top_p": (float, "VLM nucleus sampling"),
    "negative_prompt": (str, "CFG negative prompt (default: Wan2.1's)"),
    "fallback": (str, "response without a valid [Ans] block: 'full' (caption = extracted text, reported) or "
                      "'error' (the sample fails)"),
    "sampler": (str, "'unipc' or 'euler'"),
    "prompt_bucket": (int, "VLM prompts padded to a multiple of this (fewer compilations)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``predict`` subcommand's arguments (cheap: imports nothing heavy)."""
    p.add_argument("--vlm", default=None, help="Hugging Face Qwen2.5-VL directory (default: the shipped tiny model)")
    p.add_argument("--vdm", default=None, help="diffusers Wan2.1 directory (default: the shipped tiny model)")
    p.add_argument("--dit", default=None, help="fine-tuned DiT: VANS vdm.safetensors or a diffusers transformer dir")
    p.add_argument("--lora", default=None, help="PEFT LoRA adapter directory for the VLM (merged at load)")
    p.add_argument("--video", default=None, help="input video or image (default with the tiny models: a synthetic clip)")
    p.add_argument("--question", default=None, help="the question (default with the synthetic clip: its question)")
    p.add_argument("--csv", default=None, help="VANS-Data CSV: predict every row (with --video_root)")
    p.add_argument("--video_root", default=None, help="root of the CSV's relative video paths")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed (CSV row i uses seed + i)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (bf16 on GPU/TPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--batch_size", type=int, default=1, help="CSV rows per batch")
    p.add_argument("--limit", type=int, default=None, help="only the first N CSV rows")
    p.add_argument("--no_strip", action="store_true", help="do not write answer_strip.png")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    g = p.add_argument_group("settings (default: the shipped models' defaults.json, or VANS' with --vlm/--vdm)")
    for name, (typ, help_) in SETTING_ARGS.items():
        g.add_argument(f"--{name}", type=typ, default=None, help=help_)


# ----------------------------------------------------------------------------- models


def resolve_models(vlm=None, vdm=None):
    """(vlm_dir, vdm_dir, base VANSSettings, using_tiny_world). Neither dir: the shipped tiny models
    (``FileNotFoundError`` from ``world.load_defaults`` when they are not there)."""
    from vans_jax.pipeline import VANSSettings
    from vans_jax.apps.tiny_world import load_defaults, tiny_world_paths

    if vlm is None and vdm is None:
        defaults = load_defaults()
        paths = tiny_world_paths()
        settings = {k: v for k, v in defaults.items() if k != "world"}     # "world": the data's layout
        return paths["vlm"], paths["vdm"], VANSSettings.from_dict(settings), True
    if vlm is None or vdm is None:
        raise ValueError("give both --vlm and --vdm, or neither (the shipped tiny synthetic-world models)")
    for flag, d in (("--vlm", vlm), ("--vdm", vdm)):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{flag} {d}: the directory does not exist" if not os.path.exists(d) else
                                    f"{flag} {d} is a file; give the model directory")
    return vlm, vdm, VANSSettings(), False


# ----------------------------------------------------------------------------- outputs


def _thumbs(frames: np.ndarray, num: int, height: int) -> list[np.ndarray]:
    from PIL import Image

    idx = np.unique(np.floor(np.linspace(0, len(frames) - 1, min(num, len(frames))) + 0.5).astype(int))
    out = []
    for i in idx:
        f = frames[i]
        w = max(1, int(round(f.shape[1] * height / f.shape[0])))
        out.append(np.asarray(Image.fromarray(f).resize((w, height), Image.Resampling.BICUBIC)) if f.shape[0] != height
                   else f)
    return out


def strip_image(input_frames: np.ndarray, answer_frames: np.ndarray, num: int = 6, height: int | None = None,
                gap: int = 8) -> np.ndarray:
    """One uint8 image: ``num`` input frames, a white gap, ``num`` answer frames (evenly spaced
    over each clip), all scaled to ``height`` (default: the answer's height, at most 180)."""
    height = int(height or min(answer_frames.shape[1], 180))
    left, right = _thumbs(input_frames, num, height), _thumbs(answer_frames, num, height)
    white = np.full((height, gap, 3), 255, np.uint8)
    return np.concatenate(left + [white] + right, axis=1)


def _atomic_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def write_prediction(out_dir: str, answer, record: dict, fps: float, input_frames: np.ndarray | None = None,
                     strip: bool = True) -> str:
    """``answer.mp4`` (+ ``answer_strip.png``), then ``answer.json`` = ``answer.to_json() | record``,
    each written atomically, the JSON last (its presence marks the row finished)."""
    from vans_jax.data.video_io import write_video

    os.makedirs(out_dir, exist_ok=True)
    write_video(os.path.join(out_dir, ANSWER_MP4), answer.video, fps=fps)
    if strip and input_frames is not None:
        _atomic_png(os.path.join(out_dir, STRIP_PNG), strip_image(input_frames, answer.video))
    data = answer.to_json() | {"video_frames": int(answer.video.shape[0]),
                               "video_size": [int(answer.video.shape[1]), int(answer.video.shape[2])],
                               "video_fps": float(fps)} | record
    write_json(os.path.join(out_dir, ANSWER_JSON), data)
    stale = os.path.join(out_dir, ERROR_JSON)
    if os.path.exists(stale):
        os.remove(stale)
    return out_dir


def is_finished(row_dir: str) -> bool:
    """A CSV row is done when its answer.json parses with a ``text`` and its answer.mp4 exists."""
    try:
        with open(os.path.join(row_dir, ANSWER_JSON), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("text"), str) and \
        os.path.isfile(os.path.join(row_dir, ANSWER_MP4))


# ----------------------------------------------------------------------------- runs


def _synthetic_clip(seed: int):
    """An eval-split scene of the synthetic world: (frames, fps, question, think, caption)."""
    from vans_jax.data import synthetic

    cfg = synthetic.WorldConfig()
    rng = np.random.default_rng(seed)
    for _ in range(10_000):
        spec = synthetic.sample_scene(rng, cfg)
        if synthetic.split_of(spec, cfg) == "eval":
            break
    frames, _ = synthetic.render_scene(spec, cfg)
    q, think, cap = synthetic.scene_texts(spec, cfg)
    return frames, float(cfg.fps), q, think, cap


def _models_record(pipe) -> dict:
    return dict(pipe.sources)


def prepare_input(video, question: str | None, output_dir: str, *, seed: int = 0, fps: float = 11.0,
                  synthetic: bool = False, settings=None):
    """The single-clip input, checked before any model is loaded: ``(Clip, question, extra record)``.
    ``video`` None: an eval-split synthetic scene (only with ``synthetic``), written as
    ``output_dir/input.mp4``, its question the default and its ground truth in the record."""
    from vans_jax.data.video_io import write_video
    from vans_jax.pipeline import Clip, load_clip

    extra = {}
    if video is None:
        if not synthetic:
            raise ValueError("--video is required (or --csv); a synthetic clip is the default only with the "
                             "shipped tiny models")
        frames, clip_fps, q, think, cap = _synthetic_clip(seed)
        os.makedirs(output_dir, exist_ok=True)
        path = write_video(os.path.join(output_dir, "input.mp4"), frames, fps=clip_fps)
        clip = Clip(frames, clip_fps, path)
        question = q if question is None else question
        extra["ground_truth"] = {"question": q, "think": think, "caption": cap}
    else:
        clip = load_clip(video, image_fps=fps, settings=settings)   # only the frames the settings use
    if question is None:
        raise ValueError("--question is required")
    if not question.strip():
        raise ValueError("question 0 is empty")
    return clip, question, extra


def predict_one(pipe, clip, question: str, output_dir: str, *, seed: int = 0, strip: bool = True,
                extra: dict | None = None, log=print, progress=None) -> dict:
    """One clip (a ``pipeline.Clip`` or anything ``load_clip`` takes) -> ``output_dir/answer.json`` +
    ``answer.mp4`` (+ strip). Returns the JSON dict. ``progress``: the pipeline's stage lines."""
    from vans_jax.pipeline import InvalidResponseWarning, load_clip

    s = pipe.settings
    clip = load_clip(clip, image_fps=s.fps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InvalidResponseWarning)     # reported once, by ``log`` below
        out = pipe(clip, question, seed=seed, **({"progress": progress} if progress is not None else {}))
    a = out[0]
    record = {"input_video": clip.source, "input_frames": clip.num_frames, "input_fps": float(clip.fps),
              "input": clip.input_record(), "settings": s.to_dict(), "timings": out.timings,
              "models": _models_record(pipe), **(extra or {})}
    write_prediction(output_dir, a, record, s.fps, clip.preview(), strip)
    if record["input"]["warning"]:
        log(f"warning: {record['input']['warning']} (recorded in answer.json 'input')")
    if not a.valid_format:
        log(f"warning: the response has no valid [Think]..[/Think][Ans]..[/Ans] block; caption from "
            f"fallback='{s.fallback}': {a.caption[:200]!r}")
    with open(os.path.join(output_dir, ANSWER_JSON), encoding="utf-8") as f:
        return json.load(f)


class _Progress:
    def __init__(self, total: int, enabled: bool, every_s: float = 5.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.t0 = self.last = time.time()
        self.first = None        # (time, rows computed) when the first computed rows (and compiling) ended

    def __call__(self, done: int, computed: int, skipped: int, failed: int):
        now = time.time()
        if computed and self.first is None:
            self.first = (now, computed)
        if not self.enabled or (now - self.last < self.every_s and 1 < computed and done < self.total):
            return
        self.last = now
        # the rate (and ETA) from the end of the first batch on: the first one includes compiling
        t1, c1 = self.first or (now, computed)
        rate = (computed - c1) / (now - t1) if computed > c1 and now > t1 else 0.0
        left = self.total - done
        eta = f"{left / rate:.0f}s" if rate > 0 else ("?" if computed == 0 else "? (the first batch compiles)")
        print(f"[predict] {done}/{self.total} rows ({skipped} already done, {failed} failed) "
              f"{rate:.2f} rows/s eta {eta}", file=sys.stderr, flush=True)


def predict_csv(pipe, csv_path: str, video_root: str, output_dir: str, *, seed: int = 0, batch_size: int = 1,
                limit: int | None = None, strip: bool = True, progress: bool = True) -> dict:
    """Every CSV row -> ``output_dir/<row index>/answer.json`` + ``answer.mp4``; resumable (see the
    module docstring). Returns a summary dict (also written to ``output_dir/predict_summary.json``)."""
    import warnings

    from vans_jax.data.csv_format import read_vnep_csv
    from vans_jax.data.video_io import VideoError
    from vans_jax.pipeline import InvalidResponseWarning, load_clip

    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    rows = read_vnep_csv(csv_path)
    if not rows:
        raise ValueError(f"{csv_path}: no usable rows ({rows.report.summary()})")
    report = rows.report
    rows = list(rows)[:limit] if limit is not None else list(rows)
    s = pipe.settings
    os.makedirs(output_dir, exist_ok=True)
    todo = [r for r in rows if not is_finished(os.path.join(output_dir, str(r.index)))]
    skipped = len(rows) - len(todo)
    failed: dict[int, str] = {}
    computed, fallbacks = 0, []
    prog = _Progress(len(rows), progress)
    prog(skipped, 0, skipped, 0)

    def fail(row, reason: str, detail: str, text: str | None = None):
        d = os.path.join(output_dir, str(row.index))
        os.makedirs(d, exist_ok=True)
        write_json(os.path.join(d, ERROR_JSON), {"index": row.index, "reason": reason, "detail": detail,
                                                   "input_video_path": row.input_video_path, "text": text})
        failed[row.index] = f"{reason}: {detail}"

    def run_batch(batch):
        nonlocal computed
        clips, ok_rows = [], []
        for row in batch:
            try:
                clips.append(load_clip(os.path.join(video_root, row.input_video_path), image_fps=s.fps, settings=s))
                ok_rows.append(row)
            except (VideoError, ValueError) as e:
                fail(row, "input_video", str(e))
        if not ok_rows:
            return
        seeds = [seed + r.index for r in ok_rows]
        try:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InvalidResponseWarning)   # counted and reported below
                answers = pipe.answer(clips, [r.question for r in ok_rows], seed=seeds, fallback="full").answers
            t1 = time.perf_counter()
            keep = [i for i, a in enumerate(answers) if a.valid_format or s.fallback != "error"]
            videos = pipe.render([clips[i] for i in keep], [answers[i].caption for i in keep],
                                 seed=[seeds[i] for i in keep]) if keep else []
        except ValueError as e:          # e.g. a frame too small for the VLM: find the row(s) one by one
            if len(ok_rows) > 1:
                for row in ok_rows:
                    run_batch([row])
            else:
                fail(ok_rows[0], "error", f"{type(e).__name__}: {e}")
            return
        timings = {"vlm_s": round(t1 - t0, 4), "vdm_s": round(time.perf_counter() - t1, 4),
                   "batch_size": len(ok_rows)}
        for i, (row, a) in enumerate(zip(ok_rows, answers)):
            if i not in keep:
                fail(row, "invalid_response", "no valid [Think]..[/Think][Ans]..[/Ans] block", a.text)
                continue
            if not a.valid_format:
                fallbacks.append(row.index)
            a.video = videos[keep.index(i)]
            record = {"index": row.index, "input_video_path": row.input_video_path, "kind": row.kind,
                      "input_video": clips[i].source, "input_frames": clips[i].num_frames,
                      "input_fps": float(clips[i].fps), "input": clips[i].input_record(), "settings": s.to_dict(),
                      "timings": timings, "models": _models_record(pipe)}
            write_prediction(os.path.join(output_dir, str(row.index)), a, record, s.fps, clips[i].preview(), strip)
            computed += 1

    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        run_batch(batch)
        prog(skipped + start + len(batch), computed, skipped, len(failed))

    summary = {"rows": len(rows), "computed": computed, "skipped_finished": skipped, "failed": len(failed),
               "failures": {str(k): v for k, v in failed.items()}, "fallback_used": len(fallbacks),
               "fallback_rows": fallbacks, "settings": s.to_dict(), "models": _models_record(pipe),
               "csv": os.path.abspath(csv_path), "video_root": os.path.abspath(video_root),
               "csv_report": report.to_dict()}
    write_json(os.path.join(output_dir, "predict_summary.json"), summary)
    return summary


def run_cli(args) -> int:
    """The ``predict`` subcommand (``args`` from ``add_arguments``)."""
    from vans_jax.data.video_io import VideoError
    from vans_jax.pipeline import InvalidResponseError, VANSPipeline
    from vans_jax.sampling.wan import check_generation_size_of_dir

    if args.csv is not None and args.video_root is None:
        raise ValueError("--csv needs --video_root")
    if args.csv is not None and not os.path.isfile(args.csv):
        raise FileNotFoundError(f"--csv {args.csv}: the file does not exist")
    for flag, path in (("--dit", args.dit), ("--lora", args.lora)):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if args.csv is not None and (args.video is not None or args.question is not None):
        raise ValueError("give either --csv (a dataset) or --video/--question (one clip), not both")
    vlm_dir, vdm_dir, base, tiny = resolve_models(args.vlm, args.vdm)
    settings = base.replace(**{k: getattr(args, k) for k in SETTING_ARGS}).validate()
    check_generation_size_of_dir(vdm_dir, settings.height, settings.width, settings.num_frames, dit_path=args.dit)
    single = None
    if args.csv is None:     # bad input fails before minutes of model loading
        try:
            single = prepare_input(args.video, args.question, args.output_dir, seed=args.seed, fps=settings.fps,
                                   synthetic=tiny, settings=settings)
        except VideoError as e:
            print(f"vans-jax predict: error: {e}", file=sys.stderr)
            return 2
    # what a killed run left half-written (its rows are redone: their answer.json is missing)
    remove_stale_tmp(args.output_dir, depth=1)
    t0 = time.perf_counter()
    pipe = VANSPipeline.from_pretrained(vlm_dir, vdm_dir, vans_dit=args.dit, lora=args.lora, dtype=args.dtype,
                                        settings=settings)
    load_s = time.perf_counter() - t0
    if not args.quiet:
        print(f"[predict] loaded {'the shipped tiny models' if tiny else vlm_dir + ' + ' + vdm_dir} "
              f"in {load_s:.1f}s", file=sys.stderr)
    if single is None:
        summary = predict_csv(pipe, args.csv, args.video_root, args.output_dir, seed=args.seed,
                              batch_size=args.batch_size, limit=args.limit, strip=not args.no_strip,
                              progress=not args.quiet)
        print(f"{summary['rows']} rows: {summary['computed']} predicted, {summary['skipped_finished']} already done, "
              f"{summary['failed']} failed, {summary['fallback_used']} without a valid [Ans] block (fallback "
              f"'{settings.fallback}') -> {args.output_dir}")
        for k, v in list(summary["failures"].items())[:20]:
            print(f"  row {k}: {v}", file=sys.stderr)
        return 1 if summary["failed"] else 0
    clip, question, extra = single
    try:
        data = predict_one(pipe, clip, question, args.output_dir, seed=args.seed, strip=not args.no_strip,
                           extra=extra, log=lambda m: print(m, file=sys.stderr),
                           progress=None if args.quiet else (lambda m: print(f"[predict] {m}", file=sys.stderr,
                                                                              flush=True)))
    except InvalidResponseError as e:
        print(f"vans-jax predict: error: {e}", file=sys.stderr)
        return 2
    t = data["timings"]
    print(f"question: {data['question']}\nthink: {data['think']}\ncaption: {data['caption']}"
          f"{'' if data['valid_format'] else '  (no valid [Ans] block: fallback)'}\n"
          f"VLM {t['vlm_s']:.2f}s, VDM {t['vdm_s']:.2f}s (first call includes compilation) -> "
          f"{os.path.join(args.output_dir, ANSWER_JSON)}, {ANSWER_MP4}")
    return 0
