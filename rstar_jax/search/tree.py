"""The search tree as fixed-capacity arrays, batched over B problems, and the kernel that grows it.

Node 0 of every tree is the root (the problem's prompt). The children of a node are written in one
`insert`, so they sit at consecutive indices `first_child .. first_child + num_children - 1`; the step
texts live on the host, addressed by `text_index`. All functions are pure: they take a `Tree` and return
a new one (jit them with the tree donated).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# terminal_reason codes. A node is terminal when it has a reason other than NONE.
NONE, ANSWER, EXEC_ERROR, MAX_DEPTH, NO_STOP, DEAD_END = range(6)
TERMINAL_REASONS = (None, "answer", "exec_error", "max_depth", "no_stop", "dead_end")  # index = code


@struct.dataclass
class Tree:
    parent: jax.Array  # [B, N] int32, -1 for the root and unused slots
    depth: jax.Array  # [B, N] int32, root 0
    first_child: jax.Array  # [B, N] int32, -1 until expanded
    num_children: jax.Array  # [B, N] int32
    visits: jax.Array  # [B, N] int32
    value_sum: jax.Array  # [B, N] float32
    init_value: jax.Array  # [B, N] float32, the PPM score at creation (nan without a PPM)
    terminal_reason: jax.Array  # [B, N] int32 code (NONE = not terminal)
    reward: jax.Array  # [B, N] float32, a terminal's value: graded +-1, -1 for failures, PPM at inference
    text_index: jax.Array  # [B, N] int32 index into the host-side step texts, -1 for none
    num_nodes: jax.Array  # [B] int32 nodes in use

    @property
    def batch_size(self) -> int:
        return self.parent.shape[0]

    @property
    def capacity(self) -> int:
        return self.parent.shape[1]

    @property
    def terminal(self) -> jax.Array:
        return self.terminal_reason != NONE  # [B, N]

    def q_values(self) -> jax.Array:
        """Q = value_sum / visits, 0 for unvisited nodes. [B, N] float32."""
        return jnp.where(self.visits > 0, self.value_sum / jnp.maximum(self.visits, 1), 0.0)


def empty(batch_size: int, capacity: int, root_text_index: jax.Array | None = None) -> Tree:
    """B trees holding only their root. root_text_index: [B] (default -1)."""
    shape = (batch_size, capacity)
    text_index = jnp.full(shape, -1, jnp.int32)
    if root_text_index is not None:
        text_index = text_index.at[:, 0].set(root_text_index)
    return Tree(parent=jnp.full(shape, -1, jnp.int32), depth=jnp.zeros(shape, jnp.int32),
                first_child=jnp.full(shape, -1, jnp.int32), num_children=jnp.zeros(shape, jnp.int32),
                visits=jnp.zeros(shape, jnp.int32), value_sum=jnp.zeros(shape, jnp.float32),
                init_value=jnp.full(shape, jnp.nan, jnp.float32), terminal_reason=jnp.zeros(shape, jnp.int32),
                reward=jnp.zeros(shape, jnp.float32), text_index=text_index,
                num_nodes=jnp.ones((batch_size,), jnp.int32))


def insert(tree: Tree, leaf: jax.Array, num_new: jax.Array, terminal_reason: jax.Array, reward: jax.Array,
           init_value: jax.Array, text_index: jax.Array, *, max_depth: int) -> tuple[Tree, jax.Array]:
    """Write the new children of every expanded leaf at once.

    leaf: [B] node to expand (-1: tree not expanded this step); num_new: [B] children to write (the first
    num_new of each row below are used); terminal_reason, reward, init_value, text_index: [B, K] per
    candidate child. A non-terminal child deeper than max_depth becomes a MAX_DEPTH terminal with reward -1 (the reference's
    `depth > max_depth`: a step at depth max_depth may still be expanded, e.g. into its answer).
    A leaf that gets no children (none given, or they would not fit in the capacity) becomes a DEAD_END.
    Returns the tree and the new children's node ids, [B, K] (-1 where none was written).
    """
    b, k = terminal_reason.shape
    rows = jnp.arange(b)
    expanding = leaf >= 0
    leaf_ = jnp.maximum(leaf, 0)
    fits = tree.num_nodes + num_new <= tree.capacity
    num_new = jnp.where(expanding & fits, num_new, 0)  # [B]
    slot = jnp.arange(k)[None, :]  # [1, K]
    ids = jnp.where(slot < num_new[:, None], tree.num_nodes[:, None] + slot, -1)  # [B, K]
    child_depth = tree.depth[rows, leaf_][:, None] + 1  # [B, 1]
    too_deep = (terminal_reason == NONE) & (child_depth > max_depth)
    reason = jnp.where(too_deep, MAX_DEPTH, terminal_reason)
    reward = jnp.where(too_deep, -1.0, reward)

    target = jnp.where(ids >= 0, ids, tree.capacity)  # unwritten children: out of bounds, dropped

    def put(field, values):
        return field.at[rows[:, None], target].set(jnp.broadcast_to(values, (b, k)), mode="drop")

    # Leaf updates are plain writes to out-of-bounds-or-leaf indices (no read of the old array after a
    # write, which would force XLA to copy the whole [B, N] array).
    grown = jnp.where(num_new > 0, leaf_, tree.capacity)
    failed = jnp.where(expanding & (num_new == 0), leaf_, tree.capacity)  # left childless: never expand again
    tree = tree.replace(
        parent=put(tree.parent, leaf[:, None]),
        depth=put(tree.depth, child_depth),
        terminal_reason=put(tree.terminal_reason, reason).at[rows, failed].set(DEAD_END, mode="drop"),
        reward=put(tree.reward, reward),
        init_value=put(tree.init_value, init_value),
        text_index=put(tree.text_index, text_index),
        first_child=tree.first_child.at[rows, grown].set(tree.num_nodes, mode="drop"),
        num_children=tree.num_children.at[rows, grown].set(num_new, mode="drop"),
        num_nodes=tree.num_nodes + num_new,
    )
    return tree, ids

