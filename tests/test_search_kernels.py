"""The array tree kernels against the plain-Python reference on random trees and candidate streams."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rstar_jax.search import backup, select, tree as tr
from rstar_jax.search.reference import Candidate, ReferenceTree

B, K, MAX_DEPTH, CAPACITY = 6, 4, 5, 160
REASONS = [tr.NONE] * 10 + [tr.ANSWER] * 3 + [tr.EXEC_ERROR, tr.NO_STOP]


@functools.partial(jax.jit, static_argnames=("c", "unvisited", "restart_chunk"))
def _select(tree, cursor, done, limit, *, c, unvisited, restart_chunk):
    return select.select(tree, cursor, done, limit, score_fn=select.uct(c, unvisited), max_children=K,
                         restart_chunk=restart_chunk)


@functools.partial(jax.jit, static_argnames=("ppm_leaf_values", "propagate_failures"))
def _expand(tree, leaf, num_new, reason, reward, init_value, text_index, *, ppm_leaf_values, propagate_failures):
    tree, ids = tr.insert(tree, leaf, num_new, reason, reward, init_value, text_index, max_depth=MAX_DEPTH)
    tree = backup.backup_children(tree, ids, ppm_leaf_values=ppm_leaf_values, propagate_failures=propagate_failures)
    return tree, ids


def _random_candidates(rng: np.random.Generator, text_base: int) -> list[Candidate]:
    count = int(rng.choice([0, 1, 2, 3, 4], p=[0.03, 0.12, 0.25, 0.3, 0.3]))
    out = []
    for j in range(count):
        reason = int(rng.choice(REASONS))
        reward = float(rng.choice([1.0, -1.0])) if reason == tr.ANSWER else (-1.0 if reason != tr.NONE else 0.0)
        # Dyadic PPM scores keep float32 and float64 sums exact, so the implementations can be compared exactly.
        out.append(Candidate(reason, reward, float(rng.integers(-8, 9)) / 8, text_base + j))
    return out


def _assert_same(tree: tr.Tree, refs: list[ReferenceTree]) -> None:
    arrays = jax.device_get(tree)
    for b, ref in enumerate(refs):
        n = len(ref.nodes)
        assert arrays.num_nodes[b] == n
        nodes = ref.nodes
        np.testing.assert_array_equal(arrays.parent[b, :n], [x.parent.id if x.parent else -1 for x in nodes])
        np.testing.assert_array_equal(arrays.depth[b, :n], [x.depth for x in nodes])
        np.testing.assert_array_equal(arrays.num_children[b, :n], [len(x.children) for x in nodes])
        np.testing.assert_array_equal(arrays.first_child[b, :n],
                                      [x.children[0].id if x.children else -1 for x in nodes])
        np.testing.assert_array_equal(arrays.visits[b, :n], [x.visits for x in nodes])
        np.testing.assert_array_equal(arrays.value_sum[b, :n], [x.value_sum for x in nodes])
        np.testing.assert_array_equal(arrays.terminal_reason[b, :n], [x.terminal_reason for x in nodes])
        np.testing.assert_array_equal(arrays.reward[b, :n], [x.reward for x in nodes])
        np.testing.assert_array_equal(arrays.text_index[b, :n], [x.text_index for x in nodes])
        np.testing.assert_array_equal(arrays.init_value[b, :n], [x.init_value for x in nodes])


def _drive(select_fn, refs: list[ReferenceTree], limits, rng: np.random.Generator, *, ppm_leaf_values,
           propagate_failures) -> tuple[tr.Tree, list[list[int]]]:
    """Select and expand through the kernels (`select_fn(tree, cursor, done, limit)`) and the reference trees in
    lock-step on one random candidate stream until every tree is finished, comparing them after each kernel.
    Returns the final tree and the leaves selected on each step ([B] per step, -1: finished)."""
    tree = tr.empty(B, CAPACITY, jnp.arange(B, dtype=jnp.int32) * 100)
    cursor, done = jnp.zeros(B, jnp.int32), jnp.zeros(B, jnp.int32)
    history = []
    for step in range(200):
        tree, leaf, done = select_fn(tree, cursor, done, jnp.asarray(limits, jnp.int32))
        ref_leaves = [ref.select(int(limits[b])) for b, ref in enumerate(refs)]
        np.testing.assert_array_equal(np.asarray(leaf), [x.id if x else -1 for x in ref_leaves], err_msg=f"step {step}")
        np.testing.assert_array_equal(np.asarray(done), [r.rollouts_done for r in refs])
        _assert_same(tree, refs)
        history.append([int(x) for x in leaf])
        cursor = leaf
        if not any(ref_leaves):
            break
        num_new = np.zeros(B, np.int32)
        fields = np.zeros((4, B, K), np.float32)
        fields[3] = -1
        for b, x in enumerate(ref_leaves):
            if x is None:
                continue
            cands = _random_candidates(rng, 1000 * step + 10 * b)
            refs[b].expand(x, cands)
            num_new[b] = len(cands)
            for j, cand in enumerate(cands):
                fields[:, b, j] = cand.terminal_reason, cand.reward, cand.init_value, cand.text_index
        tree, ids = _expand(tree, leaf, jnp.asarray(num_new), jnp.asarray(fields[0], jnp.int32),
                            jnp.asarray(fields[1]), jnp.asarray(fields[2]), jnp.asarray(fields[3], jnp.int32),
                            ppm_leaf_values=ppm_leaf_values, propagate_failures=propagate_failures)
        _assert_same(tree, refs)
    # The stream must have exercised the interesting paths, or the comparison proves little.
    assert not any(ref.select(int(limits[b])) for b, ref in enumerate(refs)), "trees did not finish in 200 steps"
    reasons = np.asarray(tree.terminal_reason)
    assert (reasons == tr.DEAD_END).any() and (reasons == tr.MAX_DEPTH).any()
    assert max(r.rollouts_done for r in refs) >= 3, [r.rollouts_done for r in refs]
    return tree, history


@pytest.mark.parametrize("ppm_leaf_values,propagate_failures,unvisited,seed,restart_chunk", [
    (False, False, "zero", 0, 128), (True, False, "zero", 1, 2), (False, True, "inf", 2, 128),
    (True, True, "inf", 3, 4), (True, False, "zero", 4, 1)])
def test_kernels_match_reference(ppm_leaf_values, propagate_failures, unvisited, seed, restart_chunk):
    rng = np.random.default_rng(seed)
    limits = rng.integers(2, 9, size=B)
    refs = [ReferenceTree(max_depth=MAX_DEPTH, capacity=CAPACITY, unvisited=unvisited,
                          ppm_leaf_values=ppm_leaf_values, propagate_failures=propagate_failures,
                          root_text_index=100 * b) for b in range(B)]
    select_fn = functools.partial(_select, c=2.0, unvisited=unvisited, restart_chunk=restart_chunk)
    _drive(select_fn, refs, limits, rng, ppm_leaf_values=ppm_leaf_values, propagate_failures=propagate_failures)


def _puct_prior(init_value):
    return (1 + init_value) / 2  # the PPM score in [-1, 1] as a prior in [0, 1]


def _puct(q, visits, parent_visits, init_value):
    """A PUCT-like rule (AlphaZero's, the PPM score as the prior): Q + c * P * sqrt(N_parent) / (1 + N)."""
    return q + 2.0 * _puct_prior(init_value) * jnp.sqrt(parent_visits.astype(jnp.float32)) / (1 + visits)


def _puct_scalar(q, visits, parent_visits, init_value):
    return q + 2.0 * _puct_prior(init_value) * math.sqrt(parent_visits) / (1 + visits)


_select_puct = jax.jit(functools.partial(select.select, score_fn=_puct, max_children=K))


def test_a_pluggable_selection_rule_matches_the_reference_running_it():
    """The selection rule is a parameter: a rule reading the PPM prior (which UCT ignores) gives the same
    selections and trees through the kernels as through the reference running the same rule, and different
    selections from UCT's, so the rule did take effect."""
    def run(score_fn, select_fn=None):
        rng = np.random.default_rng(5)
        limits = rng.integers(2, 9, size=B)
        refs = [ReferenceTree(max_depth=MAX_DEPTH, capacity=CAPACITY, root_text_index=100 * b, score_fn=score_fn)
                for b in range(B)]
        if select_fn is not None:
            return _drive(select_fn, refs, limits, rng, ppm_leaf_values=False, propagate_failures=False)[1]
        history = []  # the reference alone, on the same stream
        for step in range(200):
            leaves = [ref.select(int(limits[b])) for b, ref in enumerate(refs)]
            history.append([x.id if x else -1 for x in leaves])
            if not any(leaves):
                return history
            for b, x in enumerate(leaves):
                if x is not None:
                    refs[b].expand(x, _random_candidates(rng, 1000 * step + 10 * b))
        pytest.fail("the UCT reference did not finish in 200 steps")

    puct = run(_puct_scalar, _select_puct)
    assert puct != run(None), "the rule made no difference: the test would not notice it being ignored"


def test_uct_reference_conventions():
    score = select.uct(2.0, "zero")
    q = jnp.array([0.5, 0.0, 0.5])
    visits = jnp.array([2, 0, 4])
    s = score(q, visits, jnp.int32(6), q)
    np.testing.assert_allclose(s, [0.5 + 2 * math.sqrt(math.log(6) / 2), 0.0, 0.5 + 2 * math.sqrt(math.log(6) / 4)],
                               rtol=1e-6)
    assert np.all(np.asarray(score(q, visits, jnp.int32(0), q)) == np.asarray(q))  # parent unvisited: no exploration
    assert np.isinf(select.uct(2.0, "inf")(q, visits, jnp.int32(6), q)[1])
    with pytest.raises(ValueError, match="unvisited"):
        select.uct(2.0, "never")


def test_select_ties_terminal_children_and_dead_ends():
    # root -> children 1, 2, 3 (2 terminal); all unvisited: the first live child wins the tie.
    tree = tr.empty(1, 16)
    reason = jnp.array([[tr.NONE, tr.ANSWER, tr.NONE]], jnp.int32)
    tree, ids = tr.insert(tree, jnp.array([0]), jnp.array([3]), reason, jnp.array([[0.0, 1.0, 0.0]]),
                          jnp.full((1, 3), jnp.nan), jnp.arange(3)[None], max_depth=16)
    np.testing.assert_array_equal(ids, [[1, 2, 3]])
    kwargs = dict(score_fn=select.uct(), max_children=3)
    limit = jnp.array([5])
    tree, leaf, done = select.select(tree, jnp.array([0]), jnp.array([0]), limit, **kwargs)
    assert int(leaf[0]) == 1 and int(done[0]) == 0
    # Child 1 expands into one terminal child: the rollout ends there, 1 becomes a dead end, the next starts at
    # the root and takes child 3 (2 is terminal).
    tree, _ = tr.insert(tree, leaf, jnp.array([1]), jnp.array([[tr.EXEC_ERROR]]), jnp.array([[-1.0]]),
                        jnp.full((1, 1), jnp.nan), jnp.array([[9]]), max_depth=16)
    tree, leaf, done = select.select(tree, leaf, done, limit, **kwargs)
    assert int(leaf[0]) == 3 and int(done[0]) == 1
    assert int(tree.terminal_reason[0, 1]) == tr.DEAD_END
    # Child 3 gets no children at all: it is a dead end (the rollout ends), and the next descent finds the root
    # a dead end too, its children now all terminal (that spends a rollout as well): the tree is finished.
    tree, _ = tr.insert(tree, leaf, jnp.array([0]), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1)),
                        jnp.zeros((1, 1)), jnp.zeros((1, 1), jnp.int32), max_depth=16)
    tree, leaf, done = select.select(tree, leaf, done, limit, **kwargs)
    assert int(leaf[0]) == -1 and int(done[0]) == 3
    assert [int(r) for r in tree.terminal_reason[0, :4]] == [tr.DEAD_END, tr.DEAD_END, tr.ANSWER, tr.DEAD_END]


def test_a_dead_end_found_from_the_root_does_not_end_the_search():
    # root -> A (1), B (2); A -> A1 (3), E (4, exec error); A1 -> one correct answer (5). The rollout ends at A1
    # (its only child is terminal); the restart goes to A (Q = 1 beats B's 0), whose children are now all
    # terminal: A is a dead end, that rollout is spent, and the next one takes B, in the same call.
    def grow(tree, leaf, reasons, rewards):
        k = len(reasons)
        tree, ids = tr.insert(tree, jnp.array([leaf]), jnp.array([k]), jnp.array([reasons], jnp.int32),
                              jnp.array([rewards], jnp.float32), jnp.full((1, k), jnp.nan), jnp.arange(k)[None],
                              max_depth=16)
        return backup.backup_children(tree, ids, ppm_leaf_values=False, propagate_failures=False)

    tree = tr.empty(1, 16)
    ref = ReferenceTree(max_depth=16, capacity=16)
    kwargs, limit = dict(score_fn=select.uct(), max_children=2), jnp.array([8])
    cursor, done = jnp.array([0]), jnp.array([0])
    for reasons, rewards in [([tr.NONE, tr.NONE], [0.0, 0.0]), ([tr.NONE, tr.EXEC_ERROR], [0.0, -1.0]),
                             ([tr.ANSWER], [1.0])]:
        tree, leaf, done = select.select(tree, cursor, done, limit, **kwargs)
        ref_leaf = ref.select(8)
        assert int(leaf[0]) == ref_leaf.id
        tree = grow(tree, int(leaf[0]), reasons, rewards)
        ref.expand(ref_leaf, [Candidate(r, w, float("nan"), j) for j, (r, w) in enumerate(zip(reasons, rewards))])
        cursor = leaf
    tree, leaf, done = select.select(tree, cursor, done, limit, **kwargs)
    assert int(leaf[0]) == 2 and int(done[0]) == 2 and ref.select(8).id == 2 and ref.rollouts_done == 2
    assert [int(r) for r in tree.terminal_reason[0, :4]] == [tr.NONE, tr.DEAD_END, tr.NONE, tr.DEAD_END]


def test_backup_terminal_guided_and_ppm():
    tree = tr.empty(1, 8)
    tree, a = tr.insert(tree, jnp.array([0]), jnp.array([2]), jnp.array([[tr.NONE, tr.NONE]]), jnp.zeros((1, 2)),
                        jnp.array([[0.25, -0.5]]), jnp.zeros((1, 2), jnp.int32), max_depth=16)
    tree = backup.backup_children(tree, a, ppm_leaf_values=True, propagate_failures=False)
    # PPM-augmented: each new child gets one local update with its score; the parent is untouched.
    np.testing.assert_array_equal(tree.visits[0, :3], [0, 1, 1])
    np.testing.assert_array_equal(tree.value_sum[0, :3], [0, 0.25, -0.5])
    tree, b = tr.insert(tree, jnp.array([1]), jnp.array([2]), jnp.array([[tr.ANSWER, tr.EXEC_ERROR]]),
                        jnp.array([[1.0, -1.0]]), jnp.zeros((1, 2)), jnp.zeros((1, 2), jnp.int32), max_depth=16)
    tree = backup.backup_children(tree, b, ppm_leaf_values=True, propagate_failures=False)
    # The graded answer is backed up along its path; the failure stays on its own node.
    np.testing.assert_array_equal(tree.visits[0, :5], [1, 2, 1, 1, 1])
    np.testing.assert_array_equal(tree.value_sum[0, :5], [1, 1.25, -0.5, 1, -1])
    np.testing.assert_allclose(tree.q_values()[0, :5], [1, 0.625, -0.5, 1, -1])


def test_insert_depth_limit_and_capacity():
    tree = tr.empty(2, 4)
    none = jnp.zeros((2, 3), jnp.int32)
    # Depth max_depth is allowed (the reference's `depth > max_depth`); only deeper steps are terminal.
    tree, ids = tr.insert(tree, jnp.array([0, 0]), jnp.array([3, 1]), none, jnp.zeros((2, 3)), jnp.zeros((2, 3)),
                          none, max_depth=1)
    assert [int(r) for r in tree.terminal_reason[:, 1]] == [tr.NONE] * 2
    tree = tr.empty(2, 4)
    tree, ids = tr.insert(tree, jnp.array([0, 0]), jnp.array([3, 1]), none, jnp.zeros((2, 3)), jnp.zeros((2, 3)),
                          none, max_depth=0)
    np.testing.assert_array_equal(ids, [[1, 2, 3], [1, -1, -1]])
    assert [int(r) for r in tree.terminal_reason[0, 1:4]] == [tr.MAX_DEPTH] * 3
    np.testing.assert_array_equal(tree.reward[0, 1:4], [-1, -1, -1])
    # Tree 0 is full: two more children do not fit, so node 1 gets none and becomes a dead end.
    tree = tree.replace(terminal_reason=tree.terminal_reason.at[0, 1].set(tr.NONE))
    tree, ids = tr.insert(tree, jnp.array([1, -1]), jnp.array([2, 2]), none, jnp.zeros((2, 3)), jnp.zeros((2, 3)),
                          none, max_depth=5)
    np.testing.assert_array_equal(ids, -np.ones((2, 3)))
    assert int(tree.terminal_reason[0, 1]) == tr.DEAD_END and list(np.asarray(tree.num_nodes)) == [4, 2]
