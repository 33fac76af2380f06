"""Reward-model losses inside their tasks, against hand computations; the optimizer schedule."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rstar_jax.models.ppm import ValueHead

from rstar_jax.train.optim import OptimConfig, make_optimizer, make_schedule
from rstar_jax.train.tasks import ORMTask, PPMTask, PQMTask
from tests.train_fixtures import CharTokenizer

sig = lambda x: 1 / (1 + math.exp(-x))


class FirstTokenScorer:
    """A stand-in reward model: the score of a sequence is its first token id / 10."""

    def __init__(self, score_scale=5.0):
        self.score_scale = score_scale

    def __call__(self, tokens, mask, head_dropout=None):
        assert head_dropout is None  # the tasks ask for dropout only in training with a rate > 0
        return tokens[:, 0].astype(jnp.float32) / 10


def _pair_batch():
    # Scores 1.0 vs 0.0 (weight 1/4), 0.5 vs 1.0 (weight 1/4), 2.0 vs -1.0 (weight 1), one padding row.
    return {"pos_tokens": jnp.array([[10], [5], [20], [30]]), "neg_tokens": jnp.array([[0], [10], [-10], [0]]),
            "pos_mask": jnp.ones((4, 1), bool), "neg_mask": jnp.ones((4, 1), bool),
            "pos_count": jnp.array([2, 2, 1, 1]), "neg_count": jnp.array([2, 2, 1, 1]),
            "valid": jnp.array([True, True, True, False])}


def test_pairwise_loss_weights_and_normaliser_by_hand():
    task = PPMTask(CharTokenizer(), 8)
    batch = _pair_batch()
    total, metrics = task.loss_sums(FirstTokenScorer(), batch)
    expected = -(math.log(sig(1.0)) / 4 + math.log(sig(-0.5)) / 4 + math.log(sig(3.0)))
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    np.testing.assert_allclose(task.normalizer(batch), 1 / 4 + 1 / 4 + 1, rtol=1e-6)  # padding row excluded
    hits, count = metrics["accuracy"]
    assert (float(hits), float(count)) == (2.0, 3.0)


def test_the_papers_head_compares_bounded_scores():
    """--score_head=paper: the loss on tanh(raw) (the model's scale 1), what the search then reads."""
    task = PPMTask(CharTokenizer(), 8, bounded=True)
    total, metrics = task.loss_sums(FirstTokenScorer(score_scale=1.0), _pair_batch())
    t = math.tanh
    expected = -(math.log(sig(t(1.0) - t(0.0))) / 4 + math.log(sig(t(0.5) - t(1.0))) / 4
                 + math.log(sig(t(2.0) - t(-1.0))))
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert float(metrics["accuracy"][0]) == 2.0


def test_pqm_mse_on_bounded_score_and_orm_bce_by_hand():
    batch = {"tokens": jnp.array([[10], [-5], [7]]), "mask": jnp.ones((3, 1), bool),
             "q": jnp.array([0.5, -1.0, 0.0]), "correct": jnp.array([1.0, 1.0, 0.0]),
             "valid": jnp.array([True, True, False])}
    total, _ = PQMTask(CharTokenizer(), 8).loss_sums(FirstTokenScorer(), batch)
    expected = (math.tanh(1.0 / 5) - 0.5) ** 2 + (math.tanh(-0.5 / 5) + 1.0) ** 2
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    total, metrics = ORMTask(CharTokenizer(), 8).loss_sums(FirstTokenScorer(), batch)
    np.testing.assert_allclose(total, -(math.log(sig(1.0)) + math.log(sig(-0.5))), rtol=1e-6)
    assert float(metrics["accuracy"][0]) == 1.0  # row 0 right, row 1 wrong, row 2 padding


@pytest.mark.parametrize("schedule, mid, end", [("linear", 0.5, 0.0), ("cosine", 0.5, 0.0), ("constant", 1.0, 1.0)])
def test_schedule_warms_up_then_decays(schedule, mid, end):
    f = make_schedule(OptimConfig(learning_rate=1.0, schedule=schedule, warmup_steps=10), total_steps=110)
    assert float(f(0)) == 0.0 and float(f(5)) == pytest.approx(0.5) and float(f(10)) == pytest.approx(1.0)
    assert float(f(60)) == pytest.approx(mid, abs=1e-6) and float(f(110)) == pytest.approx(end, abs=1e-6)


def test_clipping_scales_the_gradient_before_adam():
    """max_grad_norm: the updates are plain AdamW's on g * min(1, max_grad_norm / |g|). Adam's first update is
    scale-free (sign-like), so a second, unclipped gradient shows what clipping the first changed."""
    params = {"w": jnp.ones((2, 2))}
    grads = [{"w": jnp.full((2, 2), 2.5)}, {"w": jnp.array([[0.1, -0.2], [0.05, 0.0]])}]  # global norms 5, 0.23

    def updates(max_grad_norm, grads):
        tx, _ = make_optimizer(OptimConfig(learning_rate=0.1, schedule="constant", max_grad_norm=max_grad_norm),
                               total_steps=10)
        state, out = tx.init(params), []
        for g in grads:
            u, state = tx.update(g, state, params)
            out.append(np.asarray(u["w"]))
        return out  # [steps] of [2, 2]

    by_hand = [{"w": grads[0]["w"] / 5}, grads[1]]  # clipped to norm 1; the second is under it
    clipped, unclipped = updates(1.0, grads), updates(0, grads)
    for got, want in zip(clipped, updates(0, by_hand), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for got, want in zip(updates(1e6, grads), unclipped, strict=True):  # a bound never reached changes nothing
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.abs(clipped[1] - unclipped[1]).max() > 0.01  # vs an update of ~0.1: clipping was not a no-op


def test_weight_decay_skips_biases_and_norms_but_not_the_value_head_weight():
    tx, _ = make_optimizer(OptimConfig(learning_rate=0.1, weight_decay=0.5, max_grad_norm=0), total_steps=10)
    params = {"w": jnp.ones((2, 2)), "bias": jnp.ones((2,)), "norm": {"weight": jnp.ones((2,))},
              "v_head": {"weight": jnp.ones((2,)), "bias": jnp.ones(())}}  # HF: v_head.summary.weight [1, D]
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    decayed = -0.1 * 0.5 * np.ones(2)  # zero gradients: the update is the decay alone
    np.testing.assert_allclose(updates["w"], np.stack([decayed, decayed]), rtol=1e-6)
    np.testing.assert_allclose(updates["v_head"]["weight"], decayed, rtol=1e-6)
    for no_decay in (updates["bias"], updates["norm"]["weight"], updates["v_head"]["bias"]):
        np.testing.assert_allclose(no_decay, 0.0)


def test_weight_decay_on_the_real_ppm_skips_its_2d_attention_biases():
    from rstar_jax.models import PPM, preset
    tx, _ = make_optimizer(OptimConfig(learning_rate=0.1, weight_decay=0.5, max_grad_norm=0), total_steps=10)
    params = jax.tree.map(jnp.ones_like, nnx.to_pure_dict(nnx.state(PPM(preset("tiny"), rngs=nnx.Rngs(0)), nnx.Param)))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    attn = updates["backbone"]["layers"][0]["self_attn"]
    assert attn["q_bias"].ndim == 2  # [heads, head_dim]: a rank rule alone would decay it
    for name in ("q_bias", "k_bias", "v_bias"):
        np.testing.assert_allclose(attn[name], 0.0)
    np.testing.assert_allclose(updates["backbone"]["layers"][0]["input_layernorm"]["weight"], 0.0)
    np.testing.assert_allclose(attn["q_proj"], -0.05, rtol=1e-6)
    np.testing.assert_allclose(updates["v_head"]["weight"], -0.05, rtol=1e-6)


def test_value_head_dropout_zeroes_and_rescales_its_input():
    head = ValueHead(1000, nnx.Rngs(0))
    head.weight[...], head.bias[...] = jnp.ones(1000), jnp.zeros(())
    hidden = jnp.ones((4, 1000))
    np.testing.assert_allclose(head(hidden), 1000.0, rtol=1e-6)
    key = jax.random.key(3)
    dropped = np.asarray(head(hidden, (0.1, key)))  # sums of the kept inputs, each scaled by 1 / 0.9
    kept = dropped * 0.9
    np.testing.assert_allclose(kept, np.round(kept), atol=1e-2)
    assert np.all((850 < kept) & (kept < 950)) and len(set(kept.round().tolist())) > 1  # ~10% dropped per row
    np.testing.assert_array_equal(dropped, head(hidden, (0.1, key)))  # a function of the key
