"""PEFT LoRA adapters on Qwen2.5-VL: an adapter directory in PEFT's layout merged into our model
gives the logits of transformers' model with PEFT's merge (W += scale * B @ A) applied in torch;
our LoRA exported as a PEFT adapter and merged back reproduces the adapted model; bad adapters
give clear errors. With ``peft`` installed, also an adapter written by peft itself."""
import json
import os
import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from tests import tiny
from tests.utils import rel_err
from vans_jax.convert.peft_lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft_adapter, merge_peft_adapter,
                                        read_peft_adapter)
from vans_jax.convert.safetensors_io import CheckpointError, SafetensorsFile, save_file
from vans_jax.models import qwen2_5_vl as qwen
from vans_jax.models.lora import lora_state
from vans_jax.models.qwen2_5_vl.rope import get_rope_index

KEYS = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
        "pixel_values", "image_grid_thw")
# modules as PEFT names them on transformers 5 (model.language_model.* / model.visual.*); one in the
# older Hub layout, which PEFT wrote on transformers < 4.52
MODULES = ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.1.self_attn.v_proj",
           "model.language_model.layers.1.mlp.down_proj", "model.visual.blocks.0.attn.qkv", "model.layers.0.mlp.up_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("peft_base"))
    hf = tiny.qwen_hf_model(tie=False, seed=4)
    hf.save_pretrained(d)
    batch = tiny.build_batch("right")
    return d, hf, batch


def _module(model, name):
    if name.startswith("model.layers."):          # old layout -> this transformers' module name
        name = "model.language_model." + name[len("model."):]
    return dict(model.named_modules())[name]


def _write_adapter(d, tensors, **cfg):
    os.makedirs(d, exist_ok=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none",
              "target_modules": ["q_proj", "v_proj", "down_proj", "qkv", "up_proj"], "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}} | cfg
    with open(os.path.join(d, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f)
    save_file(tensors, os.path.join(d, ADAPTER_WEIGHTS))
    return d


def _random_adapter(hf, rank=4, seed=0):
    rng = np.random.default_rng(seed)
    tensors = {}
    for name in MODULES:
        lin = _module(hf, name)
        tensors[f"base_model.model.{name}.lora_A.weight"] = (0.2 * rng.standard_normal((rank, lin.in_features))).astype(np.float32)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (0.2 * rng.standard_normal((lin.out_features, rank))).astype(np.float32)
    return tensors


def hf_logits(model, batch, ours):
    pos, _ = get_rope_index(ours.config, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                            batch["video_grid_thw"], batch["second_per_grid_ts"])
    with torch.no_grad():
        out = model(**tiny.to_torch(batch, KEYS), position_ids=torch.from_numpy(pos))
    return out.logits.numpy()


def our_logits(model, batch):
    return np.asarray(model(*[batch[k] for k in KEYS]))


def test_peft_layout_adapter_matches_torch_merge(setup, tmp_path):
    d, hf, batch = setup
    tensors = _random_adapter(hf)
    # per-module alpha (PEFT's alpha_pattern, suffix match) and rsLoRA scaling
    adapter = _write_adapter(str(tmp_path / "adapter"), tensors, alpha_pattern={"down_proj": 16}, use_rslora=True)
    ref = tiny.qwen_hf_model(tie=False, seed=4)
    with torch.no_grad():
        for name in MODULES:
            alpha = 16 if name.endswith("down_proj") else 8
            a = torch.from_numpy(tensors[f"base_model.model.{name}.lora_A.weight"])
            b = torch.from_numpy(tensors[f"base_model.model.{name}.lora_B.weight"])
            _module(ref, name).weight.add_((alpha / np.sqrt(4)) * (b @ a))
    base = qwen.from_pretrained(d)
    before = our_logits(base, batch)
    merged = merge_peft_adapter(base, adapter)
    assert sorted(merged) == sorted(MODULES)
    got, want = our_logits(base, batch), hf_logits(ref, batch, base)
    valid = batch["attention_mask"].astype(bool)
    err = rel_err(got[valid], want[valid])
    print(f"\nPEFT adapter merge vs torch merge: max rel err {err:.2e}")
    assert err < 1e-4
    assert rel_err(before[valid], want[valid]) > 1e-2          # the adapter does change the model


def test_export_round_trip(setup, tmp_path):
    d, hf, batch = setup
    model = qwen.from_pretrained(d, lora=qwen.LoRAConfig(rank=4, alpha=16, dropout=0.05, include_vision=True))
    rng = np.random.default_rng(1)
    nnx.update(model, jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), lora_state(model)))
    adapted = our_logits(model, batch)
    out = export_peft_adapter(model, str(tmp_path / "exported"), base_model_name_or_path=d)
    cfg = json.load(open(os.path.join(out, ADAPTER_CONFIG)))
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["peft_type"]) == (4, 16.0, 0.05, "LORA")
    names = {k[len("base_model.model."):-len(".lora_A.weight")] for k in SafetensorsFile(os.path.join(out, ADAPTER_WEIGHTS)).keys()
             if k.endswith("lora_A.weight")}
    assert "model.language_model.layers.1.mlp.gate_proj" in names and "model.visual.blocks.3.mlp.gate_proj" in names
    assert len(names) == 2 * 7 + 4 * 3      # 2 text layers x 7; 4 vision blocks x gate/up/down (the default targets)
    # PEFT full-matches the string target against module names: exactly the adapted Linear layers
    targeted = {n for n, _ in hf.named_modules() if re.fullmatch(cfg["target_modules"], n)}
    assert targeted == names
    fresh = qwen.from_pretrained(d)
    merge_peft_adapter(fresh, out)
    valid = batch["attention_mask"].astype(bool)
    assert rel_err(our_logits(fresh, batch)[valid], adapted[valid]) < 1e-5
    assert rel_err(our_logits(qwen.from_pretrained(d), batch)[valid], adapted[valid]) > 1e-2


def test_bad_adapters(setup, tmp_path):
    d, hf, _ = setup
    model = qwen.from_pretrained(d)
    tensors = _random_adapter(hf)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_peft_adapter(str(tmp_path / "none"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_peft_adapter(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="DoRA"):
        read_peft_adapter(_write_adapter(str(tmp_path / "dora"), tensors, use_dora=True))
    with pytest.raises(ValueError, match="rank 4 but the config says r=8"):
        read_peft_adapter(_write_adapter(str(tmp_path / "rank"), tensors, r=8))
    extra = tensors | {"base_model.model.lm_head.modules_to_save.default.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match="modules_to_save"):
        read_peft_adapter(_write_adapter(str(tmp_path / "extra"), extra))
    half = {k: v for k, v in tensors.items() if "q_proj.lora_B" not in k}
    with pytest.raises(ValueError, match="q_proj has lora_A but not both"):
        read_peft_adapter(_write_adapter(str(tmp_path / "half"), half))
    norm = tensors | {"base_model.model.model.language_model.layers.0.input_layernorm.lora_A.weight": np.zeros((4, 64), np.float32),
                      "base_model.model.model.language_model.layers.0.input_layernorm.lora_B.weight": np.zeros((64, 4), np.float32)}
    before = np.asarray(model.layers.q_proj.kernel[...])
    with pytest.raises(CheckpointError, match="input_layernorm"):
        merge_peft_adapter(model, _write_adapter(str(tmp_path / "norm"), norm))
    np.testing.assert_array_equal(np.asarray(model.layers.q_proj.kernel[...]), before)   # nothing merged
    deep = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    with pytest.raises(CheckpointError, match="layer 7; the model has 2"):
        merge_peft_adapter(model, _write_adapter(str(tmp_path / "deep"), deep))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_peft_adapter(model, str(tmp_path / "x"))


def test_adapter_written_by_peft(setup, tmp_path):
    """Only where ``peft`` is installed: its own adapter file, merged here, equals its merge_and_unload."""
    peft = pytest.importorskip("peft")
    d, _, batch = setup
    model = peft.get_peft_model(tiny.qwen_hf_model(tie=False, seed=4),
                                peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.save_pretrained(str(tmp_path / "peft_adapter"))
    ref = model.merge_and_unload().eval()
    ours = qwen.from_pretrained(d)
    merge_peft_adapter(ours, str(tmp_path / "peft_adapter"))
    valid = batch["attention_mask"].astype(bool)
    assert rel_err(our_logits(ours, batch)[valid], hf_logits(ref, batch, ours)[valid]) < 1e-4
