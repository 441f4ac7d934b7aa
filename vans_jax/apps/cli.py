"""The ``vans-jax`` command.

    vans-jax train --config configs/NAME.py [--config.train.mode=grpo_stage1] [--config.a.b=value ...]
    vans-jax predict [--vlm DIR --vdm DIR] [--dit FILE] [--lora DIR] (--video FILE --question TEXT | --csv FILE
                     --video_root DIR) --output_dir DIR [--seed S] [--num_steps N ...any setting]
    vans-jax demo [--output_dir DIR] [--quick] [--config configs/tiny_world.py] [--config.a.b=value ...]
    vans-jax demo --compare [--seeds 0 1 2] [--variants default|table2|nulls|NAME ...] [--output_dir DIR] [--quick]
    vans-jax demo --vlm_only [--config configs/tiny.py] [--question TEXT] [--video FILE] [--output FILE]
    vans-jax make-data --output_dir DIR --num_samples N --seed S [--split all|train|rl|eval] [--train N ...]
    vans-jax validate-data --csv FILE --video_root DIR [--output report.json] [--quick]
    vans-jax eval --predictions DIR --csv FILE --video_root DIR --output FILE.json
                  [--clip DIR] [--i3d FILE] [--random_models] [--exclude_missing]
                  [--num_frames 33 --height 352 --width 640 --fps 11]
    vans-jax bench --config configs/bench_cpu.py --output FILE.json [--config.a.b=value ...]
    vans-jax memory-plan --config configs/vans.py [--meshes 1 fsdp=8 ...] [--remat none dots full]
        [--seq-parallel none ring ulysses] --output FILE.json
    vans-jax serve [--vlm DIR --vdm DIR] [--dit FILE] [--lora DIR] [--mesh fsdp=8] [--host H --port P]

Config overrides use the ``--config.a.b=value`` form on any subcommand that takes a config.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _split_overrides(argv):
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return rest, overrides


def check_output_paths(args) -> None:
    """``--output_dir`` / ``--output`` that cannot be written are errors now, before any model loads
    (not a traceback after all the work): an output directory that is an existing file, an output file
    that is an existing directory, or either under a path that is a file."""
    for flag, path, want_dir in (("--output_dir", getattr(args, "output_dir", None), True),
                                 ("--output", getattr(args, "output", None), False)):
        if not path:
            continue
        if want_dir and os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{flag} {path} is an existing file, not a directory")
        if not want_dir and os.path.isdir(path):
            raise ValueError(f"{flag} {path} is an existing directory; give a file name")
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"{flag} {path}: {parent} is a file, so nothing can be written below it")


def _demo(args, overrides):
    from vans_jax.apps import demo as world_demo
    from vans_jax.apps.configlib import load_config

    if not args.vlm_only:
        cfg = load_config(args.config or "tiny_world", overrides)
        out_dir = args.output_dir or (os.path.splitext(args.output)[0] if args.output else "out/demo")
        if args.compare:
            world_demo.compare(cfg, out_dir, seeds=args.seeds, quick=args.quick, variants=args.variants)
            return 0
        result = world_demo.run(cfg, out_dir, quick=args.quick)
        if args.output:
            from vans_jax._files import write_json
            write_json(args.output, {k: result[k] for k in ("before", "after", "settings", "timings")})
            print(f"wrote {args.output}")
        return 0
    cfg = load_config(args.config or "tiny", overrides)
    result = world_demo.run_vlm_only(cfg, args.question, args.output, args.video)
    for i, a in enumerate(result["answers"]):
        print(f"[{i}] ({a['tokens']} tokens, valid format: {a['valid_format']}) {a['text']!r}")
    t = result["timings"]
    print(f"load {t['load_s']}s, first call (compile) {t['first_call_s']}s, steady {t['steady_s']}s, "
          f"{t['tokens_per_s']} tokens/s on {result['num_devices']} {result['device']} device(s)")
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _validate(args):
    from vans_jax.data.loader import validate_dataset

    report = validate_dataset(args.csv, args.video_root, full_decode=not args.quick)
    print(report.summary())
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report.to_dict(), f, indent=2, default=str)
        print(f"wrote {args.output}")
    return 0 if report.ok else 1


def _make_data(args):
    from vans_jax.data import synthetic

    counts = synthetic.split_plan(args.num_samples, args.split)
    counts.update({k: n for k in ("train", "rl", "eval") if (n := getattr(args, k)) is not None})
    wc = synthetic.WorldConfig(**{k: getattr(args, k) for k in ("height", "width", "fps") if getattr(args, k)})
    made = synthetic.make_splits(args.output_dir, counts, seed=args.seed, config=wc,
                                 tokenizer_corpus=args.tokenizer_corpus)
    for split, ws in made.items():
        print(f"{split}: {ws}" if split == "tokenizer_corpus" else f"{split}: {len(ws.rows)} samples -> {ws.csv_path}")
    print(f"videos under {args.output_dir}/videos (pass it as --video_root)")
    return 0


def _eval(args):
    from vans_jax.eval import runner

    config = runner.EvalConfig(num_frames=args.num_frames, height=args.height, width=args.width, fps=args.fps,
                               fvd_batch_size=args.batch_size)
    models = runner.load_models(args.clip, args.i3d, use_random=args.random_models)
    result = runner.evaluate(args.predictions, args.csv, args.video_root, args.output, models=models,
                             config=config, method=args.method, exclude_missing=args.exclude_missing,
                             progress=not args.quiet)
    print(runner.markdown_table(result))
    if result["complete"]:
        return 0
    failed = result["failed_rows"]
    print(f"vans-jax eval: incomplete: {len(failed)} of {result['counts']['rows']} rows could not be scored "
          f"(rows {failed[:20]}{' ...' if len(failed) > 20 else ''}; "
          + ("left out: --exclude_missing)" if args.exclude_missing else "scored as failures)"), file=sys.stderr)
    return 1


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    parser = argparse.ArgumentParser(prog="vans-jax", description="VANS (Video-as-Answer) in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Joint-GRPO end to end on the embedded synthetic world: evaluate the shipped "
                                       "SFT models, stage 1 + stage 2, evaluate again (before/after metrics, "
                                       "videos, contact sheet, TensorBoard logs)")
    demo.add_argument("--output_dir", default=None, help="where everything goes (default: out/demo)")
    demo.add_argument("--quick", action="store_true", help="a shortened run (a few samples and steps; CI)")
    demo.add_argument("--compare", action="store_true",
                      help="SFT vs GRPO-on-VLM-only vs Joint-GRPO stage 1 vs Joint-GRPO, over --seeds "
                           "(writes compare.json / compare.md; resumable)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds for --compare")
    demo.add_argument("--variants", nargs="+", default=None,
                      help="rows for --compare: 'default' (GRPO on the VLM only, stage 1, Joint-GRPO), 'table2' "
                           "(all of the paper's Table 2), 'nulls' (the DiT-training rows with shuffled "
                           "advantages) or names: grpo_vlm grpo_vdm grpo_vdm_null isolated_cascaded stage1 "
                           "stage1_no_t1 stage1_no_v1 joint_no_c2 joint_no_v2 all_in_one joint_grpo joint_grpo_null")
    demo.add_argument("--vlm_only", action="store_true",
                      help="instead: VLM inference on one clip with a tiny random model (no shipped models needed)")
    demo.add_argument("--config", default=None,
                      help="config file or name in configs/ (default: tiny_world; with --vlm_only: tiny)")
    demo.add_argument("--question", default="What will happen next?")
    demo.add_argument("--video", default=None, help="an mp4 to answer about (default: a synthetic clip)")
    demo.add_argument("--output", default=None, help="also write the before/after metrics (or, with --vlm_only, "
                                                     "the answers) as JSON here")
    make = sub.add_parser("make-data", help="write the synthetic VNEP world in the VANS-Data layout (CSV + mp4s)")
    make.add_argument("--output_dir", required=True)
    make.add_argument("--num_samples", type=int, required=True)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--split", default="all", choices=["all", "train", "rl", "eval"])
    for split in ("train", "rl", "eval"):
        make.add_argument(f"--{split}", type=int, default=None, help=f"samples in the {split} split (overrides the plan)")
    make.add_argument("--height", type=int, default=None, help="canvas height (default 64)")
    make.add_argument("--width", type=int, default=None, help="canvas width (default 64)")
    make.add_argument("--fps", type=float, default=None, help="frame rate (default 4)")
    make.add_argument("--tokenizer_corpus", action="store_true", help="also write OUTPUT_DIR/world_texts.txt")
    val = sub.add_parser("validate-data", help="check every row of a VANS-Data CSV and its videos (never stops early)")
    val.add_argument("--csv", required=True)
    val.add_argument("--video_root", required=True)
    val.add_argument("--output", default=None, help="write the full report as JSON here")
    val.add_argument("--quick", action="store_true", help="probe headers only instead of decoding every frame")
    ev = sub.add_parser("eval", help="score a predictions directory: BLEU@1-4, ROUGE-L, CLIP-V, CLIP-T, FVD "
                                     "(JSON + a Table-1 markdown next to it)")
    ev.add_argument("--predictions", required=True, help="DIR with <row index>/answer.json and answer.mp4")
    ev.add_argument("--csv", required=True)
    ev.add_argument("--video_root", required=True)
    ev.add_argument("--output", required=True, help="results .json (the .md table goes next to it)")
    ev.add_argument("--clip", default=None, help="Hugging Face CLIP directory (without it CLIP-V/T are null)")
    ev.add_argument("--i3d", default=None, help="I3D weights, safetensors (without it FVD is null)")
    ev.add_argument("--random_models", action="store_true",
                    help="tiny random CLIP / feature net instead (tests and demos only: numbers mean nothing)")
    ev.add_argument("--method", default=None, help="name in the table (default: the predictions folder name)")
    ev.add_argument("--exclude_missing", action="store_true",
                    help="headline metrics over only the rows that could be scored (default: every row, a missing "
                         "or unreadable prediction scoring 0); the exit code is 1 either way when rows failed")
    ev.add_argument("--num_frames", type=int, default=33, help="ground-truth clip frames (4k+1)")
    ev.add_argument("--height", type=int, default=352)
    ev.add_argument("--width", type=int, default=640)
    ev.add_argument("--fps", type=float, default=11.0)
    ev.add_argument("--batch_size", type=int, default=8, help="videos per FVD feature batch")
    ev.add_argument("--quiet", action="store_true", help="no progress lines")
    from vans_jax.train.modes import help_text as _train_help
    tr = sub.add_parser("train", help="SFT / Joint-GRPO training (modes: sft_vlm, sft_vdm, grpo_stage1, grpo_stage2, "
                                      "grpo_vlm, grpo_vdm, grpo_all_in_one); the same command resumes",
                        epilog=_train_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--config", required=True, help="config file or name in configs/; override with --config.a.b=v")
    pr = sub.add_parser("predict", help="VANS inference: clip + question -> answer.json + answer.mp4 (or a whole CSV, "
                                        "resumable; default: the shipped tiny models)")
    from vans_jax.apps import predict as _predict_args
    _predict_args.add_arguments(pr)
    be = sub.add_parser("bench", help="throughput vs the PyTorch references (VLM, DiT, CFG generation, VAE): "
                                      "JSON + a markdown table next to it")
    be.add_argument("--config", required=True, help="configs/bench_cpu.py, configs/bench_gpu.py or your own")
    be.add_argument("--output", required=True, help="results .json (the .md table goes next to it)")
    mp = sub.add_parser("memory-plan", help="per-device bytes of params, grads, optimizer and activations of the "
                                            "VLM Stage-1 and DiT Stage-2 steps per mesh and remat policy")
    mp.add_argument("--config", default="vans", help="experiment config (default: configs/vans.py)")
    mp.add_argument("--meshes", nargs="+", default=None, help="e.g. 1 fsdp=8 fsdp=4,tensor=2 (default: 5 shapes)")
    mp.add_argument("--remat", nargs="+", default=None, help="remat policies (default: none dots full)")
    mp.add_argument("--workloads", nargs="+", default=None, help="vlm_stage1 dit_stage2 (default: both)")
    mp.add_argument("--seq-parallel", nargs="+", default=["none"], choices=["none", "ring", "ulysses"],
                    help="DiT self-attention over a sequence mesh axis: 'none' gathers keys/values (default); "
                         "'ring' / 'ulysses' add rows with sequence-parallel attention")
    mp.add_argument("--platform", default="cpu", choices=["cpu", "default"],
                    help="compile for fake CPU devices (any mesh) or the default backend's own devices")
    mp.add_argument("--output", required=True, help="FILE.json (the .md table goes next to it) or FILE.md")
    sv = sub.add_parser("serve", help="the web demo (Gradio, the 'app' extra): upload a clip or an image, ask, watch the "
                                      "answer video(s); default: the shipped tiny models")
    from vans_jax.apps import serve as _serve_args
    _serve_args.add_arguments(sv)
    args = parser.parse_args(rest)
    # XLA's flags are read when JAX's backends start: the project's defaults go in first
    from .xla_env import apply_default_xla_flags
    apply_default_xla_flags()
    # transformers (used here for tokenizers only) would print "PyTorch was not found ..." on import
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if args.command in ("demo", "predict", "serve"):
        from .compile_cache import enable
        enable()
    try:
        check_output_paths(args)
        if args.command == "predict":
            from vans_jax.apps import predict
            return predict.run_cli(args)
        if args.command == "serve":
            from vans_jax.apps import serve
            return serve.run_cli(args)
        if args.command == "train":
            from vans_jax.apps.configlib import load_config
            from vans_jax.train.loop import main_train
            return main_train(load_config(args.config, overrides))
        if args.command == "demo":
            return _demo(args, overrides)
        if args.command == "memory-plan":
            from vans_jax.apps import memory_plan
            from vans_jax.apps.configlib import load_config
            kw = {k: tuple(v) for k, v in (("meshes", args.meshes), ("remats", args.remat),
                                           ("workloads", args.workloads)) if v}
            result = memory_plan.run(load_config(args.config, overrides), args.output,
                                     settings=memory_plan.PlanSettings(platform=args.platform,
                                                                       seq_parallel=tuple(args.seq_parallel)), **kw)
            print(memory_plan.markdown(result) + "wrote " + " and ".join(memory_plan.output_paths(args.output)))
            return 0
        if args.command == "bench":
            # JAX and the torch reference share the accelerator: no up-front grab of 75% of its memory
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            from vans_jax.apps import bench
            from vans_jax.apps.configlib import load_config
            result = bench.run(load_config(args.config, overrides), args.output)
            print(bench.markdown_table(result) + f"wrote {args.output} and {bench.markdown_path(args.output)}")
            return 0
        if args.command == "validate-data":
            return _validate(args)
        if args.command == "make-data":
            return _make_data(args)
        if args.command == "eval":
            return _eval(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"vans-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
