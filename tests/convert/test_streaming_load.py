"""Loading streams tensor by tensor: peak host memory stays near the largest tensor."""
import tracemalloc

import numpy as np

from vans_jax.convert.safetensors_io import Checkpoint
from vans_jax.models import qwen2_5_vl as qwen


def test_peak_host_memory_near_one_tensor(tmp_path):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=1024, vocab_size=1000,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6}),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=256,
                           fullatt_block_indexes=[1]), tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(tmp_path)
    ckpt = Checkpoint(str(tmp_path))
    sizes = [int(np.prod(ckpt.shape(k))) * 4 for k in ckpt.keys()]
    total, largest = sum(sizes), max(sizes)
    assert total > 12 * largest  # the check below means something
    qwen.from_pretrained(str(tmp_path))  # warm up (jit of the layer writer, imports)
    tracemalloc.start()
    model = qwen.from_pretrained(str(tmp_path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert model.layers.q_proj.kernel[...].shape == (6, 256, 256)
    print(f"peak traced host memory {peak} B, largest tensor {largest} B, checkpoint {total} B")
    assert peak < 4 * largest, (peak, largest, total)
