"""Writes the miniature's generated problems as a JSONL problem file, for `experiments.evaluate` and
`experiments.search`: its held-out evaluation sets or a training pool (the same generator and seeds as
`experiments.round`, so a round's sets can be rebuilt or enlarged).

  python -m experiments.miniature_sets --split=eval --per_difficulty=50 --difficulties=4,5,6 --seed=0 --out=ev150.jsonl
  python -m experiments.miniature_sets --split=pool --num=1000 --seed=7 --out=pool.jsonl
"""
from __future__ import annotations

import os

from absl import app, flags

from experiments import stages
from experiments.usage import check_usage, run

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum("split", "eval", ["eval", "pool"], "eval: held-out sets per difficulty; pool: a training pool")
    flags.DEFINE_integer("per_difficulty", 20, "eval: problems per difficulty", lower_bound=1)
    flags.DEFINE_integer("num", 256, "pool: problems (difficulties in turn)", lower_bound=1)
    flags.DEFINE_list("difficulties", [str(d) for d in range(1, 8)], "difficulties (operations, 1..7)")
    flags.DEFINE_integer("seed", 0, "seed of the generator (experiments.round's --miniature_seed)")
    flags.DEFINE_string("out", None, "output JSONL file")


def main(argv):
    check_usage(argv, "out")
    try:
        difficulties = [int(d) for d in FLAGS.difficulties]
    except ValueError:
        raise app.UsageError(f"--difficulties must be integers 1..7, got {FLAGS.difficulties}") from None
    if not difficulties or not all(1 <= d <= 7 for d in difficulties):
        raise app.UsageError(f"--difficulties must be integers 1..7, got {FLAGS.difficulties}")
    from rstar_jax.data import miniature
    rows = (miniature.make_pool(FLAGS.num, FLAGS.seed, difficulties) if FLAGS.split == "pool" else
            miniature.make_eval_set(FLAGS.per_difficulty, FLAGS.seed, difficulties))
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    stages.write_jsonl_atomic(FLAGS.out, rows)
    print(f"{len(rows)} {FLAGS.split} problems (difficulties {','.join(map(str, difficulties))}, seed {FLAGS.seed}) "
          f"-> {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    run(main)
