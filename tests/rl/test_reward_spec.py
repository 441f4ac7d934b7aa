"""train.grpo.rewards: built-in names with weights, user functions by module or file, and errors that
name the problem."""
import sys

import numpy as np
import pytest

from vans_jax.rl import rewards as R
from vans_jax.rl.stages import reward_config

USER = '''
import numpy as np

def redness(inputs):
    f = inputs.frames.astype(np.float32)
    return (f[..., 0] - f[..., 1:].mean(-1)).mean(axis=(1, 2, 3)) / 255.0

def caption_length(inputs):
    return [len(c.split()) for c in inputs.captions]

def wrong_shape(inputs):
    return np.zeros((len(inputs.captions), 2))
'''


@pytest.fixture()
def user_file(tmp_path):
    p = tmp_path / "my_rewards.py"
    p.write_text(USER)
    return str(p)


def _inputs(n=4, g=2):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (n, 3, 8, 8, 3), dtype=np.uint8)
    frames[0, ..., 0] = 255                                   # rollout 0 is the reddest
    return R.RewardInputs(frames=frames, gt_frames=frames, captions=["a b", "a", "a b c", "x"],
                          gt_captions=["a b"] * n, texts=None, group_size=g)


def test_builtin_names_and_weights():
    assert R.parse_rewards("") == {}
    assert R.parse_rewards("v2, c2=0.5") == {"v2": 1.0, "c2": 0.5}
    cfg = reward_config("grpo_stage2", (), "v2=2,world")
    assert cfg.active == {"v2": 2.0, "world": 1.0}
    assert reward_config("grpo_stage2").active == {"v2": 1.0, "c2": 1.0}      # empty: the paper's
    assert reward_config("grpo_stage2", ("c2",), "v2,c2").active == {"v2": 1.0}  # disabled_rewards still works


def test_user_functions_by_file_and_module(user_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = f"{user_file}:redness,my_rewards:caption_length=0.1"
    cfg = reward_config("grpo_stage2", (), spec)
    assert cfg.active == {f"{user_file}:redness": 1.0, "my_rewards:caption_length": 0.1}
    out = R.compute_rewards(cfg, reward_inputs=_inputs())
    red = out[f"{user_file}:redness"]
    assert red.shape == (4,) and red.dtype == np.float32 and int(np.argmax(red)) == 0
    np.testing.assert_array_equal(out["my_rewards:caption_length"], [2, 1, 3, 1])
    adv = np.asarray(R.stage_advantages(cfg, out, 2))
    assert adv.shape == (4,) and np.isfinite(adv).all()
    sys.modules.pop("my_rewards", None)


def test_errors_name_the_problem(user_file):
    with pytest.raises(KeyError, match="unknown reward 'v3'"):
        R.parse_rewards("v2,v3")
    with pytest.raises(FileNotFoundError, match="nope.py does not exist"):
        R.parse_rewards("nope.py:f")
    with pytest.raises(AttributeError, match="no function 'missing'"):
        R.parse_rewards(f"{user_file}:missing")
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_xyz'"):
        R.parse_rewards("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="listed twice"):
        R.parse_rewards("v2,v2=2")
    with pytest.raises(ValueError, match="weight 'x' is not a number"):
        R.parse_rewards("v2=x")
    cfg = reward_config("grpo_stage2", (), f"{user_file}:wrong_shape")
    with pytest.raises(ValueError, match=r"wrong_shape' returned shape \(4, 2\); expected \(4,\)"):
        R.compute_rewards(cfg, reward_inputs=_inputs())
    # a mode without videos cannot score them
    with pytest.raises(ValueError, match=r"grpo_vlm cannot compute reward\(s\) \['world'\].*frames"):
        reward_config("grpo_vlm", (), "t1,world")


def test_world_reward_is_the_exact_iou():
    from vans_jax.data import synthetic as S
    sq = lambda x: {"x": float(x), "y": 20.0, "r": 5.0, "shape": "square", "color": "red"}
    truth = S.render([[sq(20)]] * 2)
    shifted = S.render([[sq(25)]] * 2)
    out = R.compute_rewards(reward_config("grpo_stage2", (), "world"), frames=np.stack([truth, shifted]),
                            gt_frames=np.stack([truth, truth]))
    np.testing.assert_allclose(out["world"], [1.0, 1 / 3], rtol=1e-6)


def test_world_color_reward_is_the_exact_colour_accuracy():
    """``world_color``: per rollout, the fraction of the truth's (frame, object) groups drawn in the
    right colour; a render of another colour scores 0, a render that misses one of two objects in
    half its frames 0.75, and a truth with nothing to colour 0 for every rollout (constant in a group)."""
    from vans_jax.data import synthetic as S
    obj = lambda x, c: {"x": float(x), "y": 20.0, "r": 5.0, "shape": "square", "color": c}
    truth = S.render([[obj(20, "red"), obj(50, "blue")]] * 2)
    recoloured = S.render([[obj(20, "yellow"), obj(50, "green")]] * 2)
    half = S.render([[obj(20, "red"), obj(50, "blue")], [obj(20, "red")]])
    empty = S.render([[]] * 2)
    cfg = reward_config("grpo_stage2", (), "world,world_color=0.5")
    assert cfg.active == {"world": 1.0, "world_color": 0.5}
    out = R.compute_rewards(cfg, frames=np.stack([truth, recoloured, half, truth]),
                            gt_frames=np.stack([truth, truth, truth, empty]))
    np.testing.assert_allclose(out["world_color"], [1.0, 0.0, 0.75, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["world"][:2], [1.0, 1.0], rtol=1e-6)     # IoU alone cannot tell them apart
