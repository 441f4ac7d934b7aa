"""The one-call GPU check (``launch/gpu_check.sh OUT.json``; here: ``python -m vans_jax.apps.gpu_check``).

On one H100/H200, in one process, in under 8 minutes, with random weights in bf16 (``vans-jax
bench``'s sections and model builders, ``configs/bench_gpu.py``'s full-size shapes):

1. ``matmul``: the measured bf16 dense rate (the yardstick for 3);
2. ``vlm_parity``: Qwen2.5-VL-3B logits of one 6-frame video prompt, ours vs transformers on the
   same weights (max / mean relative error, argmax agreement);
3. ``dit``: one Wan2.1-1.3B DiT forward at 6 + 9 latent frames of 352x640 (13,200 tokens), ours
   (attention "auto": cuDNN flash in bf16) vs diffusers, both timed, the error between them,
   achieved TFLOP/s and the fraction of the measured matmul rate;
4. ``vlm``: 8 x 256 caption tokens sampled after one video prompt, ours vs transformers ``generate``;
5. ``pipeline``: a 50-step CFG text-to-video generation at 352x640x33, ours vs diffusers' WanPipeline.

The JSON written to ``--output`` (rewritten after every section, so a run cut short keeps what it
measured) holds ``summary`` (the figures above and the README's targets: 50-step video < 13 s, DiT
forward >= 0.5 of the matmul rate, 8 x 256 tokens < 1.5 s) and every bench figure.
``--reduced``: the same sections on ``configs/bench_cpu.py``'s tiny models, fp32, a few steps and
tokens: it runs on CPU in under a minute (the test suite runs it so the check cannot rot).

Time savers against the full bench (stated in ``settings`` of the output): no DiT training step, no
VANS (reference-frame) generation, 2 timed repeats of ours and 1 of the reference, and a UMT5-XXL
text encoder of 2 layers instead of 24 (full width; it runs once per generation).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTIONS = ("matmul", "vlm_parity", "dit", "vlm", "pipeline")
TARGETS = dict(pipeline_t2v_s=13.0, dit_fraction_of_matmul=0.5, vlm_generate_s=1.5)
# what the check imports beyond jax / flax / numpy / torch / transformers (carried as wheels where missing)
NEEDS = ("diffusers", "ml_collections", "optax", "safetensors", "PIL")


def check_config(reduced: bool):
    from vans_jax.apps.configlib import load_config

    c = load_config(os.path.join(ROOT, "configs", "bench_cpu.py" if reduced else "bench_gpu.py"))
    c.sections = SECTIONS
    c.repeats, c.reference_repeats = 2, 1
    c.dit.train_step = False
    c.pipeline.n_ref = 0
    if reduced:
        c.repeats = 1
        c.matmul.update(dict(size=256, repeats=3))
        c.vlm.update(dict(num_return_sequences=2, max_new_tokens=16))
        c.dit.update(dict(n_ref=1, target_frames=2, height=64, width=64, text_len=16))
        c.pipeline.update(dict(height=32, width=32, num_frames=5, num_steps=2, text_len=16))
    else:
        c.wan.text_encoder.num_layers = 2
        c.matmul.repeats = 10
    return c


def _figure(result, name):
    return next((f for f in result["figures"] if f["name"] == name), None)


def _pick(fig, *keys):
    if fig is None:
        return None
    out = {}
    for k in keys:
        v = fig
        for part in k.split("."):
            v = None if v is None else v.get(part)
        out[k.replace(".", "_")] = v
    return out


def summary(result: dict) -> dict:
    """The figures the check is for, and whether the README's targets are met."""
    mm, dit, vlm_p = _figure(result, "matmul"), _figure(result, "dit_forward"), _figure(result, "vlm_logits")
    gen, t2v = _figure(result, "vlm_generate"), _figure(result, "pipeline_t2v")
    s = dict(
        matmul=_pick(mm, "shape.m", "ours.tflops_per_s", "reference.tflops_per_s"),
        dit_parity=_pick(dit, "parity_rel_err", "parity_mean_rel_err"),
        vlm_parity=_pick(vlm_p, "parity_rel_err", "parity_mean_rel_err", "argmax_agreement"),
        dit_forward=_pick(dit, "shape.tokens", "attn_impl", "ours.steady_s", "reference.steady_s", "speedup",
                          "ours.tflops_per_s", "reference.tflops_per_s", "fraction_of_measured_matmul"),
        captions=_pick(gen, "shape.num_return_sequences", "shape.new_tokens", "ours.steady_s",
                       "reference.steady_s", "speedup", "ours.tokens_per_s"),
        generation=_pick(t2v, "shape.video", "shape.steps", "ours.steady_s", "reference.steady_s", "speedup",
                         "ours.dit_tflops_per_s"))
    met = {}
    if t2v is not None:
        met["pipeline_t2v_s"] = t2v["ours"]["steady_s"] < TARGETS["pipeline_t2v_s"]
    if dit is not None and dit.get("fraction_of_measured_matmul") is not None:
        met["dit_fraction_of_matmul"] = dit["fraction_of_measured_matmul"] >= TARGETS["dit_fraction_of_matmul"]
    if gen is not None:
        met["vlm_generate_s"] = gen["ours"]["steady_s"] < TARGETS["vlm_generate_s"]
    s["targets"] = dict(TARGETS, met=met)
    return s


def run(output: str, reduced: bool = False, progress=print) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the accelerator
    import jax

    from vans_jax.apps import bench
    from vans_jax.apps.bench import common, resources

    cfg = check_config(reduced)
    threads = resources.prepare(cfg)       # the bench's equal threads, set before JAX's client and torch start
    ctx = common.BenchContext(cfg, threads["threads"])
    threads = resources.finish(threads, ctx.torch, ctx.torch_threads_how, jax.default_backend())
    started = time.perf_counter()
    result = dict(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), reduced=reduced,
        device=ctx.device, device_kind=ctx.device_kind, backend=jax.default_backend(), dtype=ctx.dtype,
        versions=bench._versions(), threads=threads,
        reference=dict(available=ctx.torch is not None, reason=ctx.reference_reason,
                       device=ctx.torch_description() if ctx.torch is not None else None),
        settings=dict(sections=list(SECTIONS), repeats=ctx.repeats, reference_repeats=ctx.reference_repeats,
                      dit_train_step=False, vans_generation=False,
                      umt5_layers=int(cfg.wan.text_encoder.num_layers)),
        section_seconds={}, errors={}, figures=[])

    def write():
        result["total_seconds"] = time.perf_counter() - started
        result["summary"] = summary(result)
        os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
        with open(output, "w") as f:
            json.dump(result, f, indent=2, default=bench._json_default)

    try:
        for name in SECTIONS:
            t0 = time.perf_counter()
            if progress:
                progress(f"gpu-check: {name} ... ({t0 - started:.0f} s in)")
            try:
                result["figures"].extend(common.SECTIONS[name](ctx))
            except Exception as e:    # one failing part must not cost the others' figures
                result["errors"][name] = f"{type(e).__name__}: {e}"
                if progress:
                    progress(f"gpu-check: {name} failed: {type(e).__name__}: {e}")
            result["section_seconds"][name] = time.perf_counter() - t0
            if ctx.torch is not None and ctx.torch_device.startswith("cuda"):
                ctx.torch.cuda.empty_cache()
            write()
    finally:
        ctx.close()
    return result


def missing_packages() -> list[str]:
    import importlib.util
    return [m for m in NEEDS if importlib.util.find_spec(m) is None]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="the JSON to write")
    p.add_argument("--reduced", action="store_true", help="tiny models on any backend (CPU: < 1 minute)")
    args = p.parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"gpu-check: missing Python packages {missing}: carry them as wheels in .whl/ "
              f"(launch/gpu_check.sh --fetch-wheels, see launch/README.md)", file=sys.stderr)
        return 2
    result = run(args.output, args.reduced)
    print(json.dumps(result["summary"], indent=2, default=str))
    print(f"gpu-check: wrote {args.output} ({result['total_seconds']:.0f} s)")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
