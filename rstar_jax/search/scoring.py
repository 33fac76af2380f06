"""Batched reward-model scoring of partial solutions (the PPM, or a PQM/ORM of the same shape)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rstar_jax.models.ppm import PPM, search_score

BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)


class Scorer:
    """`score(texts)` -> tanh(raw / 5) per text, the value MCTS sees, from one jitted forward per bucket.

    Texts longer than `max_tokens` keep their tail: the newest step is what is being scored (the reference
    truncated the tail away).
    """

    def __init__(self, model: PPM, encode, *, pad_id: int = 0, max_tokens: int = 4096, batch: int = 32):
        self.graphdef, self.params = nnx.split(model)
        self.encode, self.pad_id, self.max_tokens, self.batch = encode, pad_id, max_tokens, batch
        self._forward = jax.jit(self._forward_impl)

    def _forward_impl(self, params, tokens, mask):
        return search_score(nnx.merge(self.graphdef, params)(tokens, mask))  # [R]

    def score(self, texts: Sequence[str]) -> np.ndarray:
        ids = [self.encode(t)[-self.max_tokens:] for t in texts]
        out = np.zeros(len(ids), np.float32)
        order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths share a bucket
        for start in range(0, len(ids), self.batch):
            chunk = order[start:start + self.batch]
            longest = max(len(ids[i]) for i in chunk)
            width = next((b for b in BUCKETS if b >= longest), longest)
            rows = 1 << (len(chunk) - 1).bit_length()
            tokens = np.full((rows, width), self.pad_id, np.int32)  # [R, T] left-padded
            mask = np.zeros((rows, width), bool)
            for r, i in enumerate(chunk):
                tokens[r, width - len(ids[i]):] = ids[i]
                mask[r, width - len(ids[i]):] = True
            mask[len(chunk):, -1] = True  # filler rows
            out[chunk] = np.asarray(self._forward(self.params, jnp.asarray(tokens), jnp.asarray(mask)))[:len(chunk)]
        return out
