"""Atomic file writes that honour the umask, and the cleanup of what a killed writer left behind.

Every output file (``answer.json``, ``answer.mp4``, the strip, ``predict_summary.json``,
``final_metrics.json``, ...) is written under a temporary name in its own directory,
``.tmp-<pid>-<host>-<random>-<name>``, and renamed onto its final name once complete, so a reader
never sees half a file. The temporary file is created like ``open(path, "w")`` creates one (mode
0666 minus the umask; ``tempfile.mkstemp`` would give 0600), and the rename keeps that mode.

A writer killed mid-way leaves its temporary file; ``remove_stale_tmp`` (run at the start of the
next run) removes the ones whose writer is gone: this host's whose process no longer exists, and
any older than ``max_age_s`` (another host's, or a name of another form).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import time

TMP_PREFIX = ".tmp-"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_OURS = re.compile(r"\A\.tmp-(\d+)-([0-9a-f]{8})-[0-9a-f]+-")


def temp_path(path: str | os.PathLike) -> str:
    """A new empty file next to ``path`` (same directory, so a rename onto ``path`` is atomic),
    created with the permissions ``open(path, "w")`` would give; returns its name."""
    path = os.fspath(path)
    d, name = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(d, f"{TMP_PREFIX}{os.getpid()}-{_HOST}-{secrets.token_hex(4)}-{name}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary name (``temp_path``) to write ``path``'s content to; on a normal exit it is
    renamed onto ``path``, on an exception removed (``path`` is then untouched)."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, os.fspath(path))
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> str:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return os.fspath(path)


def write_json(path: str | os.PathLike, obj, **dump_kwargs) -> str:
    """``obj`` as JSON (``indent=2``, non-ASCII kept, unless ``dump_kwargs`` say otherwise) written
    atomically to ``path``."""
    kw = {"indent": 2, "ensure_ascii": False} | dump_kwargs
    return write_atomic(path, json.dumps(obj, **kw))


def _writer_gone(name: str, age_s: float, max_age_s: float) -> bool:
    m = _OURS.match(name)
    if m is None or m.group(2) != _HOST:
        return age_s > max_age_s
    pid = int(m.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:      # alive, another user's
        return False
    return age_s > max_age_s


def remove_stale_tmp(directory: str | os.PathLike, *, depth: int = 0, max_age_s: float = 3600.0) -> list[str]:
    """Removes the ``.tmp-*`` files in ``directory`` (and ``depth`` levels of subdirectories below it)
    whose writer is gone (see the module docstring); returns their paths. A missing directory is
    fine (nothing to clean)."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            if depth > 0:
                removed += remove_stale_tmp(e.path, depth=depth - 1, max_age_s=max_age_s)
        elif e.name.startswith(TMP_PREFIX):
            try:
                age = now - e.stat(follow_symlinks=False).st_mtime
                if _writer_gone(e.name, age, max_age_s):
                    os.remove(e.path)
                    removed.append(e.path)
            except FileNotFoundError:        # its writer renamed or removed it meanwhile
                continue
    return removed


__all__ = ["TMP_PREFIX", "temp_path", "atomic_path", "write_atomic", "write_json", "remove_stale_tmp"]
