"""Training losses: the policy's response-only next-token loss and the PPM's pairwise loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_lm_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over the positions `loss_mask` marks (the response tokens).

    logits: [B, T, V] fp32 for inputs tokens[:, :T]; tokens: [B, T]; loss_mask: [B, T] (1 where
    tokens[:, t] is a target). Returns (mean loss, number of target tokens).
    """
    targets = tokens[:, 1:]  # [B, T-1]: position t predicts token t+1
    weights = loss_mask[:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    count = jnp.sum(weights)
    return jnp.sum(nll * weights) / jnp.maximum(count, 1.0), count


def pairwise_preference_loss(r_pos: jax.Array, r_neg: jax.Array, pos_count: jax.Array,
                             neg_count: jax.Array) -> jax.Array:
    """Bradley-Terry loss of rStar Eq. 4, summed over pairs like the reference.

    Each pair is weighted 1 / (pos_count * neg_count): a step with 2 x 2 pairs counts as much as one
    with a single pair. All arguments: [P].
    """
    weight = 1.0 / (pos_count * neg_count).astype(jnp.float32)
    return -jnp.sum(weight * jax.nn.log_sigmoid(r_pos - r_neg))
