"""Training losses against hand computations."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from rstar_jax.train.losses import chunked_lm_sums, masked_lm_loss, masked_lm_sums, pairwise_preference_loss


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


def test_chunked_lm_loss_equals_the_whole_one_in_value_and_gradients_and_holds_less():
    b, t, d, v = 2, 99, 16, 4096  # t not a multiple of the chunk: the last chunk is padded
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k1, (b, t, d))
    head = jax.random.normal(k2, (d, v)) / 4
    tokens = jax.random.randint(k3, (b, t), 0, v)
    loss_mask = jax.random.bernoulli(k4, 0.7, (b, t))

    def whole(hidden, head):
        return masked_lm_sums(jnp.einsum("btd,dv->btv", hidden, head), tokens, loss_mask)[0]

    def chunked(hidden, head):
        return chunked_lm_sums(hidden, lambda h: h @ head, tokens, loss_mask, chunk=8)[0]

    want, want_grads = jax.value_and_grad(whole, argnums=(0, 1))(hidden, head)
    got, got_grads = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, head)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert chunked_lm_sums(hidden, lambda h: h @ head, tokens, loss_mask, chunk=8)[1] == jnp.sum(loss_mask[:, 1:])

    def temp_bytes(fn):  # XLA's scratch memory of the compiled gradient
        return jax.jit(jax.grad(fn, argnums=(0, 1))).lower(hidden, head).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * v * 4
    assert temp_bytes(whole) >= logits_bytes > 4 * temp_bytes(chunked)  # about 2 chunks of logits live
