"""Training media for TensorBoard: what a person looks at besides the reward curve.

Every ``train.log_media_every`` steps (SFT-VDM: ``train.sft_vdm.log_media_every`` when set; 0: never;
the step itself decides, ``due``):

* Joint-GRPO (``grpo_media``, from ``JointGRPO.step``): for the step's first prompt, one image
  ``media/rollouts`` with a row per clip - the input (the reference frames the VDM sees), the
  ground-truth next event, and the G rollout videos - each row a strip of up to ``MAX_FRAMES``
  frames spread over the clip and labelled (rollout k, its total reward); the text
  ``media/rollouts_table`` (the question, the ground-truth caption, then per rollout its caption,
  each reward term, the total and the advantage); ``media/completions`` (the first prompt's
  completions as written, stage 1 / all-in-one); histograms ``media/reward/<term>``,
  ``media/reward/total`` and ``media/advantage`` over every rollout of the step.
* SFT-VDM (``SFTVDMMedia``, from ``SFTVDM.step``): the DiT being trained renders a fixed set of
  captions (those of the first ``media_samples`` examples of the first media step, kept for the run,
  with their reference clips), ODE sampler, the training's render settings, fixed noise; an image
  ``media/sft_vdm_renders`` (per caption: ground truth, then the render) and the captions as text.

The collected media travel in the step's metrics under ``"media"`` (host arrays and strings) and
``write_media`` writes them through the run's clu metric writer (``train.metrics``: images,
texts, histograms), so nothing here touches the device on other steps.

Cost: off, one integer test per step. On, for Joint-GRPO:
no device work (the frames are already on the host for the rewards), a PNG of at most
(G + 2) rows x 8 frames of at most ``THUMB`` (96) pixels high, a few KB of text and three
histograms per media step. For SFT-VDM: one extra generation of ``media_samples`` (default 2)
videos with ``train_sampling_steps`` steps per media step (its first one compiles the sampler).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["due", "grpo_media", "strip_grid", "write_media", "SFTVDMMedia", "MAX_FRAMES", "THUMB"]

MAX_FRAMES = 8        # frames per row
THUMB = 96            # thumbnail height (pixels)
MAX_ROLLOUTS = 8      # rollout rows shown per media step
LABEL_W = 120


def due(every, step: int) -> bool:
    """Whether ``step`` logs media (``every`` <= 0 or None: never)."""
    every = int(every or 0)
    return every > 0 and int(step) % every == 0


def _thumbs(frames: np.ndarray, n: int, height: int) -> np.ndarray:
    """``n`` frames spread over the clip, resized to ``height`` (nearest for tiny clips): (n, height, w, 3)."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    idx = np.linspace(0, len(frames) - 1, min(n, len(frames))).round().astype(int)
    h, w = frames.shape[1:3]
    nw = max(1, int(round(w * height / h)))
    resample = Image.Resampling.NEAREST if h < height else Image.Resampling.BILINEAR
    return np.stack([np.asarray(Image.fromarray(np.asarray(frames[i], np.uint8)).resize((nw, height), resample))
                     for i in idx])


def strip_grid(rows: Sequence[tuple[str, np.ndarray]], *, frames: int = MAX_FRAMES, height: int = THUMB) -> np.ndarray:
    """One uint8 image (H, W, 3): a labelled row of ``frames`` thumbnails per ``(label, clip)``."""
    from PIL import Image, ImageDraw

    strips = [(label, _thumbs(clip, frames, height)) for label, clip in rows]
    width = LABEL_W + max(s.shape[0] * (s.shape[2] + 2) for _, s in strips)
    img = Image.new("RGB", (width, len(strips) * (height + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for r, (label, s) in enumerate(strips):
        y = r * (height + 4)
        for j, line in enumerate(str(label).split("\n")[:4]):
            draw.text((4, y + 4 + 12 * j), line[:19], fill=(0, 0, 0))
        for j, f in enumerate(s):
            img.paste(Image.fromarray(f), (LABEL_W + j * (f.shape[1] + 2), y + 2))
    return np.asarray(img)


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def grpo_media(examples: Sequence[dict], captions: Sequence[str], frames, rewards: Mapping[str, Any], adv,
               group_size: int, texts: Sequence[str] | None = None) -> dict:
    """The media of one Joint-GRPO step (module docstring): host values only. ``captions``,
    ``frames`` (None without videos), each reward term, ``adv`` and ``texts`` cover every rollout
    (prompt-major, ``group_size`` per prompt); the first prompt's are shown."""
    g = int(group_size)
    shown = min(g, MAX_ROLLOUTS)
    terms = {k: np.asarray(v, np.float64).reshape(-1) for k, v in rewards.items()}
    total = sum(terms.values()) if terms else np.zeros(len(captions))
    adv = np.asarray(adv, np.float64).reshape(-1)
    e = examples[0]
    out: dict[str, Any] = {"histograms": {f"media/reward/{k}": v for k, v in terms.items()}}
    out["histograms"]["media/reward/total"] = np.asarray(total)
    out["histograms"]["media/advantage"] = adv
    head = (f"**question:** {_md(e.get('question', ''))}  \n**ground truth:** {_md(e.get('caption', ''))}\n\n"
            f"| rollout | caption | " + " | ".join(terms) + " | total | advantage |\n|---|---|"
            + "---|" * (len(terms) + 2) + "\n")
    body = "".join(f"| {k} | {_md(captions[k])} | " + " | ".join(f"{terms[t][k]:.4f}" for t in terms)
                   + f" | {total[k]:.4f} | {adv[k]:+.4f} |\n" for k in range(shown))
    out["texts"] = {"media/rollouts_table": head + body}
    if texts is not None:
        out["texts"]["media/completions"] = "\n\n".join(f"**{k}:** {_md(texts[k])}" for k in range(shown))
    if frames is not None:
        if not isinstance(frames, np.ndarray):      # a device array: to the host (a media step only)
            from ..rl.rollouts import host_values
            frames = host_values(frames)
        rows = []
        if "reference" in e:
            rows.append(("input", np.asarray(e["reference"])))
        if "target" in e:
            rows.append(("ground truth", np.asarray(e["target"])))
        rows += [(f"rollout {k}\nreward {total[k]:.3f}\nadv {adv[k]:+.3f}", frames[k]) for k in range(shown)]
        out["images"] = {"media/rollouts": strip_grid(rows)[None]}
    return out


def write_media(writer, step: int, media: Mapping[str, Any]) -> None:
    """Writes what ``grpo_media`` / ``SFTVDMMedia`` collected through a clu ``MetricWriter``."""
    if media.get("images"):
        writer.write_images(step, {k: np.asarray(v) for k, v in media["images"].items()})
    if media.get("texts"):
        writer.write_texts(step, dict(media["texts"]))
    if media.get("histograms"):
        writer.write_histograms(step, {k: np.asarray(v) for k, v in media["histograms"].items()})


class SFTVDMMedia:
    """Renders of a fixed set of captions by the DiT being trained (module docstring)."""

    def __init__(self, num_samples: int = 2, seed: int = 0):
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.fixed: list[dict] | None = None

    def __call__(self, vdm, dit, render, examples: Sequence[dict], mesh) -> dict:
        """``vdm``: the frozen VAE / text encoder (``sampling.wan.WanModels``); ``dit``: the DiT
        module as trained now; ``render``: ``rl.rollouts.RenderSettings``."""
        import dataclasses

        import jax

        from ..rl import rollouts as ro

        if self.fixed is None:           # the first media step's examples, kept for the run
            self.fixed = [{k: e[k] for k in ("caption", "reference", "target") if k in e}
                          for e in list(examples)[:self.num_samples]]
        fixed = self.fixed
        models = dataclasses.replace(vdm, dit=dit)
        env = ro.RolloutEnv(render, mesh=mesh, vdm=models)
        caps = [e["caption"] for e in fixed]
        ref = ro.reference_latents(models, fixed, render, to_device=env.whole) if render.n_ref else None
        frames = ro.host_values(env.render_ode(caps, ref, jax.random.key(self.seed)))
        rows = []
        for i, e in enumerate(fixed):
            if "target" in e:
                rows.append((f"{i}: ground truth", np.asarray(e["target"])))
            rows.append((f"{i}: render", frames[i]))
        return {"images": {"media/sft_vdm_renders": strip_grid(rows)[None]},
                "texts": {"media/sft_vdm_captions": "\n\n".join(f"**{i}:** {_md(c)}" for i, c in enumerate(caps))}}
