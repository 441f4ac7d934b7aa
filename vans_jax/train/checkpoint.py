"""Orbax checkpointing of a training run: the trained parts (train state: parameters, optimizer
moments, step, RNG, skip counter; plus a frozen reference copy where there is one), the data
iterator's state and a JSON record of the run, saved asynchronously and atomically, keep-N.
Restarting the same command restores the latest finished checkpoint and resumes exactly.

Several processes: all of them call ``save`` / ``restore`` (orbax synchronizes them); each writes
and reads its own shards of the global arrays, while the JSON items are written by process 0 and
read by all, so their content must be the same on every process (the trainer gathers every
host's data-iterator state first)."""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, every: int, keep: int = 3, use_async: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = int(every)
        opts = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                            enable_async_checkpointing=bool(use_async))
        self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                             item_names=("parts", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int, last: bool) -> bool:
        return last or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, parts: Any, data_state: dict, meta: dict, *, force: bool = False):
        self.manager.save(step, args=ocp.args.Composite(
            parts=ocp.args.StandardSave(parts), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
            force=force)

    def restore(self, step: int, parts_like: Any) -> tuple[Any, dict, dict]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, parts_like)
        out = self.manager.restore(step, args=ocp.args.Composite(
            parts=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return out["parts"], out["data"], out["meta"]

    def read_meta(self, step: int) -> dict:
        """The JSON record of the run saved with ``step`` (mode, step), read without the trained parts:
        what a restart checks before it loads any model."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
