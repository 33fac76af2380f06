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


def _merging_encode(text):
    """One token per character, except that "ab" is one token: "...a" + "b..." does not extend "...a"'s tokens."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("ab", i):
            out.append(63)
            i += 2
        else:
            out.append(1 + ord(text[i]) % 60)
            i += 1
    return out


def _children_scorer(seed, **kwargs):
    ppm = PPM(preset("tiny").replace(vocab_size=64, num_layers=2), rngs=nnx.Rngs(seed))
    ppm.v_head.weight[...] = np.linspace(-1, 1, ppm.config.hidden_size).astype(np.float32)
    return Scorer(ppm, _merging_encode, max_tokens=120, batch=4, group_rows=8, **kwargs)


def test_children_scored_on_stored_contexts_equal_whole_scores():
    scorer = _children_scorer(2, cache_mib=64)
    prompt = "Q: Ann has 5 apples and buys 7 more. How many?\n"
    contexts = [prompt, "", prompt + "step 1: a", "Q: tiny\n", "Q: long\n" + "x" * 100]
    steps = [["step 1: a = 5 + 7\n", "step 1: a = 5 - 7\n", "step 1: print(12)\n", "s\n", "t\n"],  # 5 rows pad to 8
             [],  # a leaf that produced no candidate
             ["b = 1\n", " = 2\n"],  # "a" + "b" merges: scored whole; " = 2" extends the context
             ["a\n"],
             ["y" * 30]]  # longer than max_tokens: its tail is scored whole
    keep = [[True, True, False, True, True], [], [True, True], [True], [True]]
    values = scorer.score_children(contexts, steps, keep)
    whole = [scorer.score([c + s for s in ss]) if ss else np.zeros(0) for c, ss in zip(contexts, steps)]
    for got, want in zip(values, whole):
        np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.ptp(np.concatenate(values)) > 0.01  # the scores differ, so equality is not vacuous
    store = scorer.store
    assert (store.hits, store.misses) == (0, 4)  # four contexts with candidates looked up, none stored yet
    # Kept children extending their context were stored ("step 1: print(12)" was not kept; the merged and
    # too-long ones are not extensions), each with its own tokens.
    stored = {prompt + s for s in steps[0] if s != "step 1: print(12)\n"} | {prompt + "step 1: a = 2\n", "Q: tiny\na\n"}
    assert stored <= set(store._entries) and prompt + "step 1: print(12)\n" not in store._entries
    assert len(store) == len(stored) + 3  # + the contexts computed: not the long one, whose child ran whole

    # The next expansion: children of stored nodes run only their step on the stored keys/values.
    deeper = [prompt + steps[0][0], prompt + steps[0][1], "Q: tiny\na\n"]
    deeper_steps = [["step 2: print(a)\n", "step 2: print(a + 1)\n"], ["step 2: print(a)\n"], ["b\n", "c\n", "d\n"]]
    values = scorer.score_children(deeper, deeper_steps)
    assert (store.hits, store.misses) == (3, 4)
    for c, ss, got in zip(deeper, deeper_steps, values):
        np.testing.assert_allclose(got, scorer.score([c + s for s in ss]), atol=2e-5)
    # A store too small for anything scores the same, every context computed again.
    tiny = _children_scorer(2, cache_mib=1e-4)
    for got, want in zip(tiny.score_children(deeper, deeper_steps), values):
        np.testing.assert_allclose(got, want, atol=2e-5)
    assert len(tiny.store) == 0 and tiny.store.misses == 3

