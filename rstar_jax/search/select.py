"""Selection: descend every tree by a child-scoring rule (UCT by default) to the leaf to expand next.

One call continues each tree's current rollout from its cursor (the leaf expanded last); when the
rollout cannot go on (a node whose children are all terminal becomes a DEAD_END, the reference's rule),
the rollout is over and the next one starts from the root in the same call, so every live tree yields a
leaf on every call until it has used its rollouts or is exhausted.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from rstar_jax.search.tree import DEAD_END, NONE, Tree

# A scoring rule maps (q [K], visits [K], parent visits [], init_value [K]) to scores [K]; highest wins.
ScoreFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def uct(c: float = 2.0, unvisited: str = "zero") -> ScoreFn:
    """rStar Eq. 1, `Q + c * sqrt(ln N_parent / N)`.

    The exploration term is 0 when N == 0 or N_parent == 0 (the reference code); with
    unvisited="inf" an unvisited child scores +inf instead (textbook UCT, the paper's reading).
    """
    if unvisited not in ("zero", "inf"):
        raise ValueError(f"unvisited must be 'zero' (reference) or 'inf' (paper), got {unvisited!r}")

    def score(q, visits, parent_visits, init_value):
        del init_value
        n = visits.astype(jnp.float32)
        n_parent = parent_visits.astype(jnp.float32)
        explore = c * jnp.sqrt(jnp.log(jnp.maximum(n_parent, 1.0)) / jnp.maximum(n, 1.0))
        s = q + jnp.where((visits > 0) & (parent_visits > 0), explore, 0.0)
        return jnp.where(visits > 0, s, jnp.inf) if unvisited == "inf" else s
    return score


def _best_child(tree: Tree, node: jax.Array, extra_dead: jax.Array, score_fn: ScoreFn, max_children: int):
    """The highest-scoring non-terminal child of `node` (first on ties), or -1. One tree (unbatched)."""
    idx = tree.first_child[node] + jnp.arange(max_children)  # [K]
    exists = jnp.arange(max_children) < tree.num_children[node]
    idx = jnp.where(exists, idx, 0)
    live = exists & (tree.terminal_reason[idx] == NONE) & (idx != extra_dead)
    q = jnp.where(tree.visits[idx] > 0, tree.value_sum[idx] / jnp.maximum(tree.visits[idx], 1), 0.0)
    scores = jnp.where(live, score_fn(q, tree.visits[idx], tree.visits[node], tree.init_value[idx]), -jnp.inf)
    best = jnp.argmax(scores)  # first maximum
    return jnp.where(jnp.any(live), idx[best], -1)


def _descend(tree: Tree, start: jax.Array, extra_dead: jax.Array, score_fn: ScoreFn, max_children: int):
    """Follow the best children from `start` to a childless node. One tree.

    Returns (leaf, dead): the leaf to expand (-1 if the descent got stuck or `start` is terminal) and the
    node found with only terminal children (-1 if none), which the caller marks DEAD_END.
    """
    def cond(carry):
        node, leaf, dead = carry
        return (leaf < 0) & (dead < 0) & (node >= 0)

    def body(carry):
        node, _, _ = carry
        has_children = tree.num_children[node] > 0
        child = _best_child(tree, node, extra_dead, score_fn, max_children)
        leaf = jnp.where(has_children, -1, node)
        dead = jnp.where(has_children & (child < 0), node, -1)
        return jnp.where(has_children & (child >= 0), child, -1), leaf, dead

    start_ok = (start >= 0) & (tree.terminal_reason[jnp.maximum(start, 0)] == NONE) & (start != extra_dead)
    init = (jnp.where(start_ok, start, -1), jnp.int32(-1), jnp.int32(-1))
    _, leaf, dead = jax.lax.while_loop(cond, body, init)
    return leaf, dead


def select(tree: Tree, cursor: jax.Array, rollouts_done: jax.Array, rollout_limit: jax.Array, *,
           score_fn: ScoreFn, max_children: int) -> tuple[Tree, jax.Array, jax.Array]:
    """The next leaf to expand in every tree.

    cursor: [B] the node the current rollout stands on (0 at the start, -1 for a finished tree);
    rollouts_done: [B] rollouts completed; rollout_limit: [B] rollouts allowed.
    Returns (tree with new DEAD_END marks, leaf [B] (-1: the tree is finished), rollouts_done [B]).
    The leaf is the new cursor.
    """
    def one(tree, cursor, done, limit):
        leaf, dead = _descend(tree, cursor, jnp.int32(-1), score_fn, max_children)
        ended = (leaf < 0) & (cursor >= 0)
        done = done + ended.astype(jnp.int32)
        restart = ended & (done < limit)
        root_leaf, root_dead = _descend(tree, jnp.where(restart, 0, -1), dead, score_fn, max_children)
        leaf = jnp.where(restart, root_leaf, leaf)
        return leaf, dead, jnp.where(restart, root_dead, -1), done

    leaf, dead1, dead2, done = jax.vmap(one)(tree, cursor, rollouts_done, rollout_limit)
    rows = jnp.arange(tree.batch_size)
    reason = tree.terminal_reason
    for dead in (dead1, dead2):  # -1 maps out of bounds and is dropped
        reason = reason.at[rows, jnp.where(dead >= 0, dead, tree.capacity)].set(DEAD_END, mode="drop")
    return tree.replace(terminal_reason=reason), leaf, done
