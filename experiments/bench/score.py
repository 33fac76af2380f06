"""PPM scoring of MCTS children, side by side: each child scored whole; its leaf's shared prefix run once; and
the leaf's keys/values read from the store (as the search does: the leaf was scored when it was created).

  python -m experiments.bench.score                     # 16 leaves x 8 children (the search's batch)
  python -m experiments.bench.score --children=2        # the miniature's case: few unique children a leaf

Workload: `leaves` prefixes (prompt + path) of random length in [min_len, max_len], `children` distinct
continuations of `step_len` tokens each, random weights of the benchmark model (`--preset` for others).
All paths are `rstar_jax.search.scoring.Scorer` (`score`, `score_groups`, `score_children` with the leaves
stored), compiled before timing; prints texts/s of each, the largest score difference, and last
`ratio=<stored/whole texts per second>`.
"""
from __future__ import annotations

import time

from absl import app, flags

from experiments.bench.common import model_config

flags.DEFINE_integer("leaves", 16, "prefixes (MCTS leaves expanded in one lock-step iteration)")
flags.DEFINE_integer("children", 8, "distinct children per leaf")
flags.DEFINE_integer("min_len", 256, "shortest prefix, tokens")
flags.DEFINE_integer("max_len", 448, "longest prefix, tokens")
flags.DEFINE_integer("step_len", 40, "tokens of each child's step")
flags.DEFINE_integer("repeats", 3, "timed calls of each path")
flags.DEFINE_string("preset", "", "model shapes of this preset; default: the ~48M benchmark model")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter and activation dtype")
flags.DEFINE_integer("seed", 0, "seed")
FLAGS = flags.FLAGS


def main(argv):
    import numpy as np
    from flax import nnx

    from rstar_jax.models.ppm import PPM
    from rstar_jax.search.scoring import Scorer

    cfg = model_config(FLAGS.preset, FLAGS.dtype)
    rng = np.random.default_rng(FLAGS.seed)
    text = lambda size: "".join(map(chr, rng.integers(10, cfg.vocab_size, size)))  # one character a token
    groups = []
    for _ in range(FLAGS.leaves):
        prefix = text(rng.integers(FLAGS.min_len, FLAGS.max_len + 1))
        groups.append([prefix + text(FLAGS.step_len) for _ in range(FLAGS.children)])
    texts = [t for g in groups for t in g]
    ppm = PPM(cfg, rngs=nnx.Rngs(FLAGS.seed))
    # An untrained head (init ~N(5e-7, 1e-6)) scores ~0 everywhere; a random one makes the score difference meaningful.
    ppm.v_head.weight[...] = rng.normal(0, cfg.hidden_size ** -0.5, cfg.hidden_size).astype(np.float32)
    scorer = Scorer(ppm, lambda t: list(map(ord, t)), max_tokens=cfg.max_position_embeddings, min_group=0,
                    cache_mib=1 << 20)
    print(f"workload: {FLAGS.leaves} leaves of {FLAGS.min_len}-{FLAGS.max_len} tokens x {FLAGS.children} children "
          f"of {FLAGS.step_len} tokens; model {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.dtype}",
          flush=True)

    def timed(fn):
        out = fn()  # compiles
        start = time.perf_counter()
        for _ in range(FLAGS.repeats):
            fn()
        return out, (time.perf_counter() - start) / FLAGS.repeats

    whole, whole_s = timed(lambda: scorer.score(texts))
    grouped, grouped_s = timed(lambda: np.concatenate(scorer.score_groups(groups)))
    leaves, steps = [g[0][:-FLAGS.step_len] for g in groups], [[t[-FLAGS.step_len:] for t in g] for g in groups]
    scorer.score_children(leaves, [s[:1] for s in steps], keep=[[False]] * len(steps))  # stores the leaves
    no_keep = [[False] * len(s) for s in steps]  # the store stays as it is between the timed calls
    stored, stored_s = timed(lambda: np.concatenate(scorer.score_children(leaves, steps, keep=no_keep)))
    assert scorer.store.misses == len(leaves), "every leaf's keys/values come from the store"
    for name, values, seconds in (("whole", whole, whole_s), ("grouped", grouped, grouped_s),
                                  ("stored", stored, stored_s)):
        print(f"{name + ':':8} {len(texts)} texts in {seconds:.3f} s = {len(texts) / seconds:.1f} texts/s; "
              f"largest score difference from whole {np.max(np.abs(whole - values)):.1e}", flush=True)
    print(f"grouped/whole {whole_s / grouped_s:.2f}")
    print(f"ratio={whole_s / stored_s:.2f}")


if __name__ == "__main__":
    app.run(main)
