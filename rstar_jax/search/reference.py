"""Plain-Python MCTS over node objects, in the style of the rStar-Math reference code.

It implements the same semantics as the array kernels (`select`, `insert`, `backup`) one tree at a time,
and exists to check them: tests drive both with the same candidate streams and compare every node. The
benchmark `experiments.bench.tree` times it against the kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from rstar_jax.search.tree import ANSWER, DEAD_END, MAX_DEPTH, NONE


@dataclass
class Candidate:
    terminal_reason: int = NONE
    reward: float = 0.0  # the terminal's value
    init_value: float = math.nan  # PPM score
    text_index: int = -1


@dataclass(eq=False)
class Node:
    id: int
    parent: Node | None
    depth: int
    terminal_reason: int = NONE
    reward: float = 0.0
    init_value: float = math.nan
    text_index: int = -1
    children: list[Node] = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0

    @property
    def is_terminal(self) -> bool:
        return self.terminal_reason != NONE

    def q_value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def uct(self, c: float, unvisited: str) -> float:
        if self.visits == 0 and unvisited == "inf":
            return math.inf
        parent_visits = self.parent.visits
        if self.visits == 0 or parent_visits == 0:
            return self.q_value()
        return self.q_value() + c * math.sqrt(math.log(parent_visits) / self.visits)

    def update(self, value: float) -> None:
        self.visits += 1
        self.value_sum += value

    def update_recursive(self, value: float) -> None:
        node = self
        while node is not None:
            node.update(value)
            node = node.parent


class ReferenceTree:
    """One problem's tree and its rollout cursor."""

    def __init__(self, *, max_depth: int, capacity: int, c: float = 2.0, unvisited: str = "zero",
                 ppm_leaf_values: bool = False, propagate_failures: bool = False, root_text_index: int = -1,
                 score_fn: Callable[[float, int, int, float], float] | None = None):
        """score_fn: another selection rule, a child's score from (q, visits, parent visits, init_value), the
        scalar form of the kernels' `select.ScoreFn`; None: UCT with `c` and `unvisited`."""
        self.max_depth, self.capacity, self.c, self.unvisited = max_depth, capacity, c, unvisited
        self.score_fn = score_fn
        self.ppm_leaf_values, self.propagate_failures = ppm_leaf_values, propagate_failures
        self.root = Node(0, None, 0, text_index=root_text_index)
        self.nodes = [self.root]
        self.cursor: Node | None = self.root
        self.rollouts_done = 0

    def _select_child(self, node: Node) -> Node | None:
        best, best_score = None, -math.inf
        for child in node.children:
            if child.is_terminal:
                continue
            score = (child.uct(self.c, self.unvisited) if self.score_fn is None
                     else self.score_fn(child.q_value(), child.visits, node.visits, child.init_value))
            if best is None or score > best_score:  # first maximum wins ties
                best, best_score = child, score
        return best

    def _descend(self, node: Node | None) -> Node | None:
        if node is None or node.is_terminal:
            return None
        while node.children:
            child = self._select_child(node)
            if child is None:  # only terminal children: the node is terminal too
                node.terminal_reason = DEAD_END
                return None
            node = child
        return node

    def select(self, rollout_limit: int) -> Node | None:
        """The leaf to expand next (the new cursor), or None once the tree is finished."""
        if self.cursor is None:
            return None
        leaf = self._descend(self.cursor)
        while leaf is None:  # the rollout is over; a descent from the root that ends in a dead end spends one too
            self.rollouts_done += 1
            if self.rollouts_done >= rollout_limit or self.root.is_terminal:
                break
            leaf = self._descend(self.root)
        self.cursor = leaf
        return leaf

    def expand(self, leaf: Node, candidates: list[Candidate]) -> list[Node]:
        """Add the candidates as children of `leaf`, then back up their values."""
        if not candidates or len(self.nodes) + len(candidates) > self.capacity:
            leaf.terminal_reason = DEAD_END
            return []
        children = []
        for cand in candidates:
            child = Node(len(self.nodes), leaf, leaf.depth + 1, cand.terminal_reason, cand.reward, cand.init_value,
                         cand.text_index)
            if not child.is_terminal and child.depth > self.max_depth:
                child.terminal_reason, child.reward = MAX_DEPTH, -1.0
            leaf.children.append(child)
            self.nodes.append(child)
            children.append(child)
        for child in children:
            if child.terminal_reason == ANSWER or (child.is_terminal and self.propagate_failures):
                child.update_recursive(child.reward)
            elif child.is_terminal:
                child.update(child.reward)
            elif self.ppm_leaf_values:
                child.update(child.init_value)
        return children
