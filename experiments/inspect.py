"""Draw one problem's search tree from a search output: a self-contained HTML page, or an SVG picture.

  python -m experiments.inspect --trees=runs/r1/trees/trees.jsonl --problem_id=mini/3 --out=tree.html
  python -m experiments.inspect --trees=runs/r1/trees/trees.jsonl --index=0 --out=tree.svg

The page shows the question, the reference answer, the search settings of the record and every node (step
text with its executed output, Q = value_sum / visits, visits, PPM score, terminal reason and reward),
collapsible, children sorted by --sort; the chosen path (see `rstar_jax.search.render`) is highlighted.
"""
from __future__ import annotations

import itertools
import os

from absl import app, flags

from experiments.usage import check_usage, run
from rstar_jax.errors import InputError

FLAGS = flags.FLAGS
_SHOWN_IDS = 10  # how many available ids an error lists


def define_flags() -> None:
    from rstar_jax.search.render import SORT_KEYS, SVG_MAX_NODES
    flags.DEFINE_string("trees", None, "a trees.jsonl written by experiments.search")
    flags.DEFINE_string("problem_id", None, "the problem to draw (its first record, or the one with --seed)")
    flags.DEFINE_integer("index", None, "the record to draw by position in the file (0-based), instead of an id",
                         lower_bound=0)
    flags.DEFINE_integer("seed", None, "with --problem_id: the record of this search seed (several runs per problem)")
    flags.DEFINE_string("out", None, "output file: .html (page) or .svg (picture)")
    flags.DEFINE_enum("sort", "q", list(SORT_KEYS), "children order: Q, visits (both highest first) or node id")
    flags.DEFINE_integer("svg_max_nodes", SVG_MAX_NODES, "SVG: draw at most this many nodes (chosen path first, "
                         "then the most visited)", lower_bound=1)


def find_record(path: str, problem_id: str | None = None, index: int | None = None, seed: int | None = None):
    """The record with `problem_id` (and `seed`, when given) or at position `index` of the JSONL file.

    Raises LookupError naming the file and what was asked for, with a few of the ids that are there.
    """
    from rstar_jax.search.tree_record import read_tree_records
    if (problem_id is None) == (index is None):
        raise ValueError("give exactly one of problem_id and index")
    seen: list[str] = []
    for i, record in enumerate(read_tree_records(path)):
        if index is not None and i == index:
            return record
        if record.problem_id == problem_id and (seed is None or record.seed == seed):
            return record
        seen.append(record.problem_id if seed is None else f"{record.problem_id} (seed {record.seed})")
    shown = ", ".join(repr(s) for s in itertools.islice(dict.fromkeys(seen), _SHOWN_IDS))
    more = "" if len(set(seen)) <= _SHOWN_IDS else f", ... ({len(set(seen))} in all)"
    if index is not None:
        raise LookupError(f"{path}: no record at index {index}: the file has {len(seen)} records")
    wanted = f"problem id {problem_id!r}" + (f" with seed {seed}" if seed is not None else "")
    raise LookupError(f"{path}: no tree record for {wanted}; available: {shown or '(no records)'}{more}")


def render(record, out_path: str, sort: str = "q", svg_max_nodes: int | None = None) -> None:
    """Write `record` drawn as HTML or SVG, chosen by the extension of `out_path`."""
    from rstar_jax.search import render as rd
    ext = os.path.splitext(out_path)[1].lower()
    if ext in (".html", ".htm"):
        text = rd.render_html(record, sort=sort)
    elif ext == ".svg":
        text = rd.render_svg(record, sort=sort, max_nodes=svg_max_nodes or rd.SVG_MAX_NODES)
    else:
        raise ValueError(f"--out must end in .html or .svg, got {out_path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv):
    check_usage(argv, "trees", "out")
    if (FLAGS.problem_id is None) == (FLAGS.index is None):
        raise app.UsageError("give exactly one of --problem_id and --index")
    if FLAGS.seed is not None and FLAGS.index is not None:  # --index names one record: a seed would be ignored
        raise app.UsageError("--seed goes with --problem_id, not with --index")
    if os.path.splitext(FLAGS.out)[1].lower() not in (".html", ".htm", ".svg"):
        raise app.UsageError(f"--out must end in .html or .svg, got {FLAGS.out!r}")
    # Bad data (a missing file, a malformed record: OSError, TreeRecordError) is reported by `run` as one
    # line, without the usage text a UsageError prints first.
    try:
        record = find_record(FLAGS.trees, FLAGS.problem_id, FLAGS.index, FLAGS.seed)
    except LookupError as e:
        raise InputError(str(e)) from None
    render(record, FLAGS.out, FLAGS.sort, FLAGS.svg_max_nodes)
    print(f"wrote {FLAGS.out}: problem {record.problem_id!r} (seed {record.seed}), {len(record.nodes)} nodes")


if __name__ == "__main__":
    define_flags()
    run(main)
