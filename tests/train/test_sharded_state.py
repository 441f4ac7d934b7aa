"""The trainer's state on a fake 8-device mesh: Adam moments sharded exactly like the parameters
(fsdp), not replicated, so optimizer memory scales down with the mesh."""
import os
import subprocess
import sys

from tests.utils import xla_flags

SCRIPT = r'''
import jax, ml_collections
from flax import nnx
from vans_jax import parallel
from vans_jax.models.wan.dit import WanConfig, WanTransformer3D
from vans_jax.train.grpo import Part
mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
cfg = WanConfig(dim=64, num_layers=2, num_heads=2, ffn_dim=128, in_channels=4, out_channels=4, text_dim=8,
                freq_dim=16, text_len=4)
dit = parallel.shard_module(WanTransformer3D(cfg, rngs=nnx.Rngs(0)), mesh)
p = Part(dit, "full", ml_collections.ConfigDict(dict(lr=1e-3, grad_clip=1.0)), 0, mesh=mesh, reference=False)
adam = p.state.opt_state[1][0]
params = jax.tree.leaves(p.state.params)
sharded = 0
for moment in (adam.mu, adam.nu):
    for m, q in zip(jax.tree.leaves(moment), params):
        assert m.sharding.spec == q.sharding.spec, (m.sharding, q.sharding)
        sharded += "fsdp" in str(m.sharding.spec)
assert sharded > 0
print("OK", sharded)
'''


def test_adam_moments_are_sharded_like_parameters():
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")
