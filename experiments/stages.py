"""A run directory of resumable stages: each stage is skipped once complete, and the flags are pinned.

A stage is complete when its `DONE.json` exists; it is written last (atomically), so a stage interrupted
at any point runs again on the next invocation and resumes from whatever its own outputs allow. The
flags of the first invocation are saved in the run directory; a later invocation with different values
for flags that shape the results is refused, naming each differing flag.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterable

DONE = "DONE.json"


class FlagConflictError(ValueError):
    pass


def write_json_atomic(path: str, value) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pin_flags(run_dir: str, values: dict, ignore: Iterable[str] = ()) -> None:
    """Save `values` (flag name -> value) in run_dir/flags.json, or check them against the saved ones."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "flags.json")
    values = json.loads(json.dumps(values, default=str))  # the form they take on disk
    if not os.path.exists(path):
        write_json_atomic(path, values)
        return
    with open(path) as f:
        saved = json.load(f)
    ignore = set(ignore)
    diffs = [f"--{k}: saved {saved.get(k)!r}, now {values.get(k)!r}" for k in sorted(set(saved) | set(values))
             if k not in ignore and saved.get(k) != values.get(k)]
    if diffs:
        raise FlagConflictError(f"{path}: this run directory was started with other settings; use a new "
                                f"--run_dir or the same flags:\n  " + "\n  ".join(diffs))


def is_done(stage_dir: str) -> bool:
    return os.path.exists(os.path.join(stage_dir, DONE))


def run_stage(name: str, stage_dir: str, work: Callable[[str], dict], log: Callable[[str], None] = print) -> dict:
    """Run `work(stage_dir)` unless the stage is complete; returns its summary (saved in DONE.json)."""
    done = os.path.join(stage_dir, DONE)
    if os.path.exists(done):
        with open(done) as f:
            summary = json.load(f)
        log(f"[{name}] complete, skipped ({stage_dir})")
        return summary
    os.makedirs(stage_dir, exist_ok=True)
    log(f"[{name}] running ({stage_dir})")
    start = time.perf_counter()
    summary = dict(work(stage_dir) or {})
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(done, summary)
    log(f"[{name}] done in {summary['seconds']}s")
    return summary
