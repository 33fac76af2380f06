"""Tree-kernel benchmark: select + insert + backup over B trees, our jitted kernels vs the Python reference.

    python -m experiments.bench.tree                       # the issue's workload (a few minutes on 2 cores)
    python -m experiments.bench.tree --batch=64 --rollouts=8 --python_trees=64 --nomctx   # a quick look

Workload: B trees searched in lock-step, n candidates per expansion, depth limit max_depth, `rollouts`
rollouts per tree, PPM-augmented annotation (every new child gets a local PPM update, answers are backed
up along their path), UCT with the reference's settings. The candidates come from a synthetic stream
that is a function of (seed, lock-step iteration, tree, leaf depth) alone, so both sides see the same
candidates: per expansion 1..n children; each is an answer with a probability rising with depth (then,
as with `answer_first`, the first answer is the only child kept), an execution error or a missing stop
tag now and then, else a plain step; PPM scores are multiples of 1/64 in [-1, 1] (exact in float32, so
both sides make identical choices).

(a) our kernels as the driver runs them: `select` jitted, `insert` + `backup_children` jitted together,
    the tree donated to both, leaves and new ids fetched to the host every iteration; one warm-up pass
    (compilation included) is reported on its own and not counted;
(b) `ReferenceTree` (plain Python, the same semantics) on the first `python_trees` trees over the same
    iterations; its time is scaled linearly to B trees (trees are independent), and its final trees are
    checked against ours node by node, so both sides did equal work;
(c) mctx's `muzero_policy` at the same batch, branching and depth limit, with as many simulations as our
    trees had expansions on average and a trivial recurrent_fn, for scale.
Prints ms per lock-step iteration (all B trees) and nodes per second of each, and last
`ratio=<Python reference time / ours>`.
"""
from __future__ import annotations

import functools
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from rstar_jax.search import backup, select, tree as tr
from rstar_jax.search.reference import Candidate, ReferenceTree

_BATCH = flags.DEFINE_integer("batch", 1024, "trees searched in lock-step (B)")
_N = flags.DEFINE_integer("n", 16, "candidates per expansion (at most n children)")
_ROLLOUTS = flags.DEFINE_integer("rollouts", 48, "rollouts per tree")
_MAX_DEPTH = flags.DEFINE_integer("max_depth", 16, "depth limit")
_PYTHON_TREES = flags.DEFINE_integer("python_trees", 128, "trees run through the Python reference (time scaled "
                                     "to --batch)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the candidate stream")
_ANSWER_RATE = flags.DEFINE_float("answer_rate", 0.05, "probability that a candidate at max_depth is an answer "
                                  "(linear in depth below)")
_REPEATS = flags.DEFINE_integer("repeats", 1, "timed passes of (a) and (b) each, taking turns; the best counts")
_MCTX = flags.DEFINE_bool("mctx", True, "also time mctx.muzero_policy (needs `pip install .[bench]`)")
_MCTX_SIMULATIONS = flags.DEFINE_integer("mctx_simulations", 0, "mctx simulations; 0: our mean expansions per tree")

C, UNVISITED = 2.0, "zero"  # the reference's UCT
EXEC_ERROR_RATE, NO_STOP_RATE, CORRECT_RATE = 0.08, 0.02, 0.4


# ---- the candidate stream -------------------------------------------------------------------------

class Stream:
    """The candidates of every expansion, a function of (seed, iteration, tree, leaf depth) alone."""

    def __init__(self, seed: int, batch: int, n: int, max_depth: int, answer_rate: float):
        self.seed, self.batch, self.n, self.max_depth, self.answer_rate = seed, batch, n, max_depth, answer_rate

    def __call__(self, step: int, rows: np.ndarray, leaf_depth: np.ndarray, live: np.ndarray):
        """Candidates of trees `rows` (their leaves at `leaf_depth`; `live`: expanding) at iteration `step`.

        Returns num_new [R] and reason, reward, init_value [R, n]; identical for a tree whatever `rows` holds.
        """
        n = self.n
        u = np.random.default_rng([self.seed, step]).random((self.batch, 1 + 3 * n), np.float32)[rows]
        count = np.minimum(1 + (u[:, 0] * n).astype(np.int32), n)
        u_kind, u_value, u_correct = u[:, 1:1 + n], u[:, 1 + n:1 + 2 * n], u[:, 1 + 2 * n:]
        p_answer = (self.answer_rate * (leaf_depth + 1) / self.max_depth)[:, None].astype(np.float32)
        reason = np.where(u_kind < p_answer, tr.ANSWER,
                          np.where(u_kind < p_answer + EXEC_ERROR_RATE, tr.EXEC_ERROR,
                                   np.where(u_kind < p_answer + EXEC_ERROR_RATE + NO_STOP_RATE, tr.NO_STOP, tr.NONE)))
        reason = reason.astype(np.int32)
        reward = np.where(reason == tr.ANSWER, np.where(u_correct < CORRECT_RATE, 1.0, -1.0),
                          np.where(reason == tr.NONE, 0.0, -1.0)).astype(np.float32)
        init_value = (np.round((2 * u_value - 1) * 64) / 64).astype(np.float32)  # dyadic: exact sums
        slot = np.arange(n)[None, :]
        # answer_first: when a candidate is an answer, the first answer is the only child kept.
        answer = (reason == tr.ANSWER) & (slot < count[:, None])
        has_answer = answer.any(axis=1)
        first = np.argmax(answer, axis=1)
        for field in (reason, reward, init_value):
            field[has_answer, 0] = field[has_answer, first[has_answer]]
        count = np.where(has_answer, 1, count)
        count = np.where(live, count, 0).astype(np.int32)
        keep = slot < count[:, None]
        reason = np.where(keep, reason, tr.NONE)
        reward = np.where(keep, reward, 0.0).astype(np.float32)
        init_value = np.where(keep, init_value, np.nan).astype(np.float32)
        return count, reason, reward, init_value


# ---- (a) our kernels --------------------------------------------------------------------------------

def _insert_and_backup(tree, leaf, num_new, reason, reward, init_value, text_index, *, max_depth):
    """What the driver jits as one call (PPM-augmented annotation: ppm_leaf_values, failures stay local)."""
    tree, ids = tr.insert(tree, leaf, num_new, reason, reward, init_value, text_index, max_depth=max_depth)
    tree = backup.backup_children(tree, ids, ppm_leaf_values=True, propagate_failures=False)
    return tree, ids


def run_ours(stream: Stream, select_fn, expand_fn, *, batch: int, n: int, capacity: int, rollouts: int):
    """One full search of all trees. Returns (tree, timings, per-tree finish iteration, iterations)."""
    tree = tr.empty(batch, capacity)
    rows = np.arange(batch)
    cursor, done = np.zeros(batch, np.int32), np.zeros(batch, np.int32)
    limit = jnp.full((batch,), rollouts, jnp.int32)
    text_index = jnp.full((batch, n), -1, jnp.int32)  # texts live on the host, as in the driver
    depth = np.zeros((batch, capacity), np.int8)  # host mirror of node depths, to draw the stream (untimed)
    finished = np.full(batch, -1, np.int64)
    times = {"select": 0.0, "expand": 0.0, "first_select": 0.0, "first_expand": 0.0}
    step = 0
    while True:
        t = time.perf_counter()
        tree, leaf, done = select_fn(tree, jnp.asarray(cursor), jnp.asarray(done), limit)
        leaf, done = np.asarray(leaf), np.array(done)
        dt = time.perf_counter() - t
        times["select"] += dt
        times["first_select"] = times["first_select"] or dt
        finished[(leaf < 0) & (finished < 0)] = step
        live = leaf >= 0
        if not live.any():
            break
        leaf_depth = depth[rows, np.maximum(leaf, 0)].astype(np.int32)
        num_new, reason, reward, init_value = stream(step, rows, leaf_depth, live)
        t = time.perf_counter()
        tree, ids = expand_fn(tree, jnp.asarray(leaf), jnp.asarray(num_new), jnp.asarray(reason), jnp.asarray(reward),
                              jnp.asarray(init_value), text_index)
        ids = np.asarray(ids)
        dt = time.perf_counter() - t
        times["expand"] += dt
        times["first_expand"] = times["first_expand"] or dt
        written = ids >= 0
        depth[np.broadcast_to(rows[:, None], ids.shape)[written], ids[written]] = \
            np.broadcast_to(leaf_depth[:, None] + 1, ids.shape)[written]
        cursor = leaf
        step += 1
    jax.block_until_ready(tree)
    return tree, times, finished, step + 1


# ---- (b) the Python reference -------------------------------------------------------------------------

def run_reference(stream: Stream, *, trees: int, capacity: int, max_depth: int, rollouts: int):
    refs = [ReferenceTree(max_depth=max_depth, capacity=capacity, c=C, unvisited=UNVISITED, ppm_leaf_values=True,
                          propagate_failures=False) for _ in range(trees)]
    rows = np.arange(trees)
    finished = np.full(trees, -1, np.int64)
    times = {"select": 0.0, "expand": 0.0}
    step = 0
    while True:
        t = time.perf_counter()
        leaves = [ref.select(rollouts) for ref in refs]
        times["select"] += time.perf_counter() - t
        live = np.array([x is not None for x in leaves])
        finished[~live & (finished < 0)] = step
        if not live.any():
            break
        # The stream, as Candidate lists (untimed: the driver's equivalent is the sampler's output).
        leaf_depth = np.array([x.depth if x is not None else 0 for x in leaves], np.int32)
        num_new, reason, reward, init_value = stream(step, rows, leaf_depth, live)
        reason, reward, init_value = reason.tolist(), reward.tolist(), init_value.tolist()
        cands = [[Candidate(reason[i][j], reward[i][j], init_value[i][j], -1) for j in range(num_new[i])]
                 for i in range(trees)]
        t = time.perf_counter()
        for ref, leaf, c in zip(refs, leaves, cands):
            if leaf is not None:
                ref.expand(leaf, c)
        times["expand"] += time.perf_counter() - t
        step += 1
    return refs, times, finished, step + 1


def check_same(tree: tr.Tree, refs: list[ReferenceTree], ours_finished, ref_finished) -> None:
    """The reference's trees equal ours on the trees it ran: node count, visits, values, terminal reasons."""
    trees = len(refs)
    num_nodes = np.asarray(tree.num_nodes[:trees])
    visits, value_sum, reasons = jax.device_get((tree.visits[:trees], tree.value_sum[:trees],
                                                 tree.terminal_reason[:trees]))
    np.testing.assert_array_equal(ours_finished[:len(refs)], ref_finished, err_msg="trees finished at other steps")
    for b, ref in enumerate(refs):
        count = len(ref.nodes)
        assert num_nodes[b] == count, (b, num_nodes[b], count)
        np.testing.assert_array_equal(visits[b, :count], [x.visits for x in ref.nodes], err_msg=f"visits, tree {b}")
        np.testing.assert_array_equal(value_sum[b, :count], [x.value_sum for x in ref.nodes],
                                      err_msg=f"value_sum, tree {b}")
        np.testing.assert_array_equal(reasons[b, :count], [x.terminal_reason for x in ref.nodes],
                                      err_msg=f"terminal reasons, tree {b}")


def full_copies(jitted, *args) -> int:
    """Copies of a whole [B, N] tree field in the compiled kernel (each one costs a pass over B * N)."""
    b, n = args[0].parent.shape
    return len(re.findall(rf"= \w+\[{b},{n}\]\{{1,0\}} copy\(", jitted.lower(*args).compile().as_text()))


# ---- (c) mctx ------------------------------------------------------------------------------------------

def run_mctx(batch: int, num_actions: int, max_depth: int, simulations: int, seed: int):
    """Warm-up + timed muzero_policy call. Returns (version, compile_s, run_s) or (message, None, None)."""
    try:
        import mctx
    except ImportError as exc:
        return f"mctx not importable ({exc}); install the bench extra: pip install -e .[bench]", None, None

    def recurrent_fn(params, rng_key, action, embedding):
        del params, action
        value = jax.random.uniform(rng_key, (batch,), minval=-1.0, maxval=1.0)  # a PPM-like score, nothing more
        out = mctx.RecurrentFnOutput(reward=jnp.zeros(batch), discount=jnp.ones(batch),
                                     prior_logits=jnp.zeros((batch, num_actions)), value=value)
        return out, embedding + 1

    @jax.jit
    def search(rng_key):
        root = mctx.RootFnOutput(prior_logits=jnp.zeros((batch, num_actions)), value=jnp.zeros(batch),
                                 embedding=jnp.zeros(batch, jnp.int32))
        out = mctx.muzero_policy((), rng_key, root, recurrent_fn, num_simulations=simulations, max_depth=max_depth)
        return out.action, out.search_tree.node_visits

    key = jax.random.PRNGKey(seed)
    t = time.perf_counter()
    jax.block_until_ready(search(key))
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    _, visits = jax.block_until_ready(search(jax.random.fold_in(key, 1)))
    run_s = time.perf_counter() - t
    assert int(visits[:, 0].min()) == simulations + 1, "mctx root visits"  # every simulation passed the root
    return mctx.__version__, compile_s, run_s


# ---- main ----------------------------------------------------------------------------------------------

def main(argv):
    del argv
    batch, n, rollouts, max_depth = _BATCH.value, _N.value, _ROLLOUTS.value, _MAX_DEPTH.value
    py_trees = min(_PYTHON_TREES.value, batch)
    capacity = 1 + rollouts * max_depth * n  # SearchConfig.tree_capacity: room for every rollout at max depth
    stream = Stream(_SEED.value, batch, n, max_depth, _ANSWER_RATE.value)

    select_fn = jax.jit(functools.partial(select.select, score_fn=select.uct(C, UNVISITED), max_children=n),
                        donate_argnums=(0,))
    expand_fn = jax.jit(functools.partial(_insert_and_backup, max_depth=max_depth), donate_argnums=(0,))

    print(f"workload: B={batch} trees, n={n} candidates/expansion, max_depth={max_depth}, {rollouts} rollouts/tree, "
          f"PPM-augmented backup, capacity {capacity} nodes/tree; jax {jax.__version__} on "
          f"{jax.devices()[0].platform} ({jax.device_count()} device(s)), {len(os.sched_getaffinity(0))} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    print(f"stream: seed {_SEED.value}; per expansion 1..{n} children (uniform); each an answer with probability "
          f"{_ANSWER_RATE.value:g} * depth / {max_depth} (answer_first: the first answer alone is kept, graded +1 with "
          f"probability {CORRECT_RATE:g}), an execution error {EXEC_ERROR_RATE:g}, no stop tag {NO_STOP_RATE:g}; "
          f"PPM scores k/64 in [-1, 1]")

    # (a) ours: a warm-up pass (compiles both kernels), then the timed passes, on the same stream; and
    # (b) the Python reference on the first py_trees trees, taking turns with (a).
    t = time.perf_counter()
    _, warm, _, _ = run_ours(stream, select_fn, expand_fn, batch=batch, n=n, capacity=capacity, rollouts=rollouts)
    warm_s = time.perf_counter() - t
    kernel_s = ref_s = math.inf
    for _ in range(_REPEATS.value):
        t = time.perf_counter()
        tree, times, ours_finished, iterations = run_ours(stream, select_fn, expand_fn, batch=batch, n=n,
                                                          capacity=capacity, rollouts=rollouts)
        if times["select"] + times["expand"] < kernel_s:
            ours, ours_s, kernel_s = times, time.perf_counter() - t, times["select"] + times["expand"]
        refs, times, ref_finished, _ = run_reference(stream, trees=py_trees, capacity=capacity, max_depth=max_depth,
                                                     rollouts=rollouts)
        if times["select"] + times["expand"] < ref_s:
            ref, ref_s = times, times["select"] + times["expand"]
    scale = batch / py_trees
    ref_s *= scale

    num_nodes = np.asarray(tree.num_nodes)
    reasons = np.asarray(tree.terminal_reason)
    in_use = np.arange(capacity)[None, :] < num_nodes[:, None]
    depth = np.asarray(tree.depth)
    expansions = int((np.asarray(tree.num_children) > 0).sum())
    nodes = int(num_nodes.sum())
    counts = {name: int(((reasons == code) & in_use).sum()) for code, name in enumerate(tr.TERMINAL_REASONS) if name}
    print(f"trees: {nodes / batch:.0f} nodes/tree on average (min {num_nodes.min()}, max {num_nodes.max()}), "
          f"{expansions / batch:.0f} expansions/tree, mean node depth {depth[in_use].mean():.1f}, "
          f"terminal nodes: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    live = ours_finished.sum() / (batch * max(iterations - 1, 1))
    print(f"iterations: {iterations} lock-step (select calls; the last tree finished at {ours_finished.max()}), "
          f"{100 * live:.0f}% of the trees live in an average iteration (finished trees idle in their slots)")

    ms = lambda s: 1e3 * s / iterations
    print(f"(a) ours, jit select | jit insert+backup, tree donated: {kernel_s:.2f} s = {ms(kernel_s):.2f} ms/iteration "
          f"(select {ms(ours['select']):.2f} + insert/backup {ms(ours['expand']):.2f}), {nodes / kernel_s:,.0f} nodes/s, "
          f"{expansions / kernel_s:,.0f} expansions/s")
    print(f"    warm-up pass (not counted): {warm_s:.2f} s, first calls (compile) select {warm['first_select']:.2f} s, "
          f"insert+backup {warm['first_expand']:.2f} s; timed pass with stream generation {ours_s:.2f} s")
    z = jnp.zeros(batch, jnp.int32)
    zk, fk = jnp.zeros((batch, n), jnp.int32), jnp.zeros((batch, n), jnp.float32)
    copies = (full_copies(select_fn, tree, z, z, z), full_copies(expand_fn, tree, z, z, zk, fk, fk, zk))
    print(f"    compiled kernels copy a whole [B, N] field ({batch * capacity * 4 / 2**20:.0f} MiB) {copies[0]} times "
          f"(select) and {copies[1]} times (insert+backup) per call")

    scaled = f", scaled x{scale:g} from {py_trees} trees (linear: trees are independent)" if scale != 1 else ""
    check_same(tree, refs, ours_finished, ref_finished)
    ref_nodes = sum(len(r.nodes) for r in refs) * scale
    print(f"(b) Python reference (ReferenceTree): {ref_s:.2f} s{scaled} = {ms(ref_s):.2f} ms/iteration "
          f"(select {ms(ref['select'] * scale):.2f} + expand/backup {ms(ref['expand'] * scale):.2f}), "
          f"{ref_nodes / ref_s:,.0f} nodes/s, "
          f"{expansions / ref_s:,.0f} expansions/s (per iteration: over the same {iterations} iterations)")
    print(f"    check: on its {py_trees} trees the reference and ours agree on every node's visits, value_sum and "
          f"terminal reason ({sum(len(r.nodes) for r in refs)} nodes) and on each tree's finishing iteration")

    # (c) mctx, for scale.
    if _MCTX.value:
        sims = _MCTX_SIMULATIONS.value or max(1, round(expansions / batch))
        version, compile_s, run_s = run_mctx(batch, n, max_depth, sims, _SEED.value)
        if run_s is None:
            print(f"(c) mctx skipped: {version}")
        else:
            print(f"(c) mctx {version} muzero_policy: B={batch}, {sims} simulations (our mean expansions/tree), "
                  f"{n} actions, max_depth {max_depth}, trivial recurrent_fn: {run_s:.2f} s = "
                  f"{1e3 * run_s / sims:.2f} ms/simulation, {batch * sims / run_s:,.0f} expansions/s "
                  f"(one node with {n} child slots each); compile ~{compile_s - run_s:.1f} s (first call - timed call)")
    else:
        print("(c) mctx skipped (--nomctx)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"ratio={ref_s / kernel_s:.2f}")


if __name__ == "__main__":
    app.run(main)
