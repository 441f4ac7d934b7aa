"""``vans-jax serve``: the web demo (a Gradio page over the VANS pipeline).

    pip install -e ".[app]"
    vans-jax serve                      # the shipped tiny synthetic-world models, http://127.0.0.1:7860
    vans-jax serve --vlm QWEN_DIR --vdm WAN_DIR [--dit vdm.safetensors] [--lora ADAPTER] [--mesh fsdp=8]

The page: upload a video or a still image, type a question, choose the sampler steps, the CFG
scale, the seed, the number of futures (answers drawn with seeds ``seed``, ``seed + 1``, ...; the
paper's multi-future use) and the VLM temperature, and get the reasoning, the caption, the answer
video(s) and the input strip (input frames | answer frames). Clips of the synthetic world are one
click away (``Examples``). The models load once, at start; requests queue and run one at a time;
the pipeline's stage lines show as the page's progress. A bad request (no file, a file that is not
a video or an image, a corrupt one, an empty question) gets a message in the page's status box,
never a traceback, and the server keeps serving; an unexpected failure of the models is reported
the same way (its traceback goes to the server's stderr).

Every answer is written as ``predict`` writes one (``apps.predict.write_prediction``:
``answer.mp4``, ``answer.json``, ``answer_strip.png``) under ``--output_dir/requests/<n>/<future>/``;
only the last ``--keep`` requests are kept.

Gradio is imported only by ``build_app`` / ``launch`` (the optional ``app`` extra): the ``serve``
arguments, ``ServeApp`` and ``vans-jax --help`` work without it. ``ServeApp`` is the page's logic
without the page (tests call it directly).

On a remote TPU/GPU VM: start it there (it listens on 127.0.0.1 by default) and forward the port::

    ssh -L 7860:127.0.0.1:7860 user@vm   # then, on the VM: vans-jax serve --vlm ... --vdm ...
    # open http://127.0.0.1:7860 on your machine

(``--host 0.0.0.0`` exposes it on every interface of the VM instead: only behind a firewall.)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import threading
import time
import traceback

__all__ = ["add_arguments", "ServeApp", "ServeError", "Reply", "build_app", "launch", "run_cli",
           "MEDIA_EXTENSIONS", "write_examples"]

# what the upload accepts: the containers PyAV reads for video, and the still images load_clip reads
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
MAX_FUTURES = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's arguments (imports nothing heavy, gradio included)."""
    from vans_jax.apps.predict import SETTING_ARGS

    p.add_argument("--vlm", default=None, help="Hugging Face Qwen2.5-VL directory (default: the shipped tiny model)")
    p.add_argument("--vdm", default=None, help="diffusers Wan2.1 directory (default: the shipped tiny model)")
    p.add_argument("--dit", default=None, help="fine-tuned DiT: VANS vdm.safetensors or a diffusers transformer dir")
    p.add_argument("--lora", default=None, help="PEFT LoRA adapter directory for the VLM (merged at load)")
    p.add_argument("--mesh", default=None, help="shard the models over devices: 'N' (fsdp=N) or 'fsdp=4,tensor=2' "
                                                "(default: one device)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (bf16 on GPU/TPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: reach it through "
                                                       "SSH forwarding; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--output_dir", default=None, help="where answers are written (default: a temporary directory)")
    p.add_argument("--keep", type=int, default=20, help="requests whose files are kept under --output_dir")
    p.add_argument("--examples", type=int, default=3, help="synthetic-world example clips offered (tiny models only)")
    g = p.add_argument_group("settings (default: the shipped models' defaults.json, or VANS' with --vlm/--vdm); "
                             "steps, CFG and temperature are also set per request in the page")
    for name, (typ, help_) in SETTING_ARGS.items():
        g.add_argument(f"--{name}", type=typ, default=None, help=help_)


class ServeError(ValueError):
    """A request the page answers with a message (bad upload, empty question, failed generation)."""


@dataclasses.dataclass
class Reply:
    """What one request gives the page."""
    think: str
    caption: str
    videos: list           # answer.mp4 paths, one per future
    strip: str | None      # the first future's input | answer strip (PNG)
    futures: list          # per future: {"seed", "caption", "think", "valid_format", "video"}
    status: str            # the message for the status box
    seconds: float


def write_examples(out_dir: str, n: int, seed: int = 0) -> list[list]:
    """``n`` eval-split clips of the synthetic world as mp4s under ``out_dir``: ``[[path, question], ...]``."""
    from vans_jax.apps.predict import _synthetic_clip
    from vans_jax.data.video_io import write_video

    out = []
    for i in range(n):
        frames, fps, question, _, _ = _synthetic_clip(seed + i)
        out.append([write_video(os.path.join(out_dir, f"example_{i}.mp4"), frames, fps=fps), question])
    return out


class ServeApp:
    """The page's logic: one pipeline (loaded once), requests run one at a time (a lock, besides
    the page's queue), each one's files under ``output_dir/requests/<n>/``."""

    def __init__(self, pipe, output_dir: str, *, examples: list | None = None, keep: int = 20,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True)):
        self.pipe, self.output_dir, self.keep, self.log = pipe, os.path.abspath(output_dir), int(keep), log
        self.examples = list(examples or [])
        self._lock = threading.Lock()
        self._count = 0
        os.makedirs(self.output_dir, exist_ok=True)

    @property
    def settings(self):
        return self.pipe.settings

    # -- checks: each failure is one sentence for the page

    @staticmethod
    def check_upload(path) -> str:
        if path is None or (isinstance(path, str) and not path.strip()):
            raise ServeError("Upload a video or a still image first (or click one of the examples).")
        path = os.fspath(getattr(path, "name", path))     # a path, or a file object with .name
        if not os.path.isfile(path):
            raise ServeError(f"The upload {os.path.basename(path)} did not arrive; upload it again.")
        ext = os.path.splitext(path)[1].lower()
        if ext not in MEDIA_EXTENSIONS:
            raise ServeError(f"{os.path.basename(path)} is not a video or an image this demo reads "
                             f"({' '.join(MEDIA_EXTENSIONS)}).")
        if os.path.getsize(path) == 0:
            raise ServeError(f"{os.path.basename(path)} is empty (0 bytes).")
        return path

    @staticmethod
    def check_question(question) -> str:
        if not isinstance(question, str) or not question.strip():
            raise ServeError("Type a question (for example: What will happen next?).")
        return question.strip()

    def _settings_for(self, num_steps, cfg_scale, temperature):
        changes = {k: v for k, v in (("num_steps", None if num_steps is None else int(num_steps)),
                                     ("cfg_scale", None if cfg_scale is None else float(cfg_scale)),
                                     ("temperature", None if temperature is None else float(temperature)))
                   if v is not None}
        try:
            return self.pipe.resolve_settings(**changes)
        except ValueError as e:
            raise ServeError(f"Settings not accepted: {e}") from None

    def _request_dir(self) -> str:
        self._count += 1
        root = os.path.join(self.output_dir, "requests")
        d = os.path.join(root, f"{self._count:05d}")
        if os.path.isdir(root):             # bounded disk: only the last `keep` requests stay
            old = sorted(x for x in os.listdir(root) if x.isdigit())
            for x in old[:max(0, len(old) - self.keep + 1)]:
                shutil.rmtree(os.path.join(root, x), ignore_errors=True)
        return d

    # -- one request

    def respond(self, upload, question, num_steps=None, cfg_scale=None, seed=0, num_futures=1, temperature=None,
                progress=None) -> Reply:
        """One request -> ``Reply``; a request the page should answer with a message raises
        ``ServeError`` (its text is that message). ``progress(fraction, text)``: the stage lines."""
        from vans_jax.apps.predict import write_prediction
        from vans_jax.data.video_io import VideoError
        from vans_jax.pipeline import InvalidResponseWarning, load_clip

        path = self.check_upload(upload)
        question = self.check_question(question)
        n = int(num_futures or 1)
        if not 1 <= n <= MAX_FUTURES:
            raise ServeError(f"Number of futures must be 1 to {MAX_FUTURES}, got {n}.")
        seed = int(seed or 0)
        say = progress or (lambda frac, text: None)
        with self._lock:
            t0 = time.perf_counter()
            s = self._settings_for(num_steps, cfg_scale, temperature)
            try:
                clip = load_clip(path, image_fps=s.fps, settings=s)
            except (VideoError, ValueError, OSError) as e:
                # the message without the server's upload path (a temporary file the user never named)
                msg = str(e).replace(repr(path), "the file").replace(path, "the file")
                raise ServeError(f"Could not read {os.path.basename(path)}: {msg}") from None
            say(0.05, f"read {os.path.basename(path)}: {clip.num_frames} frame(s)")
            stages = iter((0.1, 0.45, 0.5, 0.95))

            def stage(msg):
                say(next(stages, 0.95), msg)

            try:
                import warnings
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", InvalidResponseWarning)      # shown as "fallback" below
                    out = self.pipe(clip, question, seed=seed, num_futures=n, num_steps=s.num_steps,
                                    cfg_scale=s.cfg_scale, temperature=s.temperature, progress=stage)
            except ValueError as e:          # e.g. a frame too small for the VLM
                raise ServeError(f"The models could not answer this input: {e}") from None
            except Exception as e:           # noqa: BLE001 - the page gets a message, the log the traceback
                self.log(traceback.format_exc())
                raise ServeError(f"Generation failed ({type(e).__name__}: {e}); the server keeps running.") from None
            d = self._request_dir()
            futures = []
            for k, a in enumerate(out):
                fd = write_prediction(os.path.join(d, str(k)), a,
                                      {"seed": seed + k, "settings": s.to_dict(), "timings": out.timings,
                                       "input": clip.input_record(), "models": dict(self.pipe.sources)},
                                      s.fps, clip.preview(), strip=True)
                futures.append({"seed": seed + k, "caption": a.caption, "think": a.think,
                                "valid_format": bool(a.valid_format), "video": os.path.join(fd, "answer.mp4"),
                                "strip": os.path.join(fd, "answer_strip.png")})
            dt = time.perf_counter() - t0
            say(1.0, "done")
        first = futures[0]
        note = "" if first["valid_format"] else " (no valid [Think]/[Ans] block: the caption is the whole response)"
        status = (f"Answered in {dt:.1f}s: {n} future(s), {s.num_steps} steps, CFG {s.cfg_scale:g}, seed {seed}"
                  f"{note}.")
        self.log(f"[serve] {status}")
        return Reply(think=first["think"], caption=first["caption"], videos=[f["video"] for f in futures],
                     strip=first["strip"], futures=futures, status=status, seconds=dt)


# ----------------------------------------------------------------------------- the page

CSS = "#status {min-height: 2.5em}"


def build_app(app: ServeApp):
    """The Gradio page (``gr.Blocks``) over ``app``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")    # no calls home (VMs and CI without network)
    import gradio as gr

    s = app.settings
    with gr.Blocks(title="VANS: video as answer") as page:
        gr.Markdown("# VANS: video as answer\nUpload a clip (or a still image), ask what happens next, and get the "
                    "reasoning, the caption and the next event as a video. Models: "
                    f"`{app.pipe.sources.get('vlm', '?')}` + `{app.pipe.sources.get('vdm', '?')}`; "
                    f"{s.height}x{s.width}, {s.num_frames} frames at {s.fps:g} fps.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Video or image", file_types=list(MEDIA_EXTENSIONS), type="filepath",
                                 elem_id="upload")
                question = gr.Textbox(label="Question", lines=2, elem_id="question",
                                      placeholder="What will happen next?")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=s.num_steps, step=1, label="Sampler steps", elem_id="steps")
                    cfg = gr.Slider(0.0, 15.0, value=s.cfg_scale, step=0.5, label="CFG scale", elem_id="cfg")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                    futures = gr.Slider(1, MAX_FUTURES, value=1, step=1, label="Futures", elem_id="futures")
                    temperature = gr.Slider(0.0, 1.5, value=s.temperature, step=0.05, label="VLM temperature",
                                            elem_id="temperature")
                submit = gr.Button("Answer", variant="primary", elem_id="submit")
                status = gr.Markdown("", elem_id="status")
                if app.examples:
                    gr.Examples(app.examples, inputs=[upload, question], label="Synthetic-world examples")
            with gr.Column():
                answer_video = gr.Video(label="Answer video (first future)", elem_id="answer_video",
                                        interactive=False, autoplay=True, loop=True)
                caption = gr.Textbox(label="Caption", elem_id="caption", interactive=False)
                think = gr.Textbox(label="Reasoning", elem_id="think", lines=3, interactive=False)
                strip = gr.Image(label="Input | answer", elem_id="strip", interactive=False)
                gallery = gr.Gallery(label="All futures", elem_id="futures_gallery", columns=4, height=240,
                                     object_fit="contain", visible=False)
                table = gr.Markdown("", elem_id="futures_table")

        def run(upload_v, question_v, steps_v, cfg_v, seed_v, futures_v, temp_v, progress=gr.Progress()):
            try:
                r = app.respond(upload_v, question_v, steps_v, cfg_v, seed_v, futures_v, temp_v,
                                progress=lambda frac, text: progress(frac, desc=text))
            except ServeError as e:
                return None, "", "", None, gr.Gallery(value=[], visible=False), "", f"**Error:** {e}"
            rows = "\n".join(f"| {f['seed']} | {f['caption']} | {'yes' if f['valid_format'] else 'no'} |"
                             for f in r.futures)
            many = len(r.futures) > 1          # the gallery only when there is more than the video above
            return (r.videos[0], r.caption, r.think, r.strip,
                    gr.Gallery(value=[(v, f"seed {f['seed']}") for v, f in zip(r.videos, r.futures)] if many else [],
                               visible=many),
                    "| seed | caption | valid format |\n|---|---|---|\n" + rows, r.status)

        submit.click(run, [upload, question, steps, cfg, seed, futures, temperature],
                     [answer_video, caption, think, strip, gallery, table, status])
    return page


def launch(app: ServeApp, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True):
    """Builds the page and serves it; requests queue and run one at a time. ``block=False``: returns
    ``(page, url)`` with the server running in a thread (``page.close()`` stops it)."""
    page = build_app(app)
    page.queue(default_concurrency_limit=1)
    kw = dict(server_name=host, server_port=port, allowed_paths=[app.output_dir], show_error=False, css=CSS,
              prevent_thread_lock=not block, quiet=not block)
    try:
        page.launch(**kw)
    except TypeError:                    # Gradio < 6 takes css in Blocks(), not launch()
        kw.pop("css")
        page.launch(**kw)
    return page, page.local_url


def run_cli(args) -> int:
    """The ``serve`` subcommand."""
    import importlib.util

    from vans_jax.apps.predict import SETTING_ARGS, resolve_models
    from vans_jax.sampling.wan import check_generation_size_of_dir

    if importlib.util.find_spec("gradio") is None:
        print("vans-jax serve: error: the web demo needs Gradio: pip install -e \".[app]\" (or pip install gradio)",
              file=sys.stderr)
        return 2
    for flag, path in (("--dit", args.dit), ("--lora", args.lora)):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path} does not exist")
    vlm_dir, vdm_dir, base, tiny = resolve_models(args.vlm, args.vdm)
    settings = base.replace(**{k: getattr(args, k) for k in SETTING_ARGS}).validate()
    check_generation_size_of_dir(vdm_dir, settings.height, settings.width, settings.num_frames, dit_path=args.dit)
    mesh = None
    if args.mesh:
        from vans_jax import parallel
        from vans_jax.apps.memory_plan import parse_mesh
        mesh = parallel.make_mesh(parse_mesh(args.mesh) or {"data": 1})
    out = args.output_dir
    if out is None:
        import tempfile
        out = tempfile.mkdtemp(prefix="vans_serve_")
    from vans_jax.pipeline import VANSPipeline

    t0 = time.perf_counter()
    pipe = VANSPipeline.from_pretrained(vlm_dir, vdm_dir, vans_dit=args.dit, lora=args.lora, dtype=args.dtype,
                                        mesh=mesh, settings=settings)
    print(f"[serve] loaded {'the shipped tiny models' if tiny else vlm_dir + ' + ' + vdm_dir} in "
          f"{time.perf_counter() - t0:.1f}s; answers under {out}", file=sys.stderr, flush=True)
    examples = write_examples(os.path.join(out, "examples"), args.examples) if tiny and args.examples > 0 else []
    app = ServeApp(pipe, out, examples=examples, keep=args.keep)
    print(f"[serve] http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    launch(app, args.host, args.port, block=True)
    return 0
