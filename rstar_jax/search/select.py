"""Selection: descend every tree by a child-scoring rule (UCT by default) to the leaf to expand next.

One call continues each tree's current rollout from its cursor (the leaf expanded last); when the
rollout cannot go on (a node whose children are all terminal becomes a DEAD_END, the reference's rule),
the rollout is over and the next one starts from the root in the same call (again while those descents
end in dead ends, each spending a rollout), so every live tree yields a leaf on every call until it has
used its rollouts or is exhausted.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from rstar_jax.search.tree import DEAD_END, NONE, Tree

RESTART_CHUNK = 128  # trees per batch of root descents

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


def _best_child(tree: Tree, row: jax.Array, node: jax.Array, score_fn: ScoreFn, k: int):
    """The highest-scoring non-terminal child of `node` in tree `row` (first on ties), or -1."""
    first = tree.first_child[row, node]
    start = jnp.clip(first, 0, tree.capacity - k)  # siblings are contiguous: read them as one window
    idx = start + jnp.arange(k)  # [K]
    exists = (idx >= first) & (idx < first + tree.num_children[row, node])
    window = lambda field: jax.lax.dynamic_slice(field, (row, start), (1, k))[0]
    visits = window(tree.visits)
    live = exists & (window(tree.terminal_reason) == NONE)
    q = jnp.where(visits > 0, window(tree.value_sum) / jnp.maximum(visits, 1), 0.0)
    scores = jnp.where(live, score_fn(q, visits, tree.visits[row, node], window(tree.init_value)), -jnp.inf)
    best = jnp.argmax(scores)  # first maximum
    return jnp.where(jnp.any(live), idx[best], -1)


def _descend(tree: Tree, row: jax.Array, start: jax.Array, score_fn: ScoreFn, k: int):
    """Follow the best children from `start` to a childless node in tree `row`.

    Returns (leaf, dead): the leaf to expand (-1 if the descent got stuck or `start` is terminal) and the
    node found with only terminal children (-1 if none), which the caller marks DEAD_END.
    """
    def cond(carry):
        node, leaf, dead = carry
        return (leaf < 0) & (dead < 0) & (node >= 0)

    def body(carry):
        node, _, _ = carry
        has_children = tree.num_children[row, node] > 0
        child = _best_child(tree, row, node, score_fn, k)
        leaf = jnp.where(has_children, -1, node)
        dead = jnp.where(has_children & (child < 0), node, -1)
        return jnp.where(has_children & (child >= 0), child, -1), leaf, dead

    start_ok = (start >= 0) & (tree.terminal_reason[row, jnp.maximum(start, 0)] == NONE)
    init = (jnp.where(start_ok, start, -1), jnp.int32(-1), jnp.int32(-1))
    _, leaf, dead = jax.lax.while_loop(cond, body, init)
    return leaf, dead


def _mark_dead(reason: jax.Array, dead: jax.Array) -> jax.Array:
    """reason [B, N] with node dead[b] of each tree set to DEAD_END (-1: none; maps out of bounds, dropped)."""
    rows = jnp.arange(reason.shape[0])
    return reason.at[rows, jnp.where(dead >= 0, dead, reason.shape[1])].set(DEAD_END, mode="drop")


def select(tree: Tree, cursor: jax.Array, rollouts_done: jax.Array, rollout_limit: jax.Array, *,
           score_fn: ScoreFn, max_children: int,
           restart_chunk: int = RESTART_CHUNK) -> tuple[Tree, jax.Array, jax.Array]:
    """The next leaf to expand in every tree.

    cursor: [B] the node the current rollout stands on (0 at the start, -1 for a finished tree);
    rollouts_done: [B] rollouts completed; rollout_limit: [B] rollouts allowed.
    Returns (tree with new DEAD_END marks, leaf [B] (-1: the tree is finished), rollouts_done [B]).
    The leaf is the new cursor. A descent from the root that ends in a dead end spends a rollout (as in
    the reference) and the next one starts at once, so a tree only finishes when its rollouts are used
    or its root is a dead end.
    """
    rows = jnp.arange(tree.batch_size)

    def descents(reason):  # vmap over row indices with the tree closed over: each reads its own row in place
        t = tree.replace(terminal_reason=reason)
        return jax.vmap(lambda row, start: _descend(t, row, start, score_fn, max_children))

    leaf, dead = descents(tree.terminal_reason)(rows, cursor)
    reason = _mark_dead(tree.terminal_reason, dead)  # after every read of the old marks (no copy)
    ended = (leaf < 0) & (cursor >= 0)
    done = rollouts_done + ended.astype(jnp.int32)

    def restartable(reason, ended, done):
        return ended & (done < rollout_limit) & (reason[:, 0] == NONE)

    def body(carry):
        reason, leaf, done, restart = carry
        root_leaf, root_dead = _restart_descents(descents(reason), restart, restart_chunk)
        spent = restart & (root_leaf < 0)  # a live root's descent fails only at a dead end
        reason = _mark_dead(reason, root_dead)
        done = done + spent.astype(jnp.int32)
        return reason, jnp.where(restart, root_leaf, leaf), done, restartable(reason, spent, done)

    carry = (reason, leaf, done, restartable(reason, ended, done))
    reason, leaf, done, _ = jax.lax.while_loop(lambda carry: jnp.any(carry[3]), body, carry)
    return tree.replace(terminal_reason=reason), leaf, done


def _restart_descents(descend, restart: jax.Array, chunk: int):
    """Descents from the root for the trees in `restart` [B], run over those trees only.

    A vmapped while_loop costs every lane the longest descent, and only a few trees start a rollout on a
    given step, so the restarting rows are packed into chunks. Returns (leaf, dead) [B], -1 elsewhere.
    """
    b = restart.shape[0]
    chunk = min(chunk, b)
    slots = -(-b // chunk) * chunk
    rank = jnp.cumsum(restart) - 1
    packed = jnp.full((slots,), b, jnp.int32).at[jnp.where(restart, rank, slots)].set(
        jnp.arange(b, dtype=jnp.int32), mode="drop")  # [slots] restarting rows first, then b (= none)

    def body(carry):
        c, leaf, dead = carry
        row = jax.lax.dynamic_slice(packed, (c * chunk,), (chunk,))  # [chunk]
        valid = row < b
        l, d = descend(jnp.where(valid, row, 0), jnp.where(valid, 0, -1))
        return c + 1, leaf.at[row].set(l, mode="drop"), dead.at[row].set(d, mode="drop")

    num_chunks = (jnp.sum(restart) + chunk - 1) // chunk
    none = jnp.full((b,), -1, jnp.int32)
    _, leaf, dead = jax.lax.while_loop(lambda carry: carry[0] < num_chunks, body, (jnp.int32(0), none, none))
    return leaf, dead
