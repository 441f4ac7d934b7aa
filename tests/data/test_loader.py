import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from vans_jax.data import synthetic as S
from vans_jax.data.csv_format import read_vnep_csv
from vans_jax.data.loader import (
    PipelineConfig,
    VNEPSource,
    make_dataset,
    skip_stats,
    validate_dataset,
)
from vans_jax.data.video_io import read_video
from vans_jax.models.qwen2_5_vl.processor import sample_frames_for_vlm

WCFG = S.WorldConfig()
PCFG = PipelineConfig(**WCFG.pipeline_kwargs())
N = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("pworld")
    ws = S.generate_world(d, "train", N)
    return ws


@pytest.fixture()
def broken(world, tmp_path):
    """A copy of the world with one corrupt input and one missing output."""
    root = tmp_path / "videos"
    shutil.copytree(world.video_root, root)
    rows = read_vnep_csv(world.csv_path)
    (root / rows[3].input_video_path).write_bytes(b"\x00\x00\x00\x18ftypmp42garbage" * 10)
    os.remove(root / rows[7].output_video_path)
    return world.csv_path, str(root), rows


def _indices(ds):
    return [int(i) for b in ds for i in b["index"]]


def test_source_element(world):
    src = VNEPSource(world.csv_path, world.video_root, PCFG)
    assert len(src) == N and src.csv_report.kept == N
    e = src[2]
    row = src.rows[2]
    assert e["index"] == 2 and (e["question"], e["think"], e["caption"], e["kind"]) == (
        row.question, row.think, row.caption, row.kind)
    frames, fps = read_video(os.path.join(world.video_root, row.input_video_path))
    vlm, vfps = sample_frames_for_vlm(frames, fps, num_frames=6, sample_fps=PCFG.vlm_sample_fps)
    assert np.array_equal(e["vlm_frames"], vlm) and e["vlm_fps"] == vfps == 2.0
    assert e["vlm_frames"].shape == (6, 64, 64, 3)
    assert e["reference"].shape == (9, 64, 64, 3) and e["reference_valid"] == 9
    assert np.array_equal(e["reference"], frames[-9:])  # last 9 frames at native rate/size
    assert e["target"].shape == (9, 64, 64, 3) and e["target_valid"] == 9
    tgt, _ = read_video(os.path.join(world.video_root, row.output_video_path))
    assert np.array_equal(e["target"], tgt)
    # default (VANS) geometry: 33 x 352 x 640, padded by repeating the last frame
    big = VNEPSource(world.csv_path, world.video_root)[0]
    assert big["target"].shape == (33, 352, 640, 3) and big["target_valid"] == 24  # 2.25 s at 11 fps
    assert big["reference"].shape == (33, 352, 640, 3)
    assert np.array_equal(big["target"][-1], big["target"][23])


def test_batches_determinism_and_epochs(world):
    src = VNEPSource(world.csv_path, world.video_root, PCFG)
    ds = make_dataset(src, batch_size=4, seed=1, shard_index=0, shard_count=1)
    batches = list(ds)
    assert len(batches) == 4
    b = batches[0]
    assert b["vlm_frames"].shape == (4, 6, 64, 64, 3) and b["vlm_frames"].dtype == np.uint8
    assert b["target"].shape == (4, 9, 64, 64, 3) and b["reference"].shape == (4, 9, 64, 64, 3)
    assert b["index"].dtype == np.int64 and b["vlm_fps"].dtype == np.float32
    assert isinstance(b["caption"], list) and len(b["caption"]) == 4
    order = _indices(batches)
    assert sorted(order) == list(range(N)) and order != list(range(N))
    # order-only checks: skip the target decode to keep the test fast
    src = VNEPSource(world.csv_path, world.video_root, dataclasses.replace(PCFG, load_target=False))
    assert _indices(make_dataset(src, batch_size=4, seed=1, shard_index=0, shard_count=1)) == order
    assert _indices(make_dataset(src, batch_size=4, seed=2, shard_index=0, shard_count=1)) != order
    # two epochs: each a permutation, reshuffled
    two = _indices(make_dataset(src, batch_size=4, seed=1, num_epochs=2, shard_index=0, shard_count=1))
    assert two[:N] == order and sorted(two[N:]) == list(range(N)) and two[N:] != order
    # no shuffle, remainder handling
    plain = list(make_dataset(src, batch_size=5, shuffle=False, shard_index=0, shard_count=1))
    assert _indices(plain) == list(range(N)) and len(plain[-1]["index"]) == 1
    assert len(list(make_dataset(src, batch_size=5, drop_remainder=True, shard_index=0, shard_count=1))) == 3
    # default sharding = jax process (single process here)
    assert sorted(_indices(make_dataset(src, batch_size=4, seed=1))) == list(range(N))


def test_resume_from_state(world):
    src = VNEPSource(world.csv_path, world.video_root, PCFG)
    ds = make_dataset(src, batch_size=2, seed=3, num_epochs=None, shard_index=0, shard_count=1)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expect = [next(it) for _ in range(2)]
    it2 = iter(make_dataset(src, batch_size=2, seed=3, num_epochs=None, shard_index=0, shard_count=1))
    it2.set_state(state)
    got = [next(it2) for _ in range(2)]
    for a, b in zip(expect, got):
        assert list(a["index"]) == list(b["index"]) and a["caption"] == b["caption"]
        assert np.array_equal(a["target"], b["target"]) and np.array_equal(a["vlm_frames"], b["vlm_frames"])
    assert skip_stats(it2)["yielded"] == 10


def test_sharding_two_hosts(world):
    src = VNEPSource(world.csv_path, world.video_root, dataclasses.replace(PCFG, load_target=False))
    shards = [_indices(make_dataset(src, batch_size=3, seed=0, shard_index=k, shard_count=2)) for k in range(2)]
    assert len(shards[0]) == len(shards[1]) == N // 2
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(N))
    # uneven: 16 rows over 3 hosts -> 5 each, one row dropped (same step count everywhere)
    s3 = [_indices(make_dataset(src, batch_size=2, seed=0, shard_index=k, shard_count=3)) for k in range(3)]
    assert [len(s) for s in s3] == [5, 5, 5] and len(set().union(*map(set, s3))) == 15
    # grain ShardOptions, keeping the remainder: 6 + 5 + 5
    import grain

    keep = [_indices(make_dataset(src, batch_size=2, seed=0, shard_options=grain.sharding.ShardOptions(k, 3, False)))
            for k in range(3)]
    assert [len(s) for s in keep] == [6, 5, 5] and set().union(*map(set, keep)) == set(range(N))
    with pytest.raises(ValueError):
        make_dataset(src, batch_size=2, shard_index=0)


def test_bad_samples_are_skipped_and_counted(broken):
    csv_path, root, rows = broken
    src = VNEPSource(csv_path, root, PCFG)
    bad = src[3]
    assert bad["error"] == "input_corrupt" and "0.mp4" in bad["detail"]
    assert src[7]["error"] == "output_missing"
    ds = make_dataset(src, batch_size=4, seed=0, shard_index=0, shard_count=1)
    it = iter(ds)
    got = _indices(it)
    assert sorted(got) == sorted(set(range(N)) - {3, 7})
    st = skip_stats(it)
    assert st["skipped"] == {"input_corrupt": 1, "output_missing": 1} and st["num_skipped"] == 2
    assert st["seen"] == N and st["yielded"] == N - 2
    assert sorted(e[0] for e in st["examples"]) == [3, 7]
    # counters are part of the checkpoint
    it2 = iter(ds)
    it2.set_state(it.get_state())
    assert skip_stats(it2)["skipped"] == {"input_corrupt": 1, "output_missing": 1}


def test_validate_dataset(broken, world):
    csv_path, root, rows = broken
    os.remove(os.path.join(root, rows[10].input_video_path))
    rep = validate_dataset(csv_path, root, config=PCFG)
    assert rep.rows_checked == N and rep.rows_ok == N - 3 and not rep.ok
    assert dict(rep.errors) == {"input_corrupt": 1, "output_missing": 1, "input_missing": 1}
    assert rep.bad_indices == [3, 7, 10]
    s = rep.summary()
    assert "input_corrupt: 1" in s and "input_missing: 1" in s and "PROBLEMS FOUND" in s
    assert rows[10].input_video_path in s
    json.dumps(rep.to_dict())
    fast = validate_dataset(csv_path, root, config=PCFG, full_decode=False)
    assert fast.bad_indices == [3, 7, 10]
    good = validate_dataset(world.csv_path, world.video_root, config=PCFG)
    assert good.ok and good.rows_ok == N and "OK" in good.summary()
    # the default VANS geometry flags the short synthetic outputs as padded (warning, not error)
    warn = validate_dataset(world.csv_path, world.video_root, max_rows=3)
    assert warn.ok and warn.warnings["output_padded"] == 3 and warn.rows_checked == 3
    missing = validate_dataset(os.path.join(root, "nope.csv"), root)
    assert missing.fatal and not missing.ok and "FATAL" in missing.summary()
