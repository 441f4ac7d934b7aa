"""Example user rewards for Joint-GRPO (``--config.train.grpo.rewards=...``).

Each function takes a ``vans_jax.rl.rewards.RewardInputs`` for the whole batch of N = prompts x G
rollouts and returns N floats (NumPy, a list or a JAX array). Rewards are normalized within each
group and summed with the others, weighted (the paper's rule), so only their ranking within a group
matters.

    vans-jax train --config configs/tiny_world.py --config.train.mode=grpo_vdm \
        --config.train.grpo.rewards="v2,examples/rewards.py:redness=0.5"
"""
import numpy as np


def redness(inputs):
    """How much redder than green/blue the rendered frames are, in [-1, 1] (a verifiable frame
    statistic: the learning check's video reward)."""
    f = inputs.frames.astype(np.float32)
    return (f[..., 0] - f[..., 1:].mean(-1)).mean(axis=(1, 2, 3)) / 255.0


def says_red(inputs):
    """1 when the rendered caption names the colour red (a verifiable text reward)."""
    return np.asarray([float("red" in c.lower().split()) for c in inputs.captions], np.float32)
