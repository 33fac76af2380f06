"""A run directory of resumable stages: each stage is skipped once complete, and the flags are pinned.

A stage is complete when its `DONE.json` exists; it is written last (atomically), so a stage interrupted
at any point runs again on the next invocation and resumes from whatever its own outputs allow. The
flags of the first invocation are saved in the run directory; a later invocation with different values
for flags that shape the results is refused, naming each differing flag. Compiled XLA programs are cached
in the run directory, so later stages, rounds and resumed runs skip most compilation.

Multi-process runs (one process per host, the run directory on a filesystem all of them see): every
process runs a stage's work (each its share: search problems by host, training over the global mesh),
or process 0 alone for `primary_only` stages (generating files, evaluating on its own devices); process 0
writes DONE.json, and every process waits for it before the next stage.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable, Iterable

from rstar_jax.errors import InputError

DONE = "DONE.json"


class FlagConflictError(InputError):
    pass


def _tmp_name(path: str) -> str:
    """A temporary name beside `path` that no other process writes, on any host (containers share pids)."""
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def write_jsonl_atomic(path: str, rows: Iterable[dict]) -> None:
    """One JSON object per line, written to a temporary file and renamed into place."""
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


def write_json_atomic(path: str, value) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pin_flags(run_dir: str, values: dict, ignore: Iterable[str] = (), unpinned: Iterable[str] = ()) -> None:
    """Save `values` (flag name -> value) in run_dir/flags.json, or check them against the saved ones: flags in
    `ignore` may differ; those in `unpinned` (whose stages have not run yet) may differ and are saved anew."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "flags.json")
    values = json.loads(json.dumps(values, default=str))  # the form they take on disk
    if not os.path.exists(path):
        write_json_atomic(path, values)
        return
    with open(path) as f:
        saved = json.load(f)
    ignore, unpinned = set(ignore), set(unpinned)
    diffs = [f"--{k}: saved {saved.get(k)!r}, now {values.get(k)!r}" for k in sorted(set(saved) | set(values))
             if k not in ignore | unpinned and saved.get(k) != values.get(k)]
    if diffs:
        raise FlagConflictError(f"{path}: this run directory was started with other settings; use a new "
                                f"--run_dir or the same flags:\n  " + "\n  ".join(diffs))
    changed = {k: values[k] for k in unpinned if k in values and saved.get(k) != values[k]}
    if changed:
        write_json_atomic(path, {**saved, **changed})


def use_compilation_cache(run_dir: str) -> None:
    """JAX's persistent compilation cache in run_dir/jax_cache (unless JAX_COMPILATION_CACHE_DIR chose
    one). Every program is cached: the small ones of a CPU run each take ~1 s to compile, and a round
    starts several processes that compile the same shapes."""
    import jax
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(run_dir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_done(stage_dir: str) -> dict | None:
    """A finished stage's summary (its DONE.json), or None if it has not finished."""
    path = os.path.join(stage_dir, DONE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_done(stage_dir: str) -> bool:
    return os.path.exists(os.path.join(stage_dir, DONE))


def is_primary() -> bool:
    import jax
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes wait here (nothing to do in a single-process run)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def agree(value: int) -> int:
    """Process 0's `value` on every process (so that all of them take the same branch)."""
    import jax
    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def run_stage(name: str, stage_dir: str, work: Callable[[str], dict], log: Callable[[str], None] = print, *,
              primary_only: bool = False, covers: Callable[[dict], bool] = lambda summary: True) -> dict:
    """Run `work(stage_dir)` unless the stage is complete; returns its summary (saved in DONE.json).
    `covers(summary)`: whether a finished stage's summary holds all that is asked now; when not, the stage
    runs again and its DONE.json (kept meanwhile, so a kill loses nothing) is replaced at the end."""
    done = os.path.join(stage_dir, DONE)
    # Process 0's view: a process that arrives late must not see DONE.json written meanwhile and skip.
    if agree(os.path.exists(done) and covers(load_done(stage_dir))):
        with open(done) as f:
            summary = json.load(f)
        log(f"[{name}] complete, skipped ({stage_dir})")
        return summary
    os.makedirs(stage_dir, exist_ok=True)
    if is_primary() or not primary_only:
        log(f"[{name}] running ({stage_dir})")
        start = time.perf_counter()
        summary = dict(work(stage_dir) or {})
        summary["seconds"] = round(time.perf_counter() - start, 1)
        if is_primary():
            write_json_atomic(done, summary)
            log(f"[{name}] done in {summary['seconds']}s")
    barrier(f"stage {name}")
    with open(done) as f:  # process 0's summary, the same on every process
        return json.load(f)
