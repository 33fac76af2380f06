"""Batched reward-model scoring of partial solutions (the PPM, or a PQM/ORM of the same shape)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rstar_jax.models.ppm import PPM, search_score
from rstar_jax.models.qwen2 import KVCache, SharedPrefix, positions_from_mask
from rstar_jax.sampling import DEFAULT_PROMPT_BUCKETS, ConcurrentMap, default_concurrent_calls

BUCKETS = tuple(b for b in DEFAULT_PROMPT_BUCKETS if b >= 64)  # texts: whole prompts + paths
SUFFIX_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Scorer:
    """`score(texts)` -> tanh(raw / 5) per text, the value MCTS sees, from one jitted forward per bucket.

    Texts longer than `max_tokens` keep their tail: the newest step is what is being scored (the reference
    truncated the tail away).
    """

    def __init__(self, model: PPM, encode, *, pad_id: int = 0, max_tokens: int = 4096, batch: int = 32,
                 group_rows: int = 128, min_group: float = 4.0, concurrent_calls: int | None = None):
        """concurrent_calls: forwards (of `batch` texts, or of `group_rows` rows) run at once in parallel
        threads (default: `default_concurrent_calls()`, 2 on CPU). The batches do not depend on it, so
        neither do the scores, to the bit: a different batch shape could change a score's last bit."""
        self.graphdef, self.params = nnx.split(model)
        self.encode, self.pad_id, self.max_tokens, self.batch = encode, pad_id, max_tokens, batch
        self.group_rows = group_rows  # continuation rows per `score_groups` forward
        # `score_groups` shares prefixes only when groups average this many texts: below it, the padding to
        # a common group size and the extra programs cost more than the shared prefix saves.
        self.min_group = min_group
        self._forward = jax.jit(self._forward_impl)
        self._forward_groups = jax.jit(self._forward_groups_impl)
        self._map = ConcurrentMap(default_concurrent_calls() if concurrent_calls is None else concurrent_calls,
                                  "scorer")

    def _run_all(self, forward, batches: list[tuple]) -> list[np.ndarray]:
        """forward(params, *arrays) of every batch, as numpy, several at once when threads are allowed."""
        run = lambda arrays: np.asarray(forward(self.params, *map(jnp.asarray, arrays)))
        return self._map(run, batches)

    def _forward_impl(self, params, tokens, mask):
        return search_score(nnx.merge(self.graphdef, params)(tokens, mask))  # [R]

    def _forward_groups_impl(self, params, prefix, prefix_mask, rest, rest_mask):
        """prefix, prefix_mask: [B, P] left-padded, each group's shared tokens; rest, rest_mask: [B*n, S]
        left-padded, rows b*n .. b*n+n-1 continuing prefix b. The prefix runs once, its keys shared by the n
        rows (`SharedPrefix`, as in sampling). Returns [B*n] scores at each row's last token."""
        model = nnx.merge(self.graphdef, params)
        backbone, cfg = model.backbone, model.config
        (b, p), (rows, s) = prefix.shape, rest.shape
        _, cache = backbone(prefix, positions_from_mask(prefix_mask), prefix_mask, KVCache.zeros(cfg, b, p))
        shared = SharedPrefix(k=cache.k, v=cache.v, valid=cache.valid)
        start = jnp.repeat(jnp.sum(prefix_mask, axis=-1, dtype=jnp.int32), rows // b)  # [B*n] first own position
        hidden, _ = backbone(rest, start[:, None] + positions_from_mask(rest_mask), rest_mask,
                             KVCache.zeros(cfg, rows, s).replace(prefix=shared))
        return search_score(model.v_head(hidden[:, -1]))  # left padding: every row's last token is at S-1

    def score(self, texts: Sequence[str]) -> np.ndarray:
        return self._score_ids([self.encode(t)[-self.max_tokens:] for t in texts])

    def _score_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        out = np.zeros(len(ids), np.float32)
        order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths share a bucket
        chunks, batches = [], []
        for start in range(0, len(ids), self.batch):
            chunk = order[start:start + self.batch]
            longest = max(len(ids[i]) for i in chunk)
            width = _bucket(longest, BUCKETS)
            rows = 1 << (len(chunk) - 1).bit_length()
            tokens = np.full((rows, width), self.pad_id, np.int32)  # [R, T] left-padded
            mask = np.zeros((rows, width), bool)
            for r, i in enumerate(chunk):
                tokens[r, width - len(ids[i]):] = ids[i]
                mask[r, width - len(ids[i]):] = True
            mask[len(chunk):, -1] = True  # filler rows
            chunks.append(chunk)
            batches.append((tokens, mask))
        for chunk, values in zip(chunks, self._run_all(self._forward, batches)):
            out[chunk] = values[:len(chunk)]
        return out

    def score_groups(self, groups: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """`score` of every text, for texts in groups that share a long beginning (the children of one MCTS
        leaf: the same prompt + path, a different step each): the common token prefix of a group is run once.

        Same values as `score` up to float rounding (texts tokenized whole, the same tail kept). Returns one
        array per group.
        """
        ids = [[self.encode(t)[-self.max_tokens:] for t in g] for g in groups]
        out = [np.zeros(len(g), np.float32) for g in ids]
        live = [k for k, g in enumerate(ids) if g]
        if not live:
            return out
        if sum(len(ids[k]) for k in live) < self.min_group * len(live):
            return np.split(self._score_ids([t for g in ids for t in g]), np.cumsum([len(g) for g in ids])[:-1])
        split = {k: _shared_length(ids[k]) for k in live}  # tokens of group k run once; each row keeps >= 1
        n = 1 << (max(len(ids[k]) for k in live) - 1).bit_length()  # rows per group, a power of two
        per_call = max(1, self.group_rows // n)
        live.sort(key=lambda k: split[k])  # similar prefix lengths share a bucket
        chunks, batches = [], []
        for start in range(0, len(live), per_call):
            chunk = live[start:start + per_call]
            b = 1 << (len(chunk) - 1).bit_length()
            p = _bucket(max(split[k] for k in chunk), BUCKETS)
            s = _bucket(max(len(t) - split[k] for k in chunk for t in ids[k]), SUFFIX_BUCKETS)
            prefix, prefix_mask = np.full((b, p), self.pad_id, np.int32), np.zeros((b, p), bool)
            rest, rest_mask = np.full((b * n, s), self.pad_id, np.int32), np.zeros((b * n, s), bool)
            prefix_mask[len(chunk):, -1] = True  # filler groups: one real token keeps their attention defined
            for g, k in enumerate(chunk):
                shared = ids[k][0][:split[k]]
                prefix[g, p - len(shared):], prefix_mask[g, p - len(shared):] = shared, True
                for j, t in enumerate(ids[k]):
                    tail = t[split[k]:]
                    rest[g * n + j, s - len(tail):], rest_mask[g * n + j, s - len(tail):] = tail, True
            chunks.append(chunk)
            batches.append((prefix, prefix_mask, rest, rest_mask))
        for chunk, values in zip(chunks, self._run_all(self._forward_groups, batches)):
            for g, k in enumerate(chunk):
                out[k] = values[g * n:g * n + len(ids[k])]
        return out


def _shared_length(ids: Sequence[Sequence[int]]) -> int:
    """Length of the common token prefix of `ids`, leaving every sequence at least one token of its own."""
    limit = min(len(t) for t in ids) - 1
    first = ids[0]
    for i in range(limit):
        if any(t[i] != first[i] for t in ids[1:]):
            return i
    return max(limit, 0)


def _bucket(length: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= length), length)
