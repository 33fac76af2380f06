"""Back-propagation: the value updates that follow an expansion, for every annotation mode.

`update(v)` is the reference's: N += 1, value_sum += v, on the node alone or along its path to the root.
What each new child contributes (rStar section 4):
- a terminal child contributes its reward: an answer's (graded +-1 in data generation, its PPM score at
  inference) along its path; a failure's (-1: execution error, no stop tag, depth limit) on itself only,
  or along the path with `propagate_failures` (the paper's reading);
- a non-terminal child contributes nothing in terminal-guided annotation, and one local update with its
  PPM score (Q0 = PPM, N = 1) when a PPM scores the search (PPM-augmented annotation, inference).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rstar_jax.search.tree import ANSWER, NONE, Tree


def update(tree: Tree, nodes: jax.Array, values: jax.Array, along_path: jax.Array) -> Tree:
    """update(values) on `nodes` [B, K] (-1 = none), each on its path to the root where `along_path` [B, K]."""
    rows = jnp.broadcast_to(jnp.arange(tree.batch_size)[:, None], nodes.shape)

    def cond(carry):
        return jnp.any(carry[0] >= 0)

    def body(carry):
        node, visits, value_sum = carry
        target = jnp.where(node >= 0, node, tree.capacity)  # out of bounds: dropped
        visits = visits.at[rows, target].add(1, mode="drop")
        value_sum = value_sum.at[rows, target].add(values, mode="drop")
        parent = tree.parent[rows, jnp.maximum(node, 0)]
        return jnp.where((node >= 0) & along_path, parent, -1), visits, value_sum

    _, visits, value_sum = jax.lax.while_loop(cond, body, (nodes, tree.visits, tree.value_sum))
    return tree.replace(visits=visits, value_sum=value_sum)


def backup_children(tree: Tree, children: jax.Array, *, ppm_leaf_values: bool, propagate_failures: bool) -> Tree:
    """Apply every new child's contribution. children: [B, K] node ids from `insert` (-1 = none)."""
    rows = jnp.arange(tree.batch_size)[:, None]
    safe = jnp.maximum(children, 0)
    reason = tree.terminal_reason[rows, safe]  # [B, K]
    terminal = reason != NONE
    values = jnp.where(terminal, tree.reward[rows, safe], tree.init_value[rows, safe])
    contributes = (children >= 0) & (terminal | ppm_leaf_values)
    along_path = (reason == ANSWER) | (terminal & propagate_failures)
    return update(tree, jnp.where(contributes, children, -1), values, along_path)
