"""Training losses: the policy's response-only next-token loss and the reward models' losses.

Each `*_sums` function returns an unnormalised sum plus what it is normalised by, so the trainer can
add microbatches (gradient accumulation) and divide once by the whole batch's normaliser: the result is
exactly the full batch's loss, whatever the split.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _shifted_targets(tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets, weights) [B, T]: position t predicts token t+1; the last column is a dummy of weight 0.

    The targets are shifted rather than the logits sliced: a slice of [B, T, V] logits is a full copy (and
    its gradient a pad).
    """
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(jnp.float32)
    return targets, weights


def _nll_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Sum of weighted NLL. logits [..., V]; targets, weights [...]."""
    logits = logits.astype(jnp.float32)
    # logsumexp minus the target logit: no [..., V] log-softmax tensor is kept for the backward pass.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * weights)


def masked_lm_sums(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over the targets `loss_mask` marks, number of targets).

    logits: [B, T, V] for inputs tokens[:, :T]; tokens: [B, T]; loss_mask: [B, T] (1 where tokens[:, t]
    is a target, i.e. a response token).
    """
    targets, weights = _shifted_targets(tokens, loss_mask)
    return _nll_sum(logits, targets, weights), jnp.sum(weights)


def chunked_lm_sums(hidden: jax.Array, lm_head: Callable[[jax.Array], jax.Array], tokens: jax.Array,
                    loss_mask: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`masked_lm_sums(lm_head(hidden), ...)` without ever holding the [B, T, V] logits.

    The positions go through the LM head `chunk` at a time (T padded to a multiple), and the backward pass
    recomputes each chunk's logits, so only one chunk's [B, chunk, V] logits are live: for a 152k
    vocabulary they are the largest tensors of a step. hidden: [B, T, D]; lm_head: [N, D] -> [N, V].
    """
    b, t, d = hidden.shape
    targets, weights = _shifted_targets(tokens, loss_mask)
    pad = -t % chunk
    n = (t + pad) // chunk

    def split(x):  # [B, T, ...] -> [n, B, chunk, ...]: the batch axis (and its sharding) stays put
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_sum(h, tgt, w):  # [B, chunk, D], [B, chunk], [B, chunk]
        return _nll_sum(lm_head(h.reshape(b * chunk, d)).reshape(b, chunk, -1), tgt, w)

    total, _ = jax.lax.scan(lambda acc, xs: (acc + chunk_sum(*xs), None), jnp.zeros((), jnp.float32),
                            (split(hidden), split(targets), split(weights)))
    return total, jnp.sum(weights)


def masked_lm_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over the positions `loss_mask` marks (the response tokens).

    logits: [B, T, V] fp32 for inputs tokens[:, :T]; tokens: [B, T]; loss_mask: [B, T] (1 where
    tokens[:, t] is a target). Returns (mean loss, number of target tokens).
    """
    total, count = masked_lm_sums(logits, tokens, loss_mask)
    return total / jnp.maximum(count, 1.0), count


def pair_weights(pos_count: jax.Array, neg_count: jax.Array) -> jax.Array:
    """rStar Eq. 4's per-pair weight 1 / (pos_count * neg_count), the counts selected before the margin and
    edit-distance filters: a step counts once, or by the fraction of its pairs kept. [P] -> [P]."""
    return 1.0 / (pos_count * neg_count).astype(jnp.float32)


def pairwise_preference_loss(r_pos: jax.Array, r_neg: jax.Array, pos_count: jax.Array,
                             neg_count: jax.Array) -> jax.Array:
    """Bradley-Terry loss of rStar Eq. 4, summed over pairs like the reference.

    Each pair is weighted 1 / (pos_count * neg_count): a step with 2 x 2 pairs counts as much as one
    with a single pair. All arguments: [P].
    """
    return -jnp.sum(pair_weights(pos_count, neg_count) * jax.nn.log_sigmoid(r_pos - r_neg))


def pairwise_preference_sums(r_pos: jax.Array, r_neg: jax.Array, pos_count: jax.Array, neg_count: jax.Array,
                             valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(weighted Bradley-Terry sum, sum of weights) over the valid pairs.

    Their ratio is the weighted mean: the mean over steps of each step's mean pair loss (a step whose pairs
    were partly filtered out weighs less), independent of the batch size (the reference's plain sum grows with
    it). All arguments: [P]; valid: bool.
    """
    w = jnp.where(valid, pair_weights(pos_count, neg_count), 0.0)  # [P]
    return -jnp.sum(w * jax.nn.log_sigmoid(r_pos - r_neg)), jnp.sum(w)


def squared_error_sums(pred: jax.Array, target: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of squared errors, number of valid rows): the PQM's regression on Q values. [B] each."""
    err = jnp.where(valid, pred - target.astype(jnp.float32), 0.0)
    return jnp.sum(err * err), jnp.sum(valid.astype(jnp.float32))


def binary_cross_entropy_sums(logit: jax.Array, label: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of BCE of sigmoid(logit) against label in {0, 1}, number of valid rows): the ORM. [B] each."""
    label = label.astype(jnp.float32)
    # -[y log s(x) + (1-y) log s(-x)], in the numerically stable log-sigmoid form.
    bce = -(label * jax.nn.log_sigmoid(logit) + (1.0 - label) * jax.nn.log_sigmoid(-logit))
    return jnp.sum(jnp.where(valid, bce, 0.0)), jnp.sum(valid.astype(jnp.float32))
