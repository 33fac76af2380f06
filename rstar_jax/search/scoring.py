"""Batched reward-model scoring of partial solutions (the PPM, or a PQM/ORM of the same shape)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rstar_jax.kv_store import StoredContext, store_for
from rstar_jax.models.ppm import PPM, search_score
from rstar_jax.models.qwen2 import KVCache, SharedPrefix, positions_from_mask
from rstar_jax.sampling import DEFAULT_PROMPT_BUCKETS, ConcurrentMap, default_concurrent_calls

BUCKETS = tuple(b for b in DEFAULT_PROMPT_BUCKETS if b >= 64)  # texts: whole prompts + paths
SUFFIX_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Stored contexts are only attended to, so padding them costs little: coarse buckets, fewer programs.
CONTEXT_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Scorer:
    """`score(texts)` -> tanh(raw / score_scale) per text (the model's scale: 5 for the reference's head, 1
    for the paper's), the value MCTS sees, from one jitted forward per bucket.

    Texts longer than `max_tokens` keep their tail: the newest step is what is being scored (the reference
    truncated the tail away).
    """

    def __init__(self, model: PPM, encode, *, pad_id: int = 0, max_tokens: int = 4096, batch: int = 32,
                 group_rows: int = 128, min_group: float = 4.0, concurrent_calls: int | None = None,
                 cache_mib: float = 0):
        """concurrent_calls: forwards (of `batch` texts, or of `group_rows` rows) run at once in parallel
        threads (default: `default_concurrent_calls()`, 2 on CPU). The batches do not depend on it, so
        neither do the scores, to the bit: a different batch shape could change a score's last bit.
        cache_mib: host memory for the `ContextStore` of `score_children` (0: none, `score_groups` instead)."""
        self.store = store_for(cache_mib)
        self.graphdef, self.params = nnx.split(model)
        self.encode, self.pad_id, self.max_tokens, self.batch = encode, pad_id, max_tokens, batch
        self.group_rows = group_rows  # continuation rows per `score_groups` forward
        # `score_groups` shares prefixes only when groups average this many texts: below it, the padding to
        # a common group size and the extra programs cost more than the shared prefix saves.
        self.min_group = min_group
        self._forward = jax.jit(self._forward_impl)
        self._forward_groups = jax.jit(self._forward_groups_impl)
        self._context_kv = jax.jit(self._context_kv_impl)
        self._continue = jax.jit(self._continue_impl)
        self._map = ConcurrentMap(default_concurrent_calls() if concurrent_calls is None else concurrent_calls,
                                  "scorer")

    def _run_all(self, forward, batches: list[tuple]) -> list[np.ndarray]:
        """forward(params, *arrays) of every batch, as numpy, several at once when threads are allowed."""
        run = lambda arrays: np.asarray(forward(self.params, *map(jnp.asarray, arrays)))
        return self._map(run, batches)

    def _forward_impl(self, params, tokens, mask):
        model = nnx.merge(self.graphdef, params)
        return search_score(model(tokens, mask), model.score_scale)  # [R]

    def _context_kv_impl(self, params, tokens, mask):
        """tokens, mask: [B, P] left-padded -> keys/values [2, L, B, G, P, Dh] (rotary positions from 0)."""
        model = nnx.merge(self.graphdef, params)
        b, p = tokens.shape
        _, cache = model.backbone(tokens, positions_from_mask(mask), mask, KVCache.zeros(model.config, b, p))
        return jnp.stack([jnp.stack(cache.k), jnp.stack(cache.v)])

    def _continue_impl(self, params, prefix_kv, prefix_mask, rest, rest_mask):
        """prefix_kv: [2, L, B, G, P, Dh] with prefix_mask [B, P], each group's context; rest, rest_mask:
        [B*n, S] left-padded, rows b*n .. b*n+n-1 continuing context b, whose keys the n rows share
        (`SharedPrefix`, as in sampling). Returns the [B*n] scores at each row's last token and the rows' own
        keys/values [2, L, B*n, G, S, Dh]."""
        model = nnx.merge(self.graphdef, params)
        b, rows = prefix_mask.shape[0], rest.shape[0]
        shared = SharedPrefix(k=tuple(prefix_kv[0]), v=tuple(prefix_kv[1]), valid=prefix_mask)
        start = jnp.repeat(jnp.sum(prefix_mask, axis=-1, dtype=jnp.int32), rows // b)  # [B*n] first own position
        hidden, cache = model.backbone(rest, start[:, None] + positions_from_mask(rest_mask), rest_mask,
                                       KVCache.zeros(model.config, rows, rest.shape[1]).replace(prefix=shared))
        # Left padding: every row's last token is at S-1.
        return (search_score(model.v_head(hidden[:, -1]), model.score_scale),
                jnp.stack([jnp.stack(cache.k), jnp.stack(cache.v)]))

    def _forward_groups_impl(self, params, prefix, prefix_mask, rest, rest_mask):
        """The prefix [B, P] runs once for its n rows of rest [B*n, S]: [B*n] scores."""
        kv = self._context_kv_impl(params, prefix, prefix_mask)
        return self._continue_impl(params, kv, prefix_mask, rest, rest_mask)[0]

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

    def score_children(self, contexts: Sequence[str], steps: Sequence[Sequence[str]],
                       keep: Sequence[Sequence[bool]] | None = None) -> list[np.ndarray]:
        """`score(context + step)` for the steps of each context (an MCTS leaf's prompt + path and its new
        children), one array per context. With a store, a context's keys/values come from it (computed and
        stored on a miss), so only the steps run, and a step with `keep` true (a child that may be expanded
        later) has its own stored. Same values as `score` up to float rounding; a text whose tokens do not
        extend its context's (a merge across the boundary), or that is longer than `max_tokens`, is scored
        whole. Without a store: `score_groups`."""
        if self.store is None:
            return self.score_groups([[c + s for s in ss] for c, ss in zip(contexts, steps)])
        out = [np.zeros(len(ss), np.float32) for ss in steps]
        entries, children, whole = {}, {}, []  # children: group -> [(step index, full ids)]
        missing = {}  # group -> context ids, keys/values not stored
        for g, (ctx, ss) in enumerate(zip(contexts, steps)):
            if not ss:
                continue
            entry = self.store.get(ctx)
            ctx_ids = entry.ids if entry is not None else np.asarray(self.encode(ctx), np.int32)
            for j, step in enumerate(ss):
                ids = np.asarray(self.encode(ctx + step), np.int32)
                if 0 < len(ctx_ids) < len(ids) <= self.max_tokens and np.array_equal(ids[:len(ctx_ids)], ctx_ids):
                    children.setdefault(g, []).append((j, ids))
                else:
                    whole.append((g, j, ids[-self.max_tokens:]))
            if g in children:
                if entry is None:
                    missing[g] = ctx_ids
                else:
                    entries[g] = entry
        for g, entry in zip(missing, self._contexts([contexts[g] for g in missing], list(missing.values()))):
            self.store.put(entry)
            entries[g] = entry
        if whole:
            for (g, j, _), v in zip(whole, self._score_ids([ids for _, _, ids in whole])):
                out[g][j] = v
        if not children:
            return out
        # A forward's contexts have n rows each (a power of two): contexts with as many children share forwards,
        # so few rows are filler; similar context lengths share a bucket.
        rows_per = {g: 1 << (len(c) - 1).bit_length() for g, c in children.items()}
        live = sorted(children, key=lambda g: (rows_per[g], len(entries[g].ids)))
        chunks = []
        for g in live:
            n = rows_per[g]
            if not chunks or rows_per[chunks[-1][0]] != n or len(chunks[-1]) >= max(1, self.group_rows // n):
                chunks.append([])
            chunks[-1].append(g)
        batches = [self._continuation_batch([entries[g] for g in chunk], [children[g] for g in chunk],
                                            rows_per[chunk[0]]) for chunk in chunks]
        run = lambda arrays: jax.tree.map(np.asarray, self._continue(self.params, *map(jnp.asarray, arrays)))
        for chunk, (values, own_kv) in zip(chunks, self._map(run, batches)):
            n, s = rows_per[chunk[0]], own_kv.shape[4]
            for b, g in enumerate(chunk):
                for r, (j, ids) in enumerate(children[g]):
                    out[g][j] = values[b * n + r]
                    if keep is None or keep[g][j]:
                        own = own_kv[:, :, b * n + r, :, s - (len(ids) - len(entries[g].ids)):].copy()
                        self.store.put(StoredContext(contexts[g] + steps[g][j], ids, own, parent=entries[g]))
        return out

    def _contexts(self, texts: Sequence[str], ids: Sequence[np.ndarray]) -> list[StoredContext]:
        """Keys/values of each text's tokens `ids`, in batches of `batch` of similar length."""
        order = np.argsort([len(x) for x in ids], kind="stable")
        chunks = [order[i:i + self.batch] for i in range(0, len(ids), self.batch)]
        batches = []
        for chunk in chunks:
            width, rows = _bucket(max(len(ids[i]) for i in chunk), BUCKETS), 1 << (len(chunk) - 1).bit_length()
            tokens, mask = np.full((rows, width), self.pad_id, np.int32), np.zeros((rows, width), bool)
            for r, i in enumerate(chunk):
                tokens[r, width - len(ids[i]):], mask[r, width - len(ids[i]):] = ids[i], True
            mask[len(chunk):, -1] = True  # filler rows
            batches.append((tokens, mask))
        out = [None] * len(ids)
        for chunk, kv in zip(chunks, self._run_all(self._context_kv, batches)):
            for r, i in enumerate(chunk):
                out[i] = StoredContext(texts[i], ids[i], kv[:, :, r, :, kv.shape[4] - len(ids[i]):].copy())
        return out

    def _continuation_batch(self, contexts: Sequence[StoredContext], children: Sequence[Sequence[tuple[int, np.ndarray]]],
                            n: int) -> tuple[np.ndarray, ...]:
        """`_continue`'s inputs: the contexts' stored keys/values left-padded to a common bucket, and n rows per
        context holding each child's tokens after its context (filler rows and groups padded)."""
        # Powers of two from 32 rows: few programs, little filler.
        b = max(1 << (len(contexts) - 1).bit_length(), 32 // n)
        p = _bucket(max(len(c.ids) for c in contexts), CONTEXT_BUCKETS)
        s = _bucket(max(len(ids) - len(c.ids) for c, kids in zip(contexts, children) for _, ids in kids),
                    SUFFIX_BUCKETS)
        two, layers, heads, _, head_dim = contexts[0].kv.shape
        prefix_kv = np.zeros((two, layers, b, heads, p, head_dim), contexts[0].kv.dtype)
        prefix_mask = np.zeros((b, p), bool)
        prefix_mask[len(contexts):, -1] = True  # filler groups: one real slot keeps their attention defined
        rest, rest_mask = np.full((b * n, s), self.pad_id, np.int32), np.zeros((b * n, s), bool)
        for g, (c, kids) in enumerate(zip(contexts, children)):
            t = len(c.ids)
            c.write_kv(prefix_kv[:, :, g], p)
            prefix_mask[g, p - t:] = True
            for r, (_, ids) in enumerate(kids):
                tail = ids[t:]
                rest[g * n + r, s - len(tail):], rest_mask[g * n + r, s - len(tail):] = tail, True
        return prefix_kv, prefix_mask, rest, rest_mask


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
