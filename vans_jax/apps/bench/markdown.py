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
        parts.append(", ".join(f"{k[:-2]} {_fmt(v)} s" for k, v in o["phases_s"].items())
                     + f" (spread {_fmt(o['min_s'])}-{_fmt(o['max_s'])} s)")
    return "; ".join(parts)


def markdown_table(result: dict) -> str:
    lines = [f"# vans-jax bench ({result['created']})", "",
             f"Ours: {result['device']}, {result['dtype']}. Reference: "
             + (result["reference"]["device"] or f"none ({result['reference']['reason']})") + ". "
             f"Steady = median of {result['repeats']} (reference {result['reference_repeats']}) runs; warm-up = first "
             f"call incl. compilation. Speedup = reference / ours. Random weights.", "",
             "| figure | shape | dtype | ours warm-up s | ours steady s | reference steady s | speedup | rates |",
             "|---|---|---|---|---|---|---|---|"]
    for f in result["figures"]:
        ref = f["reference"]
        lines.append(f"| {f['name']} | {_shape_text(f['shape'])} | {f['dtype']} | {_fmt(f['ours']['warmup_s'])} | "
                     f"{_fmt(f['ours']['steady_s'])} | {_fmt(ref['steady_s']) if ref else '-'} | "
                     f"{_fmt(f['speedup'])} | {_rate_text(f)} |")
    absent = sorted({f["reference_reason"] for f in result["figures"] if f["reference_reason"]})
    if absent:
        lines += [""] + [f"- no reference: {r}" for r in absent]
    return "\n".join(lines) + "\n"
