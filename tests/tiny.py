"""Every tiny random model the tests build, once: Qwen2.5-VL (transformers), Wan2.1 (diffusers
pipeline directories), CLIP, and the tiny synthetic world they train on. Each keeps the structural
features of the real model (GQA, windowed + full vision blocks, M-RoPE sections, causal 3D VAE,
per-layer relative position bias...). The session fixtures in the root ``conftest.py`` build the
directories once per test run."""
from __future__ import annotations

import os
import string

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- Qwen2.5-VL

QWEN_VOCAB = 400
QWEN_IDS = dict(vision_start=390, vision_end=391, image_pad=392, video_pad=393, eos=394, pad=395,
                vocab_size=QWEN_VOCAB)


def qwen_hf_config(ids: dict = QWEN_IDS, tie: bool = True):
    """GQA 4/2 heads, q/k/v bias, M-RoPE sections [2, 3, 3], 4 vision blocks (windowed + full)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=ids["vocab_size"], rms_norm_eps=1e-6,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                         eos_token_id=ids["eos"], pad_token_id=ids["pad"], bos_token_id=None,
                         tie_word_embeddings=tie),
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3], window_size=56, tokens_per_second=2),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=tie)


def _perturb(m, scale, pred=lambda n: True):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if pred(n):
                p.add_(torch.randn_like(p) * scale)
    return m.eval()


def qwen_hf_model(tie: bool = True, seed: int = 0, ids: dict = QWEN_IDS):
    """The transformers reference (eager attention) with random non-unit norms and biases, so every
    parameter matters in a parity test."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = qwen_hf_config(ids, tie)
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "ln_q" in name or name.endswith("norm1.weight") \
                    or name.endswith("norm2.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def build_vlm_dir(d: str, seed: int = 0, tie: bool = False):
    """A tiny random Qwen2.5-VL + tiny BPE tokenizer directory; returns (dir, torch model, token ids).
    Untied embeddings by default: a tied random model tends to repeat its last input token."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vans_jax.models.qwen2_5_vl.tokenizer import build_tiny_tokenizer
    from vans_jax.rl.format import TAGS

    os.makedirs(d, exist_ok=True)
    ids = build_tiny_tokenizer(d, added_tokens=TAGS)
    torch.manual_seed(seed)
    cfg = qwen_hf_config(ids, tie)
    cfg._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    _perturb(model, 0.1, lambda n: "norm" in n or "ln_q" in n)
    model.save_pretrained(d)
    return d, model, ids


def text_ids(rng, n):
    return list(rng.integers(0, 380, size=n))


def build_batch(padding="right", seconds=(1.0, 0.5), grids=((3, 4, 6), (2, 6, 4)), image_grid=(1, 4, 4),
                seed=0):
    """Three rows: text+video1+text; text+image+text+video2+text; text only. Returns a dict with
    input_ids / attention_mask / pixel values / grids / mm_token_type_ids (numpy)."""
    rng = np.random.default_rng(seed)
    vs, ve = QWEN_IDS["vision_start"], QWEN_IDS["vision_end"]
    v1 = [QWEN_IDS["video_pad"]] * (int(np.prod(grids[0])) // 4)
    v2 = [QWEN_IDS["video_pad"]] * (int(np.prod(grids[1])) // 4)
    im = [QWEN_IDS["image_pad"]] * (int(np.prod(image_grid)) // 4)
    rows = [
        text_ids(rng, 5) + [vs] + v1 + [ve] + text_ids(rng, 4),
        text_ids(rng, 3) + [vs] + im + [ve] + text_ids(rng, 2) + [vs] + v2 + [ve] + text_ids(rng, 3),
        text_ids(rng, 9),
    ]
    length = max(len(r) for r in rows)
    ids = np.full((3, length), QWEN_IDS["pad"], np.int64)
    mask = np.zeros((3, length), np.int64)
    for i, r in enumerate(rows):
        if padding == "right":
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        else:
            ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    types = np.zeros_like(ids)
    types[ids == QWEN_IDS["image_pad"]] = 1
    types[ids == QWEN_IDS["video_pad"]] = 2
    n_vid = sum(int(np.prod(g)) for g in grids)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                pixel_values_videos=rng.standard_normal((n_vid, 1176)).astype(np.float32),
                video_grid_thw=np.array(grids, np.int64), second_per_grid_ts=np.array(seconds, np.float32),
                pixel_values=rng.standard_normal((int(np.prod(image_grid)), 1176)).astype(np.float32),
                image_grid_thw=np.array([image_grid], np.int64))


def to_torch(batch, keys):
    return {k: torch.from_numpy(np.asarray(batch[k])) for k in keys}


# ----------------------------------------------------------------------------- Wan2.1 (diffusers directories)

Z = 16
# the pipeline / predict tests: 32x48x5 video
VANS_WAN = dict(
    dit=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=Z, out_channels=Z,
             text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64),
    vae=dict(base_dim=16, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
             temperal_downsample=[False, True, True], dropout=0.0,
             latents_mean=list(np.linspace(-0.8, 0.9, Z).round(3)), latents_std=list(np.linspace(0.6, 2.5, Z).round(3))),
    umt5=dict(vocab_size=300, d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=2,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0),
    pieces=("▁a", "▁cat", "▁dog", "▁the", "▁runs", "▁on", "▁red", "▁grass", "▁video", "▁of", "▁big"),
    perturb="all")
# the trainer tests: smaller still
TRAIN_WAN = dict(
    dit=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=Z, out_channels=Z,
             text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64),
    vae=dict(base_dim=8, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
             temperal_downsample=[False, True, True], dropout=0.0),
    umt5=dict(vocab_size=64, d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=1,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0),
    pieces=(), perturb="output")


# the Wan pipeline parity tests: the pipeline tests' sizes, VAE perturbed in its norm gains only
PARITY_WAN = dict(VANS_WAN, perturb="vae_gamma")


def build_wan_pipeline(seed: int = 0, spec: dict = VANS_WAN):
    """A tiny random diffusers ``WanPipeline`` (transformer, vae, text_encoder, tokenizer, UniPC
    scheduler with flow shift 3). ``spec["perturb"]``: "all" perturbs every DiT and VAE weight (a
    random encoder is then sensitive enough that different clips give clearly different reference
    latents), "output" only the DiT's output projection and modulation (so it predicts something
    non-zero), "vae_gamma" the DiT and the VAE's norm gains."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    mode = spec["perturb"]
    if mode == "output":
        dit = _perturb(diffusers.WanTransformer3DModel(**spec["dit"]), 0.05,
                       lambda n: "proj_out" in n or "scale_shift" in n)
        vae = diffusers.AutoencoderKLWan(**spec["vae"]).eval()
        te = transformers.UMT5EncoderModel(transformers.UMT5Config(**spec["umt5"])).eval()
    else:
        dit = _perturb(diffusers.WanTransformer3DModel(**spec["dit"]), 0.1)
        vae = (_perturb(diffusers.AutoencoderKLWan(**spec["vae"]), 0.05) if mode == "all" else
               _perturb(diffusers.AutoencoderKLWan(**spec["vae"]), 0.3, lambda n: n.endswith("gamma")))
        te = _perturb(transformers.UMT5EncoderModel(transformers.UMT5Config(**spec["umt5"])), 0.2,
                      lambda n: "layer_norm" in n)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    letters = -6.0 if spec["pieces"] else -3.0
    vocab += [(p, -3.0) for p in spec["pieces"]] + [(c, letters) for c in string.ascii_lowercase]
    tok = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    sch = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return diffusers.WanPipeline(tokenizer=tok, text_encoder=te, transformer=dit, vae=vae, scheduler=sch)


def build_vdm_dir(d: str, seed: int = 0, spec: dict = VANS_WAN) -> str:
    """``build_wan_pipeline`` saved as a diffusers directory."""
    build_wan_pipeline(seed, spec).save_pretrained(d, safe_serialization=True)
    return d


# ----------------------------------------------------------------------------- CLIP


def build_clip_dir(d: str, seed: int = 1) -> str:
    """A tiny random Hugging Face CLIP directory (32x32 images, the character-level tiny tokenizer)."""
    import transformers

    from vans_jax.models import clip

    clip.build_tiny_tokenizer(77).save_pretrained(d)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, **clip.TINY_TOKENIZER_IDS),
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    transformers.CLIPModel(cfg).eval().save_pretrained(d)
    return d


# ----------------------------------------------------------------------------- inputs and settings

from vans_jax.data.synthetic import moving_square  # noqa: E402,F401  (the test clips)

# pipeline / predict: every stage tiny (32x48x5 video, 2 sampler steps, 8 new tokens)
H, W, F, FPS = 32, 48, 5, 8.0
SETTINGS = dict(height=H, width=W, num_frames=F, fps=FPS, num_steps=2, cfg_scale=4.0, shift=3.0, n_ref=3,
                reference_frames=5, vlm_num_frames=4, vlm_sample_fps=2.0, video_min_pixels=56 * 56,
                video_max_pixels=112 * 112, max_new_tokens=8, temperature=0.0, top_p=1.0, negative_prompt="",
                prompt_bucket=32)


def build_tiny_world(root: str) -> dict:
    """The trainer tests' world: 32x32 clips of 5 of the 10 events (8 train, 6 rl rows) and tiny
    random VLM / VDM / CLIP directories in their real layouts."""
    from tools.tiny_world.vlm_init import init_vlm_dir
    from vans_jax.apps.configlib import load_config
    from vans_jax.data import synthetic

    wc = synthetic.WorldConfig(height=32, width=32, events=("bounce", "grow", "shrink", "move_pattern", "color_cycle"))
    data = os.path.join(root, "data")
    paths = {}
    for split, n in (("train", 8), ("rl", 6)):
        paths[split] = synthetic.generate_world(data, split, n, seed=synthetic.SPLIT_SEEDS[split], config=wc).csv_path
    vlm = os.path.join(root, "vlm")
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    init_vlm_dir(vlm, cfg.vlm.model.to_dict(), synthetic.world_texts(wc), vocab_size=400)
    vdm = build_vdm_dir(os.path.join(root, "vdm"), seed=0, spec=TRAIN_WAN)
    clip = build_clip_dir(os.path.join(root, "clip"))
    return dict(root=root, vlm=vlm, vdm=vdm, clip=clip, train_csv=paths["train"], rl_csv=paths["rl"],
                video_root=os.path.join(data, "videos"), overrides=world_overrides(wc))


def world_overrides(wc) -> dict:
    """The config settings (dotted keys) that make an experiment see ``wc``'s clips at their native
    size and rate (what ``PipelineConfig.from_experiment`` derives the data layout from)."""
    kw = wc.pipeline_kwargs()
    return {"vlm.num_frames": kw["num_vlm_frames"], "vlm.sample_fps": kw["vlm_sample_fps"],
            "video.num_frames": kw["target_frames"], "video.height": kw["target_height"],
            "video.width": kw["target_width"], "video.fps": kw["target_fps"],
            "data.pipeline.reference_frames": kw["reference_frames"]}


def make_config(world, workdir, mode, **over):
    """configs/tiny.py pointed at the tiny world, with small step counts; ``over``: dotted overrides."""
    from vans_jax.apps.configlib import load_config

    args = [f"--config.vlm.path={world['vlm']}", f"--config.vdm.path={world['vdm']}",
            f"--config.clip.path={world['clip']}", f"--config.data.train_csv={world['train_csv']}",
            f"--config.data.rl_csv={world['rl_csv']}", f"--config.data.video_root={world['video_root']}",
            f"--config.train.workdir={workdir}", f"--config.train.mode={mode}"]
    args += [f"--config.{k}={v}" for k, v in {**world["overrides"], **over}.items()]
    return load_config(os.path.join(ROOT, "configs", "tiny.py"), args)
