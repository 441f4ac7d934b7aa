"""Qwen2.5-VL on a fake 8-device CPU mesh: parameters sharded by logical axes, same logits."""
import textwrap
from tests.utils import run_on_8_devices  # noqa: E402


SCRIPT = textwrap.dedent("""
    import os, sys, json
    import numpy as np, jax
    from jax.sharding import NamedSharding
    sys.path.insert(0, os.getcwd())
    from tests import tiny
    from vans_jax import parallel
    from vans_jax.models import qwen2_5_vl as qwen
    assert len(jax.devices()) == 8, jax.devices()
    d = sys.argv[1]
    tiny.qwen_hf_model(tie=False, seed=3).save_pretrained(d)
    batch = tiny.build_batch("right")
    keys = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
            "pixel_values", "image_grid_thw")
    ref = np.asarray(qwen.from_pretrained(d)(*[batch[k] for k in keys]))
    results = {}
    for shape in ({"fsdp": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 8}):
        mesh = parallel.make_mesh(shape)
        model = qwen.from_pretrained(d, mesh=mesh)
        q = model.layers.q_proj.kernel[...]
        spec = q.sharding.spec
        got = np.asarray(model(*[batch[k] for k in keys]))
        err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        results[str(shape)] = dict(spec=str(spec), err=err, n_shards=len(q.addressable_shards),
                                   shard_shape=list(q.addressable_shards[0].data.shape))
    print("RESULT" + json.dumps(results))
""")


def test_sharded_logits_equal_unsharded(tmp_path):
    results = run_on_8_devices(SCRIPT, str(tmp_path / "ckpt"))
    # q_proj kernel (2 layers, 64, 64): embed -> fsdp, heads -> tensor
    assert results["{'fsdp': 2, 'tensor': 4}"]["shard_shape"] == [2, 32, 16]
    assert results["{'fsdp': 8}"]["shard_shape"] == [2, 8, 64]
    for shape, r in results.items():
        assert r["err"] < 1e-5, (shape, r)
