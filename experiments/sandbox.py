"""Run files through the sandboxed executor, as the search would, and print one JSON result per line.

    python -m experiments.sandbox [--timeout_s=30] [--format=auto|python|steps] FILE...

A file is a Python program, or (``steps``; ``auto`` when it contains ``<code>`` or ``<end_of_step>``) the
concatenated step texts of a path in the rStar format, from which the program is assembled like the search does.
Each line: {"file", "program_chars", "stdout", "failed", "error_type", "error_message", "timed_out", "wall_s",
"observation"}.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags

from experiments.usage import run
from rstar_jax.errors import InputError
from rstar_jax.verify.program import CODE, STEP_END, assemble_program
from rstar_jax.verify.sandbox import Sandbox

_TIMEOUT_S = flags.DEFINE_float("timeout_s", 30.0, "wall-clock limit per program (the reference uses 30 s)")
flags.register_validator("timeout_s", lambda v: v > 0, "--timeout_s must be positive")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "sandbox workers; default one per core", lower_bound=1)
_FORMAT = flags.DEFINE_enum("format", "auto", ["auto", "python", "steps"],
                            "how to read each file: a Python program, or rStar step text to assemble")


def program_of(text: str, kind: str) -> str:
    if kind == "steps" or (kind == "auto" and (CODE in text or STEP_END in text)):
        return assemble_program([text])
    return text


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give at least one FILE to run")
    programs = []
    for path in paths:  # every file is read before any runs (a missing or unreadable one is an OSError)
        try:
            with open(path, encoding="utf-8") as f:
                programs.append(program_of(f.read(), _FORMAT.value))
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    with Sandbox(num_workers=_NUM_WORKERS.value, timeout_s=_TIMEOUT_S.value) as sandbox:
        results = sandbox.run(programs)
    for path, program, result in zip(paths, programs, results):
        line = {"file": path, "program_chars": len(program), **result.to_dict(), "observation": result.observation}
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    run(main)
