"""A tiny synthetic world (32x32 clips, 5 of the 10 events) with tiny random VLM / VDM / CLIP directories in their real
layouts (Hugging Face, diffusers), shared by the trainer tests."""
import os
import string

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from vans_jax.apps.configlib import load_config  # noqa: E402
from vans_jax.data import synthetic  # noqa: E402
from vans_jax.models import clip  # noqa: E402
from tools.tiny_world.vlm_init import init_vlm_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
Z = 16
DIT = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=Z, out_channels=Z,
           text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
VAE = dict(base_dim=8, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True], dropout=0.0)
UMT5 = dict(vocab_size=64, d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=1,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)


def _vdm_dir(d):
    torch.manual_seed(0)
    dit = diffusers.WanTransformer3DModel(**DIT).eval()
    with torch.no_grad():
        for n, p in dit.named_parameters():
            if "proj_out" in n or "scale_shift" in n:
                p.add_(0.05 * torch.randn_like(p))
    vae = diffusers.AutoencoderKLWan(**VAE).eval()
    te = transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5)).eval()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase]
    tok = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    sch = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    diffusers.WanPipeline(tokenizer=tok, text_encoder=te, transformer=dit, vae=vae, scheduler=sch).save_pretrained(
        d, safe_serialization=True)


def _clip_dir(d):
    clip.build_tiny_tokenizer(77).save_pretrained(d)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, **clip.TINY_TOKENIZER_IDS),
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(1)
    transformers.CLIPModel(cfg).eval().save_pretrained(d)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_world"))
    wc = synthetic.WorldConfig(height=32, width=32, events=("bounce", "grow", "shrink", "move_pattern", "color_cycle"))
    data = os.path.join(root, "data")
    paths = {}
    for split, n in (("train", 8), ("rl", 6)):
        ws = synthetic.generate_world(data, split, n, seed=synthetic.SPLIT_SEEDS[split], config=wc)
        paths[split] = ws.csv_path
    vlm = os.path.join(root, "vlm")
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    init_vlm_dir(vlm, cfg.vlm.model.to_dict(), synthetic.world_texts(wc), vocab_size=400)
    vdm = os.path.join(root, "vdm")
    _vdm_dir(vdm)
    clip = os.path.join(root, "clip")
    _clip_dir(clip)
    return dict(root=root, vlm=vlm, vdm=vdm, clip=clip, train_csv=paths["train"], rl_csv=paths["rl"],
                video_root=os.path.join(data, "videos"), pipeline=wc.pipeline_kwargs())


def make_config(world, workdir, mode, **over):
    """configs/tiny.py pointed at the tiny world, with small step counts; ``over``: dotted overrides."""
    args = [f"--config.vlm.path={world['vlm']}", f"--config.vdm.path={world['vdm']}",
            f"--config.clip.path={world['clip']}", f"--config.data.train_csv={world['train_csv']}",
            f"--config.data.rl_csv={world['rl_csv']}", f"--config.data.video_root={world['video_root']}",
            f"--config.train.workdir={workdir}", f"--config.train.mode={mode}"]
    args += [f"--config.{k}={v}" for k, v in over.items()]
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.py"), args)
    cfg.data.pipeline.update(world["pipeline"])
    return cfg
