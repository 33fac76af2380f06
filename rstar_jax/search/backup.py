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


def backup_children(tree: Tree, children: jax.Array, *, ppm_leaf_values: bool, propagate_failures: bool) -> Tree:
    """Apply every new child's contribution. children: [B, K] node ids from `insert` (-1 = none).

    Each contributing child is updated on itself; the children that go on along their path all share one
    parent (the expanded leaf), so that path is walked once per tree with their count and summed value.
    """
    b = tree.batch_size
    rows = jnp.arange(b)
    safe = jnp.maximum(children, 0)
    reason = tree.terminal_reason[rows[:, None], safe]  # [B, K]
    terminal = reason != NONE
    values = jnp.where(terminal, tree.reward[rows[:, None], safe], tree.init_value[rows[:, None], safe])
    contributes = (children >= 0) & (terminal | ppm_leaf_values)
    along_path = contributes & ((reason == ANSWER) | (terminal & propagate_failures))
    target = jnp.where(contributes, children, tree.capacity)  # out of bounds: dropped
    visits = tree.visits.at[rows[:, None], target].add(1, mode="drop")
    value_sum = tree.value_sum.at[rows[:, None], target].add(values, mode="drop")
    count = along_path.sum(axis=1, dtype=jnp.int32)  # [B]
    total = jnp.where(along_path, values, 0.0).sum(axis=1)  # [B]

    def cond(carry):
        return jnp.any(carry[0] >= 0)

    def body(carry):
        node, visits, value_sum = carry
        target = jnp.where(node >= 0, node, tree.capacity)
        visits = visits.at[rows, target].add(count, mode="drop")
        value_sum = value_sum.at[rows, target].add(total, mode="drop")
        return jnp.where(node >= 0, tree.parent[rows, jnp.maximum(node, 0)], -1), visits, value_sum

    start = jnp.where(count > 0, tree.parent[rows, safe[:, 0]], -1)  # [B] the expanded leaf
    _, visits, value_sum = jax.lax.while_loop(cond, body, (start, visits, value_sum))
    return tree.replace(visits=visits, value_sum=value_sum)
