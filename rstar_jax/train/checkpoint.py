"""Orbax checkpoints of the whole train state, restored onto the current mesh, refused on a mismatch.

A step directory holds `state` (params, optimizer state, step: sharded arrays) and `meta` (JSON: the
data-iterator position and seed, and the run config with its digest). Orbax writes a step into
`<step>.orbax-checkpoint-tmp-*` and renames it when complete, and marks it with `commit_success.txt`;
a step directory without that marker (a copy cut short, a non-atomic filesystem) is never taken as a
checkpoint: it is skipped with a warning, and resuming continues from the newest complete step.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp

from rstar_jax.errors import InputError

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"


class CheckpointMismatchError(InputError):
    """A checkpoint written by a run with a different config (names the differing fields)."""


class CorruptCheckpointError(InputError):
    """A complete-looking checkpoint step that cannot be read."""


def config_digest(run_config: dict) -> str:
    return hashlib.sha256(json.dumps(run_config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


class Checkpointer:
    """Saves every `every` steps (and when asked), keeps the newest `keep`, restores the newest complete."""

    def __init__(self, directory: str, run_config: dict, every: int = 0, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.run_config = json.loads(json.dumps(run_config, default=str))  # as it will read back
        self.digest = config_digest(self.run_config)
        self.every = every
        # cleanup_tmp_directories: a save cut short by a kill leaves a whole train state in orbax's temp dir.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def complete_steps(self) -> list[int]:
        """Steps whose directory orbax finalized and marked committed, oldest first.

        An unmarked step directory is renamed to `<step>.incomplete-0` (kept for inspection, the newest one
        only: each holds a whole train state): it is never restored, and it must not block a later save of
        the same step.
        """
        steps = []
        for step in self.manager.all_steps():
            path = os.path.join(self.directory, str(step))
            if os.path.exists(os.path.join(path, COMMIT_MARKER)):
                steps.append(step)
                continue
            log.warning("checkpoint %s has no %s: incomplete, not restored (moved aside)", path, COMMIT_MARKER)
            if jax.process_index() == 0:
                for old in glob.glob(os.path.join(self.directory, "*.incomplete-*")):
                    shutil.rmtree(old, ignore_errors=True)
                os.rename(path, f"{path}.incomplete-0")
        if len(steps) != len(self.manager.all_steps()):
            self.manager.reload()
        return sorted(steps)

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, data_state: dict) -> None:
        meta = {"step": step, "data": data_state, "digest": self.digest, "run_config": self.run_config}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """(step, state on `abstract_state`'s shardings, data state) of the newest complete step that reads back
        (an unreadable one is skipped for the one before, with a warning), or None when there is none."""
        steps = self.complete_steps()
        first_error = None
        for step in reversed(steps):
            try:
                return (step, *self._restore(step, abstract_state))
            except CorruptCheckpointError as e:
                log.warning("%s; trying the step before", e)
                first_error = first_error or e
        if first_error is not None:
            raise first_error
        return None

    def _restore(self, step: int, abstract_state) -> tuple[object, dict]:
        path = os.path.join(self.directory, str(step))
        meta = self._checked_meta(step)
        try:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            restored = self.manager.restore(step, args=args)
        except Exception as e:
            raise CorruptCheckpointError(f"checkpoint {path}: cannot restore the train state "
                                         f"({type(e).__name__}: {e})") from e
        log.info("restored checkpoint %s", path)
        return restored["state"], meta["data"]

    def check_compatible(self) -> int | None:
        """The newest complete step, after checking it was written with this run's config (None: no step)."""
        steps = self.complete_steps()
        if steps:
            self._checked_meta(steps[-1])
        return steps[-1] if steps else None

    def _checked_meta(self, step: int) -> dict:
        path = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises assorted types for unreadable files
            raise CorruptCheckpointError(f"checkpoint {path}: cannot read its metadata "
                                         f"({type(e).__name__}: {e})") from e
        if meta.get("digest") != self.digest:
            diffs = _diff(meta.get("run_config", {}), self.run_config)
            raise CheckpointMismatchError(
                f"checkpoint {path} was written by a run with a different config:\n  - " + "\n  - ".join(
                    diffs or ["(config digest differs)"]) + "\nuse a new checkpoint directory, or restore the "
                "original settings to resume")
        return meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs carrying `shardings`: the restore target for orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
