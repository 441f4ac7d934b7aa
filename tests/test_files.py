"""vans_jax._files: atomic writes with the umask's permissions, and the cleanup of a killed writer's
temporary files."""
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from vans_jax import _files


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        _files.write_json(tmp_path / "a.json", {"x": "café"})
        with _files.atomic_path(tmp_path / "b.bin") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"1")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")                         # what open() gives: the reference
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.bin") == _mode(plain) == 0o666 & ~umask
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8")) == {"x": "café"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "plain.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "final.json"
    _files.write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        _files.write_json(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["final.json"]


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
    # a writer that was killed: a temporary name of a process that has exited
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    mine = _files.temp_path(tmp_path / "answer.json")                 # this (live) process's
    dead = os.path.basename(mine).replace(f".tmp-{os.getpid()}-", f".tmp-{dead_pid}-")
    (tmp_path / dead).write_bytes(b"{")
    row = tmp_path / "3"
    row.mkdir()
    dead_in_row = row / dead.replace("answer.json", "answer.mp4")
    dead_in_row.write_bytes(b"")
    live_other = tmp_path / os.path.basename(mine).replace(f".tmp-{os.getpid()}-", f".tmp-{os.getppid()}-")
    live_other.write_bytes(b"")
    legacy_old, legacy_new = tmp_path / ".tmp-abc123.json", tmp_path / ".tmp-def456.json"   # mkstemp's names
    legacy_old.write_bytes(b"")
    legacy_new.write_bytes(b"")
    hour_ago = time.time() - 7200
    os.utime(legacy_old, (hour_ago, hour_ago))
    (tmp_path / "answer.json").write_text("{}")

    assert sorted(_files.remove_stale_tmp(tmp_path)) == sorted([str(tmp_path / dead), str(legacy_old)])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert dead not in left and legacy_old.name not in left
    assert {os.path.basename(mine), live_other.name, legacy_new.name, "answer.json", "3"} <= set(left)
    assert dead_in_row.exists()                                       # depth 0: the row folder untouched
    assert _files.remove_stale_tmp(tmp_path, depth=1) == [str(dead_in_row)]
    assert _files.remove_stale_tmp(tmp_path / "missing") == []
