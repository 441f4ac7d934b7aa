"""The bench result as a markdown table (written next to the JSON)."""
from __future__ import annotations

import os


def markdown_path(output: str) -> str:
    root, ext = os.path.splitext(output)
    return (root if ext == ".json" else output) + ".md"


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _shape_text(shape: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items() if k not in ("vocab",))


def _rate_text(fig: dict) -> str:
    o, r = fig["ours"], fig["reference"] or {}
    parts = []
    for key, unit in (("tokens_per_s", "tok/s"), ("tflops_per_s", "TFLOP/s"), ("dit_tflops_per_s", "DiT TFLOP/s"),
                      ("frames_per_s", "frames/s")):
        if key in o:
            parts.append(f"{_fmt(o[key])} {unit}" + (f" (ref {_fmt(r[key])})" if key in r else ""))
    if fig.get("fraction_of_peak") is not None:
        parts.append(f"{100 * fig['fraction_of_peak']:.1f}% of bf16 peak")
    if fig.get("fraction_of_measured_matmul") is not None:
        parts.append(f"{100 * fig['fraction_of_measured_matmul']:.0f}% of measured matmul")
    if "phases_s" in o:
        parts.append(", ".join(f"{k[:-2]} {_fmt(v)} s" for k, v in o["phases_s"].items()))
    return "; ".join(parts)


def _times_text(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{_fmt(stats['steady_s'])} [{_fmt(stats['min_s'])}-{_fmt(stats['max_s'])}]"


def _speedup_text(fig: dict) -> str:
    if fig["speedup"] is None:
        return "-"
    lo, hi = fig["speedup_range"]
    return f"{_fmt(fig['speedup'])} [{_fmt(lo)}-{_fmt(hi)}]"


def threads_text(result: dict) -> str:
    t = result.get("threads")
    if not t:
        return ""
    torch = t["torch"]
    side = (f"torch {torch['intra_op']} intra-op / {torch['inter_op']} inter-op threads" if torch else "no torch")
    return (f"Threads: XLA pool {t['xla']['intra_op']}, {side} ({t['cores_available']} cores available; "
            f"OMP_WAIT_POLICY={t['openmp']['wait_policy']}). ")


def noise_text(result: dict) -> str:
    n = result.get("noise") or {}
    if n.get("ours") is None:
        return ""
    ref = f", reference {100 * n['reference']:.0f}%" if n.get("reference") is not None else ""
    return f"Noise (matmul (max - min) / median): ours {100 * n['ours']:.0f}%{ref}. "


def markdown_table(result: dict) -> str:
    lines = [f"# vans-jax bench ({result['created']})", "",
             f"Ours: {result['device']}, {result['dtype']}. Reference: "
             + (result["reference"]["device"] or f"none ({result['reference']['reason']})") + ". "
             + threads_text(result) + noise_text(result)
             + f"Steady = median [min-max] of {result['repeats']} (reference {result['reference_repeats']}) runs; "
             f"warm-up = first call incl. compilation. Speedup = reference / ours [range]; tie = the [min, max] "
             f"intervals overlap. Random weights.", "",
             "| figure | shape | dtype | ours warm-up s | ours steady s | reference steady s | speedup | verdict "
             "| rates |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in result["figures"]:
        lines.append(f"| {f['name']} | {_shape_text(f['shape'])} | {f['dtype']} | {_fmt(f['ours']['warmup_s'])} | "
                     f"{_times_text(f['ours'])} | {_times_text(f['reference'])} | {_speedup_text(f)} | "
                     f"{f['verdict'] or '-'} | {_rate_text(f)} |")
    absent = sorted({f["reference_reason"] for f in result["figures"] if f["reference_reason"]})
    if absent:
        lines += [""] + [f"- no reference: {r}" for r in absent]
    return "\n".join(lines) + "\n"
