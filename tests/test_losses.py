"""Training losses against hand computations."""
import math

import jax.numpy as jnp
import numpy as np

from rstar_jax.train.losses import masked_lm_loss, pairwise_preference_loss


def test_masked_lm_loss_matches_hand_computation():
    # Two examples, vocab 3, 4 positions; only response positions (mask 1) are targets.
    logits = jnp.log(jnp.array([
        [[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]],
        [[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]],
    ]))
    tokens = jnp.array([[0, 1, 2, 0], [2, 2, 0, 1]])
    loss_mask = jnp.array([[0, 1, 1, 0], [0, 0, 1, 1]])
    # Position t predicts token t+1. Targets: ex0 token 1 from position 0 (p=0.25), token 2 from position 1
    # (p=0.1); ex1 token 0 from position 1 (p=0.3), token 1 from position 2 (p=0.3).
    expected = -(math.log(0.25) + math.log(0.1) + math.log(0.3) + math.log(0.3)) / 4
    loss, count = masked_lm_loss(logits, tokens, loss_mask)
    assert count == 4
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_pairwise_loss_weights_by_pair_counts():
    r_pos = jnp.array([1.0, 0.5, 2.0])
    r_neg = jnp.array([0.0, 1.0, -1.0])
    pos_count = jnp.array([2, 2, 1])
    neg_count = jnp.array([2, 2, 1])
    sig = lambda x: 1 / (1 + math.exp(-x))
    expected = -(math.log(sig(1.0)) / 4 + math.log(sig(-0.5)) / 4 + math.log(sig(3.0)))
    np.testing.assert_allclose(pairwise_preference_loss(r_pos, r_neg, pos_count, neg_count), expected, rtol=1e-6)
