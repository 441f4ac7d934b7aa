"""Mesh construction and logical-axis rules (single real CPU device; the 8-device mesh runs in
tests/models/test_qwen_sharding.py in a subprocess)."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vans_jax import parallel


class FakeMesh:
    def __init__(self, **shape):
        self.shape = shape


def test_make_mesh_shapes_and_errors():
    mesh = parallel.make_mesh({"data": -1})
    assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor") and mesh.devices.size == len(jax.devices())
    with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
        parallel.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="needs 4 devices"):
        parallel.make_mesh({"fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        parallel.make_mesh({"data": -1, "fsdp": -1})


def test_logical_rules():
    assert parallel.logical_to_spec(("embed", "mlp")) == P(("fsdp", "sequence"), "tensor")
    assert parallel.logical_to_spec(("layers", "embed", "heads")) == P(None, ("fsdp", "sequence"), "tensor")
    assert parallel.logical_to_spec(None) == P()
    mesh = FakeMesh(data=2, fsdp=4, tensor=2)
    # batch -> (data, fsdp) jointly when both divide
    assert parallel.logical_to_spec(("batch", "embed"), mesh=mesh, shape=(16, 8)) == P(("data", "fsdp"), None)
    # a dimension the mesh axis does not divide is replicated instead of failing
    assert parallel.logical_to_spec(("embed", "mlp"), mesh=mesh, shape=(6, 3)) == P(None, None)
    # size-1 mesh axes are dropped
    assert parallel.logical_to_spec(("embed", "mlp"), mesh=FakeMesh(data=8, fsdp=1, tensor=1),
                                    shape=(8, 8)) == P(None, None)


def test_shard_module_keeps_values():
    from flax import nnx
    from vans_jax.models.layers import Linear

    lin = Linear(8, 4, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    before = np.asarray(lin.kernel[...])
    sharded = parallel.shard_module(lin, parallel.make_mesh())
    np.testing.assert_array_equal(np.asarray(sharded.kernel[...]), before)
    assert parallel.variable_axes(sharded.kernel) == ("embed", "mlp")
