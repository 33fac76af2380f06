"""Reward-model scoring: texts scored one by one, or in groups whose shared beginning runs once."""
import numpy as np
from flax import nnx

from rstar_jax.models import preset
from rstar_jax.models.ppm import PPM
from rstar_jax.search.scoring import Scorer


def _encode(text):
    return [1 + ord(ch) % 60 for ch in text]  # one token per character


def test_grouped_scores_equal_scoring_each_text():
    ppm = PPM(preset("tiny").replace(vocab_size=64, num_layers=2), rngs=nnx.Rngs(0))
    # A ~N(0, 1e-6) head scores everything ~0: a larger one makes the comparison meaningful.
    ppm.v_head.weight[...] = np.linspace(-1, 1, ppm.config.hidden_size).astype(np.float32)
    scorer = Scorer(ppm, _encode, max_tokens=90, group_rows=8, min_group=0)
    prompt = "Q: Ann has 5 apples and buys 7 more. How many?\n" + "step 1: a = 5 + 7\n"
    groups = [
        [prompt + "step 2: print(a)", prompt + "step 2: print(a + 1)", prompt + "step 2: a = a * 2"],
        [],  # a leaf that produced no candidate
        ["short", "shorter one", "s"],  # little shared; one text is a prefix of another's start
        [prompt * 2 + "the tail is kept"],  # longer than max_tokens: its tail is scored
        [prompt + "x", prompt + "y", prompt + "z", prompt + "w", prompt + "v"],  # 5 rows pad to 8
    ]
    grouped = scorer.score_groups(groups)
    assert [len(g) for g in grouped] == [len(g) for g in groups]
    for texts, values in zip(groups, grouped):
        if texts:
            np.testing.assert_allclose(values, scorer.score(texts), atol=2e-5)
    flat = np.concatenate(grouped)
    assert np.ptp(flat) > 0.01  # the scores differ, so equality above is not vacuous
    # Small groups (here under 4 texts on average) are scored text by text: the same values.
    scorer.min_group = 4
    for a, b in zip(scorer.score_groups(groups[:3]), grouped[:3]):
        np.testing.assert_allclose(a, b, atol=2e-5)
    assert [len(g) for g in scorer.score_groups([[], []])] == [0, 0]


def test_concurrent_forwards_give_the_same_scores():
    ppm = PPM(preset("tiny").replace(vocab_size=64, num_layers=2), rngs=nnx.Rngs(1))
    ppm.v_head.weight[...] = np.linspace(-1, 1, ppm.config.hidden_size).astype(np.float32)
    texts = [f"text {i}: " + "ab" * (i % 7) for i in range(11)]  # batches of 4: three forwards
    one = Scorer(ppm, _encode, batch=4, concurrent_calls=1)
    two = Scorer(ppm, _encode, batch=4, concurrent_calls=2)
    np.testing.assert_array_equal(two.score(texts), one.score(texts))
    assert len(two.score([])) == 0
    groups = [[t + " x", t + " y", t + " z", t + " w"] for t in texts[:5]]
    one.group_rows = two.group_rows = 8  # two groups a forward: three forwards
    one.min_group = two.min_group = 0
    for a, b in zip(two.score_groups(groups), one.score_groups(groups)):
        np.testing.assert_array_equal(a, b)
