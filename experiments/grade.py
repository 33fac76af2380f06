"""Grade answers against references, one verdict JSON per line: what the search's grader decided.

  python -m experiments.grade --pairs=pairs.jsonl [--timeout_s=5 --num_workers=2 --rel_tol=1e-4]

Each input line is `{"pred": ..., "ref": ...}`: pred is raw model text (the last `\\boxed{}` is
graded) or a bare answer; ref is a reference answer (bare, `$`-wrapped, a GSM8K `#### N` rationale, a
number) or a list of acceptable ones. Output: per line `{"line", "extracted", "equal", "reason",
"time_s", "timed_out"}`, then one `{"summary": {...}}` line. The grader's worker pool starts once.
A malformed file stops with an error that names the file and line, before anything is graded.
"""
from __future__ import annotations

import json
import sys
import time

from absl import flags

from experiments.usage import check_usage, run
from rstar_jax.errors import InputError
from rstar_jax.jsonl import json_objects
from rstar_jax.verify.answer_extract import reference_answers
from rstar_jax.verify.grader import Grader

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so tests can import this module next to other
    tools that define flags of the same name (absl refuses duplicate names in one process)."""
    flags.DEFINE_string("pairs", None, "JSONL file of {\"pred\": ..., \"ref\": ...} lines")
    flags.DEFINE_integer("num_workers", 2, "grader worker processes", lower_bound=1)
    flags.DEFINE_float("timeout_s", 5.0, "time bound of one comparison, seconds")
    flags.register_validator("timeout_s", lambda v: v > 0, "--timeout_s must be positive")
    flags.DEFINE_float("rel_tol", 1e-4, "relative tolerance for decimal numbers")
    flags.register_validator("rel_tol", lambda v: 0 <= v < 1, "--rel_tol must be in [0, 1)")  # the Grader's range


class PairsFileError(InputError):
    """A line of the pairs file that cannot be graded; the message names the file and line."""


def load_pairs(path: str) -> list[tuple[int, str, object]]:
    """(line number, pred, ref) for every non-blank line of a JSONL pairs file."""
    pairs = []
    for line_number, record in json_objects(path):
        where = f"{path}:{line_number}"
        if isinstance(record, str):
            raise PairsFileError(f"{where}: {record}")
        for field in ("pred", "ref"):
            if field not in record:
                raise PairsFileError(f"{where}: missing field {field!r}")
        if not isinstance(record["pred"], str):
            raise PairsFileError(f"{where}: field 'pred' must be a string, got {type(record['pred']).__name__}")
        try:
            reference_answers(record["ref"])
        except (TypeError, ValueError) as e:
            raise PairsFileError(f"{where}: field 'ref': {e}") from None
        pairs.append((line_number, record["pred"], record["ref"]))
    return pairs


def grade_pairs(pairs: list[tuple[int, str, object]], grader: Grader, out=sys.stdout) -> dict:
    """Grade (line number, pred, ref) pairs, write one verdict line each and the summary; return it."""
    started = time.monotonic()
    verdicts = grader.grade_batch([(pred, ref) for _, pred, ref in pairs])
    for (line_number, _, _), verdict in zip(pairs, verdicts):
        out.write(json.dumps({"line": line_number, **verdict.to_dict()}, ensure_ascii=False) + "\n")
    summary = {
        "pairs": len(verdicts),
        "equal": sum(v.equal for v in verdicts),
        "timed_out": sum(v.timed_out for v in verdicts),
        "no_answer": sum(v.extracted is None for v in verdicts),
        "accuracy": sum(v.equal for v in verdicts) / len(verdicts) if verdicts else 0.0,
        "wall_s": round(time.monotonic() - started, 3),
    }
    out.write(json.dumps({"summary": summary}) + "\n")
    return summary


def main(argv):
    check_usage(argv, "pairs")
    try:
        pairs = load_pairs(FLAGS.pairs)  # the whole file is checked before any worker starts
    except (PairsFileError, OSError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    with Grader(num_workers=FLAGS.num_workers, timeout_s=FLAGS.timeout_s, rel_tol=FLAGS.rel_tol) as grader:
        grade_pairs(pairs, grader)


if __name__ == "__main__":
    define_flags()
    run(main)
