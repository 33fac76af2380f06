"""Keys/values of MCTS contexts (prompt + path) kept on the host, so a node's children reuse its parent's.

A node's context is its parent's plus one step: stored as the step's own keys/values and a pointer to the
parent's entry, a node costs only its step. The policy (generating a leaf's children) and the reward model
(scoring them) each keep one store of their own keys/values.
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np


@dataclasses.dataclass(eq=False)
class StoredContext:
    """A text's tokens and a model's keys/values of them: of its own last tokens (a node's step) here, of the
    tokens before in `parent` (its parent node's context)."""

    text: str
    ids: np.ndarray  # [T] int32, the whole text's
    kv: np.ndarray  # [2, L, G, t, Dh]: keys, values of ids[T - t:]
    parent: StoredContext | None = None  # holds ids[:T - t]

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.kv.nbytes

    def lineage(self) -> list[StoredContext]:
        """This context and its ancestors, the root last."""
        out = [self]
        while out[-1].parent is not None:
            out.append(out[-1].parent)
        return out

    def write_kv(self, out: np.ndarray, end: int, length: int | None = None) -> None:
        """Writes the keys/values of the first `length` tokens (default: all) into out [2, L, G, W, Dh] at
        slots end - length .. end - 1."""
        length = len(self.ids) if length is None else length
        stop = len(self.ids)  # the tokens an entry holds end where its descendant's begin
        for e in self.lineage():
            t = e.kv.shape[3]
            start = stop - t
            if start < length:
                take = min(stop, length) - start
                out[:, :, :, end - length + start:end - length + start + take] = e.kv[:, :, :, :take]
            stop = start


class ContextStore:
    """`StoredContext`s by text, the least recently used dropped past `budget_bytes`.

    A node's ancestors are always used more recently than it is, so the one dropped never has a stored
    descendant that would keep its memory alive: the budget is what is held.
    """

    def __init__(self, budget_bytes: int):
        self.budget, self.nbytes, self.hits, self.misses = budget_bytes, 0, 0, 0
        self._entries: collections.OrderedDict[str, StoredContext] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, text: str) -> StoredContext | None:
        entry = self._entries.get(text)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
            self._touch(entry)
        return entry

    def put(self, entry: StoredContext) -> None:
        """Stores `entry` unless its text is stored already or its parent is not (dropped, or never kept)."""
        if entry.parent is not None and self._entries.get(entry.parent.text) is not entry.parent:
            return
        if entry.text in self._entries or entry.nbytes > self.budget:
            return
        self._entries[entry.text] = entry
        self.nbytes += entry.nbytes
        self._touch(entry)
        while self.nbytes > self.budget:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes

    def _touch(self, entry: StoredContext) -> None:
        for e in entry.lineage():  # the root ends up the most recently used
            self._entries.move_to_end(e.text)


def store_for(cache_mib: float) -> ContextStore | None:
    """A store of `cache_mib` MiB, or None for 0."""
    return ContextStore(int(cache_mib * 2 ** 20)) if cache_mib > 0 else None
