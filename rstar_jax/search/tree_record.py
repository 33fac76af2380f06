"""The tree record: one finished problem's search tree as the driver writes it, read back with typed access.

One JSON object per problem (JSONL, one per line)::

    {"problem_id": str, "prompt": str, "answer": str, "mode": "terminal" | "ppm" | "inference",
     "config_digest": str, "seed": int,
     "nodes": [{"id": int, "parent": int, "depth": int, "text": str, "visits": int, "value_sum": float,
                "init_value": float | null, "terminal_reason": null | "answer" | "exec_error" | "max_depth"
                | "no_stop" | "dead_end", "final_answer": str | null, "correct": bool | null,
                "error"?: str}, ...],
     "stats": {...}}

``prompt`` is the policy prompt (the root's context); a node's ``text`` is its step text including the stop tag
(``""`` for the root; a code-closing step already carries ``"\\n<output>...<end_of_output>\\n"``), so the
context of a node is ``prompt`` + the texts of its path. Node ``id`` equals its index in ``nodes``, the root is
node 0 (parent -1, depth 0) and every other node's parent has a smaller id. ``Q(node) = value_sum / visits``
(0.0 for an unvisited node). ``error``, only on ``exec_error`` nodes, is what the failed program raised
(``"Type: message"``, the reference's observation); the step's ``text`` does not show it.

Unknown fields (top level or per node) are kept in ``extra`` so that ``to_dict(from_dict(d)) == d``. Every
validation error names the problem id, the node id and the field; ``read_tree_records`` adds file and line.
Pure Python, no jax.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator

from absl import logging

from rstar_jax.errors import InputError

MODES = ("terminal", "ppm", "inference")
TERMINAL_REASONS = ("answer", "exec_error", "max_depth", "no_stop", "dead_end")
ROOT = 0

RECORD_FIELDS = ("problem_id", "prompt", "answer", "mode", "config_digest", "seed", "nodes", "stats")
NODE_FIELDS = ("id", "parent", "depth", "text", "visits", "value_sum", "init_value", "terminal_reason",
               "final_answer", "correct")
OPTIONAL_NODE_FIELDS = ("error",)  # written only when set


class TreeRecordError(InputError):
    """A bad tree record: where (file:line, problem, node, field) and what is wrong."""

    def __init__(self, reason: str, *, problem_id: str | None = None, node_id: int | None = None,
                 field: str | None = None, path: str | None = None, line: int | None = None):
        parts = []
        if path is not None:
            parts.append(f"{path}:{line}" if line is not None else path)
        if problem_id is not None:
            parts.append(f"problem {problem_id!r}")
        if node_id is not None:
            parts.append(f"node {node_id}")
        if field is not None:
            parts.append(f"field {field!r}")
        super().__init__(": ".join(parts + [reason]))
        self.reason, self.problem_id, self.node_id, self.field = reason, problem_id, node_id, field
        self.path, self.line = path, line

    def located(self, path: str, line: int) -> "TreeRecordError":
        """The same error with its file and line."""
        return TreeRecordError(self.reason, problem_id=self.problem_id, node_id=self.node_id, field=self.field,
                               path=path, line=line)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(eq=True)
class Node:
    """One tree node (see the module docstring for the fields' meaning)."""

    id: int
    parent: int
    depth: int
    text: str
    visits: int
    value_sum: float
    init_value: float | None = None
    terminal_reason: str | None = None
    final_answer: str | None = None
    correct: bool | None = None
    error: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # unknown fields, kept for the round trip

    @property
    def q(self) -> float:
        """value_sum / visits; 0.0 for an unvisited node."""
        return self.value_sum / self.visits if self.visits else 0.0

    @property
    def is_answer(self) -> bool:
        return self.terminal_reason == "answer"

    @classmethod
    def from_dict(cls, d: dict, *, problem_id: str | None = None, index: int | None = None) -> "Node":
        if not isinstance(d, dict):
            raise TreeRecordError(f"expected a JSON object, got {type(d).__name__}",
                                  problem_id=problem_id, node_id=index, field="nodes")
        for name in NODE_FIELDS:
            if name not in d:
                raise TreeRecordError("missing", problem_id=problem_id, node_id=index, field=name)
        values = {name: d[name] for name in NODE_FIELDS}
        for name in ("value_sum", "init_value"):  # JSON writes 0.0 as 0 sometimes; keep floats floats
            if _is_real(values[name]):
                values[name] = float(values[name])
        values.update({name: d[name] for name in OPTIONAL_NODE_FIELDS if name in d})
        extra = {k: v for k, v in d.items() if k not in NODE_FIELDS + OPTIONAL_NODE_FIELDS}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict:
        d = {name: getattr(self, name) for name in NODE_FIELDS}
        d.update({name: getattr(self, name) for name in OPTIONAL_NODE_FIELDS if getattr(self, name) is not None})
        d.update(self.extra)
        return d


def q(node: Node) -> float:
    """Q(node) = value_sum / visits (0.0 when visits == 0)."""
    return node.q


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """A root -> answer-node path, root excluded (``nodes[-1]`` is the answer node)."""

    nodes: tuple[Node, ...]

    @property
    def leaf(self) -> Node:
        return self.nodes[-1]

    @property
    def correct(self) -> bool | None:
        return self.leaf.correct

    @property
    def response(self) -> str:
        return "".join(node.text for node in self.nodes)

    @property
    def mean_q(self) -> float:
        return math.fsum(node.q for node in self.nodes) / len(self.nodes)

    @property
    def min_q(self) -> float:
        return min(node.q for node in self.nodes)

    @property
    def has_exec_error(self) -> bool:
        return any(node.terminal_reason == "exec_error" for node in self.nodes)


@dataclasses.dataclass
class TreeRecord:
    """One problem's finished tree; validated on construction (``TreeRecordError`` when bad)."""

    problem_id: str
    prompt: str
    answer: str
    mode: str
    config_digest: str
    seed: int
    nodes: list[Node]
    stats: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)  # unknown top-level fields
    _children: list[list[int]] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self._children = self.validate()

    # --- reading / writing ---------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict) -> "TreeRecord":
        if not isinstance(d, dict):
            raise TreeRecordError(f"expected a JSON object, got {type(d).__name__}")
        pid = d.get("problem_id")
        pid = pid if isinstance(pid, str) else None
        for name in RECORD_FIELDS:
            if name not in d:
                raise TreeRecordError("missing", problem_id=pid, field=name)
        if not isinstance(d["nodes"], list):
            raise TreeRecordError(f"expected a list, got {type(d['nodes']).__name__}", problem_id=pid,
                                  field="nodes")
        nodes = [Node.from_dict(n, problem_id=pid, index=i) for i, n in enumerate(d["nodes"])]
        extra = {k: v for k, v in d.items() if k not in RECORD_FIELDS}
        return cls(**{name: d[name] for name in RECORD_FIELDS if name != "nodes"}, nodes=nodes, extra=extra)

    def to_dict(self) -> dict:
        d = {name: getattr(self, name) for name in RECORD_FIELDS if name != "nodes"}
        d["nodes"] = [node.to_dict() for node in self.nodes]
        d.update(self.extra)
        return {name: d[name] for name in (*RECORD_FIELDS, *self.extra)}  # the format's field order

    def to_json(self) -> str:
        """One JSONL line (without the newline)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    # --- validation ----------------------------------------------------------------------------------------

    def validate(self) -> list[list[int]]:
        """Checks every field and the tree structure; returns the children lists (ids in ascending order)."""
        pid = self.problem_id if isinstance(self.problem_id, str) else None

        def fail(reason: str, field: str | None = None, node_id: int | None = None):
            raise TreeRecordError(reason, problem_id=pid, node_id=node_id, field=field)

        if not isinstance(self.problem_id, str) or not self.problem_id.strip():
            fail(f"expected a non-empty string, got {self.problem_id!r}", "problem_id")
        for name in ("prompt", "answer", "config_digest"):
            if not isinstance(getattr(self, name), str):
                fail(f"expected a string, got {type(getattr(self, name)).__name__}", name)
        if not self.prompt:
            fail("empty prompt", "prompt")
        if self.mode not in MODES:
            fail(f"expected one of {MODES}, got {self.mode!r}", "mode")
        if not _is_int(self.seed):
            fail(f"expected an integer, got {self.seed!r}", "seed")
        if not isinstance(self.stats, dict):
            fail(f"expected an object, got {type(self.stats).__name__}", "stats")
        if not isinstance(self.nodes, list) or not self.nodes:
            fail("expected a non-empty list of nodes (the root at least)", "nodes")

        children: list[list[int]] = [[] for _ in self.nodes]
        for index, node in enumerate(self.nodes):
            if not isinstance(node, Node):
                fail(f"expected a Node, got {type(node).__name__}", "nodes", index)

            def bad(reason: str, field: str):
                fail(reason, field, index)

            if not _is_int(node.id) or node.id != index:
                bad(f"expected {index} (the node's index in the list), got {node.id!r}", "id")
            if not isinstance(node.text, str):
                bad(f"expected a string, got {type(node.text).__name__}", "text")
            if not _is_int(node.parent) or not _is_int(node.depth):
                field = "parent" if not _is_int(node.parent) else "depth"
                bad(f"expected an integer, got {getattr(node, field)!r}", field)
            if index == ROOT:
                if node.parent != -1:
                    bad(f"the root's parent must be -1, got {node.parent}", "parent")
                if node.depth != 0:
                    bad(f"the root's depth must be 0, got {node.depth}", "depth")
                if node.text != "":
                    bad("the root's text must be empty (the prompt is the record's)", "text")
            else:
                if not 0 <= node.parent < index:
                    bad(f"expected a parent id in [0, {index}), got {node.parent}", "parent")
                parent = self.nodes[node.parent]
                if parent.terminal_reason == "answer":
                    bad(f"parent {node.parent} is an answer node (a leaf)", "parent")
                if node.depth != parent.depth + 1:
                    bad(f"expected {parent.depth + 1} (parent {node.parent}'s depth + 1), got {node.depth}",
                        "depth")
                children[node.parent].append(index)
            if not _is_int(node.visits) or node.visits < 0:
                bad(f"expected a non-negative integer, got {node.visits!r}", "visits")
            if not _is_real(node.value_sum) or not math.isfinite(node.value_sum):
                bad(f"expected a finite number, got {node.value_sum!r}", "value_sum")
            if node.init_value is not None and (not _is_real(node.init_value) or not math.isfinite(node.init_value)):
                bad(f"expected a finite number or null, got {node.init_value!r}", "init_value")
            if node.terminal_reason is not None and node.terminal_reason not in TERMINAL_REASONS:
                bad(f"expected null or one of {TERMINAL_REASONS}, got {node.terminal_reason!r}", "terminal_reason")
            if node.final_answer is not None and not isinstance(node.final_answer, str):
                bad(f"expected a string or null, got {node.final_answer!r}", "final_answer")
            if node.correct is not None and not isinstance(node.correct, bool):
                bad(f"expected true, false or null, got {node.correct!r}", "correct")
            if node.terminal_reason != "answer":
                if node.correct is not None:
                    bad(f"only answer nodes are graded (terminal_reason is {node.terminal_reason!r})", "correct")
                if node.final_answer is not None:
                    bad(f"only answer nodes have a final answer (terminal_reason is {node.terminal_reason!r})",
                        "final_answer")
            if node.error is not None and (not isinstance(node.error, str) or node.terminal_reason != "exec_error"):
                bad(f"expected a string on an exec_error node, got {node.error!r} (terminal_reason "
                    f"{node.terminal_reason!r})", "error")
            if not isinstance(node.extra, dict):
                bad(f"expected a dict, got {type(node.extra).__name__}", "extra")
        return children

    # --- tree helpers --------------------------------------------------------------------------------------

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id]

    def q(self, node_id: int) -> float:
        return self.nodes[node_id].q

    def children(self, node_id: int) -> list[Node]:
        """The node's children in id (insertion) order."""
        return [self.nodes[c] for c in self._children[node_id]]

    def child_ids(self, node_id: int) -> list[int]:
        return list(self._children[node_id])

    def path(self, node_id: int, *, include_root: bool = False) -> list[Node]:
        """The nodes from the root (excluded unless ``include_root``) down to ``node_id`` inclusive."""
        out = []
        n = node_id
        while n > ROOT:
            out.append(self.nodes[n])
            n = self.nodes[n].parent
        if include_root:
            out.append(self.nodes[ROOT])
        out.reverse()
        return out

    def path_text(self, node_id: int) -> str:
        """The concatenated step texts from the root to ``node_id`` (the response up to that node)."""
        return "".join(node.text for node in self.path(node_id))

    def answer_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.terminal_reason == "answer"]

    def trajectories(self) -> list[Trajectory]:
        """Every root -> answer-node path, in answer-node id order."""
        return [Trajectory(tuple(self.path(node.id))) for node in self.answer_nodes()]


def read_tree_records(path: str | os.PathLike) -> Iterator[TreeRecord]:
    """Stream the records of a JSONL tree file; errors carry ``file:line``.

    A malformed *last* line without a trailing newline is what a writer killed mid-line leaves behind: it is
    skipped with a warning. A malformed line anywhere else (or one that parses but is not a valid record) raises
    ``TreeRecordError``.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            complete = raw.endswith(b"\n")  # only the file's last line can lack it
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                d = json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                if not complete:
                    logging.warning("%s:%d: skipping a truncated last line (%d bytes; a writer killed "
                                    "mid-record?): %s", path, line_no, len(raw), e)
                    continue
                reason = (f"not UTF-8 at byte {e.start + 1}" if isinstance(e, UnicodeDecodeError)
                          else f"malformed JSON: {e.msg} at column {e.colno}")
                raise TreeRecordError(reason, path=path, line=line_no) from None
            try:
                yield TreeRecord.from_dict(d)
            except TreeRecordError as e:
                raise e.located(path, line_no) from None
