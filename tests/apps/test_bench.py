"""`vans-jax bench` in a short form (configs/bench_cpu.py shrunk by overrides): the JSON
has every field with positive finite numbers (Joint-GRPO steps included), the markdown table lists
every figure; without the reference our models are built directly and the reference fields say why
they are null; the analytic DiT FLOP count agrees with XLA's own count."""
import json
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from vans_jax.apps import bench, cli, xla_env
from vans_jax.models.wan import WanConfig, WanTransformer3D

SHORT = [
    "--config.repeats=3", "--config.reference_repeats=1", "--config.matmul.size=128", "--config.matmul.repeats=2",
    "--config.vlm.max_new_tokens=32", "--config.vlm.num_return_sequences=2", "--config.vlm.num_frames=2",
    "--config.vlm.prompt_text_tokens=(6, 3)",
    "--config.wan.dit.num_layers=1", "--config.wan.dit.ffn_dim=128", "--config.wan.dit.num_attention_heads=2",
    "--config.wan.dit.attention_head_dim=32", "--config.wan.text_encoder.num_layers=1",
    "--config.wan.vae.base_dim=8", "--config.dit.height=32", "--config.dit.width=32", "--config.dit.target_frames=2",
    "--config.dit.text_len=8", "--config.pipeline.height=32", "--config.pipeline.width=32",
    "--config.pipeline.num_frames=5", "--config.pipeline.num_steps=2", "--config.pipeline.text_len=8",
    "--config.pipeline.n_ref=1", "--config.vae.height=32", "--config.vae.width=32", "--config.vae.num_frames=5",
    "--config.grpo.steps=2", "--config.grpo.recipe.video.height=32", "--config.grpo.recipe.video.width=32",
    "--config.grpo.recipe.video.num_frames=5", "--config.grpo.recipe.generation.max_new_tokens=8",
    "--config.grpo.recipe.train.grpo.train_sampling_steps=3",
    "--config.sections=('matmul', 'vlm', 'dit', 'pipeline', 'vae', 'grpo')",   # train, predict: test_bench_train.py
]
FIGURES = ["matmul", "vlm_prefill", "vlm_decode", "vlm_generate", "dit_forward", "dit_train_step", "pipeline_t2v",
           "pipeline_vans", "vae_encode", "vae_decode", "grpo_stage1_step", "grpo_stage2_step"]
NO_REFERENCE = {"pipeline_vans": "reference-frame", "grpo_stage1_step": "inference-only",
                "grpo_stage2_step": "inference-only"}
TOP = ["created", "device", "device_kind", "backend", "num_devices", "dtype", "repeats", "reference_repeats",
       "reference", "threads", "noise", "versions", "sections", "section_seconds", "total_seconds", "conventions",
       "figures", "config", "xla_default_flags", "environment"]
FIGURE_KEYS = ["name", "section", "what", "shape", "dtype", "device", "ours", "reference", "reference_reason",
               "speedup", "speedup_range", "verdict"]
TIMES = ["warmup_s", "steady_s", "min_s", "max_s", "times_s", "repeats", "device"]


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def run_bench(tmp_path, extra=()):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--config", "configs/bench_cpu.py", "--output", str(out), *SHORT, *extra]) == 0
    with open(out) as f:
        result = json.load(f)
    with open(tmp_path / "bench.md") as f:
        table = f.read()
    return result, table


@pytest.mark.slow
def test_bench_short_with_reference(tmp_path):
    pytest.importorskip("diffusers")
    result, table = run_bench(tmp_path)
    assert all(k in result for k in TOP), set(TOP) - set(result)
    assert result["reference"]["available"] and result["reference"]["reason"] is None
    assert [f["name"] for f in result["figures"]] == FIGURES
    for f in result["figures"]:
        assert all(k in f for k in FIGURE_KEYS), (f["name"], set(FIGURE_KEYS) - set(f))
        assert f["shape"] and f["dtype"] == "float32" and f["device"].startswith("cpu"), f["name"]
        assert all(k in f["ours"] for k in TIMES) and positive(f["ours"]["steady_s"]), f
        assert 0 < f["ours"]["min_s"] <= f["ours"]["steady_s"] <= f["ours"]["max_s"], f
        assert positive(f["ours"]["warmup_s"]), f
        if f["name"] in NO_REFERENCE:     # diffusers has no reference frames; VANS ships no training code
            assert f["reference"] is None and f["speedup"] is None and NO_REFERENCE[f["name"]] in f["reference_reason"]
            continue
        ref = f["reference"]
        assert all(k in ref for k in TIMES) and positive(ref["steady_s"]) and "torch" in ref["device"], f
        assert positive(f["speedup"]) and f["reference_reason"] is None, f
        assert f["verdict"] in ("tie", "faster", "slower") and f["speedup_range"][0] <= f["speedup"], f
        assert f"| {f['name']} |" in table
    figs = {f["name"]: f for f in result["figures"]}
    for name in ("vlm_decode", "vlm_generate"):
        assert positive(figs[name]["ours"]["tokens_per_s"]) and positive(figs[name]["reference"]["tokens_per_s"])
    assert figs["vlm_decode"]["shape"]["new_tokens"] == 32 and figs["vlm_decode"]["shape"]["num_return_sequences"] == 2
    for name in ("matmul", "dit_forward", "dit_train_step"):
        f = figs[name]
        assert positive(f["flops"]) and positive(f["ours"]["tflops_per_s"]) and positive(f["reference"]["tflops_per_s"])
        # a CPU has no entry in the peak table: the fraction is null (with the reason for the DiT)
        assert f["peak_bf16_tflops"] is None and f["fraction_of_peak"] is None
    assert figs["dit_train_step"]["flops"] == 3 * figs["dit_forward"]["flops"]
    assert "not in the table" in figs["dit_forward"]["fraction_of_peak_reason"]
    assert positive(figs["dit_forward"]["fraction_of_measured_matmul"])
    assert figs["dit_forward"]["shape"]["tokens"] == (2 + 2) * 2 * 2
    assert figs["dit_forward"]["shape"]["latent_frames"] == [2, 2]
    assert positive(figs["pipeline_t2v"]["dit_flops"]) and figs["pipeline_t2v"]["shape"]["dit_forwards"] == 4
    check_grpo(figs["grpo_stage1_step"], figs["grpo_stage2_step"])


def check_grpo(stage1, stage2):
    """Joint-GRPO step figures: times with their spread and the step's phase split, the stated batch,
    the models' sizes and dtypes, the last step's metrics."""
    for f, G in ((stage1, 2), (stage2, 2)):
        o, shape = f["ours"], f["shape"]
        assert o["repeats"] == 2 and len(o["times_s"]) == 2 and all(positive(t) for t in o["times_s"])
        assert o["min_s"] <= o["steady_s"] <= o["max_s"] and positive(o["warmup_s"])
        assert set(o["phases_s"]) == {"text_s", "video_s", "update_s"} and all(map(positive, o["phases_s"].values()))
        assert sum(o["phases_s"].values()) <= 1.05 * o["max_s"] and positive(o["frames_per_s"])
        assert shape["prompts"] == 1 and shape["group_size"] == G and shape["videos"] == G
        assert shape["video"] == [5, 32, 32] and shape["latent_frames"] == [2, 2] and shape["latent_hw"] == [4, 4]
        assert shape["sampler_steps"] == 3 and shape["cfg_scale"] == 4.5 and shape["text_len"] == 32
        assert positive(shape["prompt_tokens"]) and positive(shape["video_tokens"]) and shape["vlm_frames"] >= 1
        assert set(f["dtypes"]) == {"vlm", "dit", "text_encoder", "vae", "clip"}
        assert set(f["dtypes"].values()) == {"float32"} and f["dtype"] == "float32"
        assert all(positive(m["params"]) for m in f["models"].values()) and f["models"]["vlm"]["lora_rank"] == 8
        m = f["metrics"]
        assert m["skipped_rewards"] == 0.0 and m["time/step_s"] > 0 and "reward/total" in m
    assert stage1["shape"]["new_tokens"] == 8 and stage1["shape"]["sampler"] == "euler (ODE)"
    assert positive(stage1["ours"]["tokens_per_s"]) and 1 <= stage1["metrics"]["completion_tokens"] <= 8
    assert {"reward/format", "reward/t1", "reward/v1", "vlm/loss", "vlm/kl"} <= set(stage1["metrics"])
    assert stage2["shape"]["sampler"] == "sde" and stage2["shape"]["trained_timesteps"] == 2
    assert stage2["shape"]["anchor_new_tokens"] == 8 and stage2["shape"]["anchor_max_tries"] == 2
    assert {"reward/v2", "reward/c2", "dit/loss", "dit/kl", "anchor/resamples"} <= set(stage2["metrics"])


def test_bench_without_reference(tmp_path):
    result, table = run_bench(tmp_path, ["--config.reference=False", "--config.sections=('matmul', 'dit')"])
    assert result["reference"] == dict(enabled=False, available=False, device=None,
                                       reason="reference disabled in the config (reference=False)")
    assert [f["name"] for f in result["figures"]] == ["matmul", "dit_forward", "dit_train_step"]
    for f in result["figures"]:
        assert f["reference"] is None and f["speedup"] is None and "reference=False" in f["reference_reason"]
        assert positive(f["ours"]["steady_s"]) and positive(f["ours"]["tflops_per_s"])
    assert "no reference: reference disabled" in table
    # vans-jax's XLA defaults (apps.xla_env): each one is either in the XLA_FLAGS the run saw or skipped
    # with a reason
    xd = result["xla_default_flags"]
    assert set(xd) == {"applied", "skipped", "how"}
    for flag, _ in xla_env.DEFAULT_XLA_FLAGS:
        assert flag in (result["environment"]["XLA_FLAGS"] or "") or xd["skipped"].get(flag), xd
    assert positive(result["noise"]["ours"]) and result["noise"]["reference"] is None


def test_unknown_section_is_an_error(tmp_path, capsys):
    assert cli.main(["bench", "--config", "configs/bench_cpu.py", "--output", str(tmp_path / "x.json"),
                     "--config.sections=('dit', 'nope')"]) == 2
    assert "unknown bench section(s) ['nope']" in capsys.readouterr().err


def test_peak_table():
    assert bench.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert bench.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_bf16_tflops("TPU v5 lite") == 197.0 and bench.peak_bf16_tflops("TPU v5p") == 459.0
    assert bench.peak_bf16_tflops("TPU v6 lite") == 918.0 and bench.peak_bf16_tflops("TPU v4") == 275.0
    assert bench.peak_bf16_tflops("cpu") is None


def test_dit_flops_match_xla_and_spec():
    # the paper-size figure in SPEC: 13,200 tokens, about 64 TFLOP per forward
    full = WanConfig(dim=1536, num_layers=30, num_heads=12, ffn_dim=8960, text_dim=4096, freq_dim=256)
    assert 60e12 < bench.dit_forward_flops(full, 1, 15, 44, 80, 512, n_ref=6) < 70e12
    # one layer (XLA's cost analysis counts a scanned layer once): within 10% of the analytic count, which
    # leaves out elementwise work
    cfg = WanConfig(dim=128, num_heads=2, num_layers=1, ffn_dim=256, in_channels=16, out_channels=16, text_dim=64,
                    freq_dim=32)
    graphdef, state = nnx.split(WanTransformer3D(cfg, rngs=nnx.Rngs(0)))
    fn = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c, n_ref=2))
    args = (jax.ShapeDtypeStruct((2, 16, 5, 16, 16), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32),
            jax.ShapeDtypeStruct((2, 24, 64), jnp.float32))
    xla = fn.lower(state, *args).compile().cost_analysis()["flops"]
    ours = bench.dit_forward_flops(cfg, 2, 5, 16, 16, 24, n_ref=2)
    assert 0.9 < ours / xla <= 1.0, (ours, xla)


def test_vlm_decode_pair_is_remeasured_under_noise():
    """A burst of load that makes generate(1) slower than generate(N) re-measures the pair (at most
    PAIR_TRIES times) instead of failing the bench with a negative decode time."""
    from vans_jax.apps.bench.vlm import PAIR_TRIES, measure_pair

    times = {1: iter([[0.5], [0.1], [0.1]]), 8: iter([[0.2], [0.3], [0.3]])}      # noisy first pair
    calls = []

    def measure(n):
        calls.append(n)
        return {"times_s": next(times[n])}, f"out{n}"

    pre, (full, out) = measure_pair(measure, 8)
    assert calls == [1, 8, 1, 8] and out == "out8"
    assert pre["times_s"] == [0.1] and full["times_s"] == [0.3]
    assert pre["pair_attempts"] == full["pair_attempts"] == 2
    # always noisy: stops after PAIR_TRIES pairs and hands the last one on (decode then raises)
    calls.clear()
    pre, (full, _) = measure_pair(lambda n: (calls.append(n) or {"times_s": [1.0 if n == 1 else 0.5]}, None), 8)
    assert len(calls) == 2 * PAIR_TRIES and full["pair_attempts"] == PAIR_TRIES
