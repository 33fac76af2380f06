"""Answer selection rules and accuracy helpers against hand-computed cases."""
import math

import pytest

from rstar_jax.eval import selection as sel
from rstar_jax.verify.grader import Grader


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=1) as g:
        yield g


def trajs(answers, scores=None, correct=None):
    scores = scores or [None] * len(answers)
    correct = correct or [None] * len(answers)
    return [{"final_answer": a, "score": s, "correct": c} for a, s, c in zip(answers, scores, correct)]


def test_answer_key_canonical_and_exact_numbers():
    halves = ["1/2", "\\frac{1}{2}", "\\dfrac12", "0.5", "0.50", "$0.5$", " 0.5 "]
    assert {sel.answer_key(a) for a in halves} == {"num:1/2"}
    assert sel.answer_key("3") == sel.answer_key("3.0") == sel.answer_key("3.") == "num:3"
    assert sel.answer_key("1,000") == "num:1000"
    assert sel.answer_key("\\text{(A)}") == sel.answer_key("(A)")
    assert sel.answer_key("50%") not in (sel.answer_key("50"), sel.answer_key("0.5"))  # not a partition
    assert sel.answer_key("0.3333") != sel.answer_key("1/3")  # tolerance is the grader's business
    assert sel.answer_key(None) is None and sel.answer_key("") is None and sel.answer_key("$ $") is None


def test_group_answers_without_and_with_grader(grader):
    answers = ["1/2", None, "0.5", "3", "\\frac{1}{2}", "0.3333", "1/3", "x=3", "\\sqrt{2}/2",
               "\\frac{\\sqrt{2}}{2}"]
    assert sel.group_answers(answers) == [0, None, 0, 1, 0, 2, 3, 4, 5, 6]
    merged = sel.group_answers(answers, grader)
    # The grader adds tolerance (0.3333 ~ 1/3) and symbolic equality (x=3 ~ 3, sqrt(2)/2 forms).
    assert merged == [0, None, 0, 1, 0, 2, 2, 1, 3, 3]
    # Grouping agrees with the grader's own verdicts.
    for a, ga in zip(answers, merged):
        for b, gb in zip(answers, merged):
            if ga is not None and gb is not None and ga == gb:
                assert grader.grade("\\boxed{%s}" % a, "\\boxed{%s}" % b).equal, (a, b)
    # One batch for several problems gives the per-problem answer.
    assert sel.group_answers_batch([answers, ["7", "7.0", None]], grader) == [merged, [0, 0, None]]


def test_group_answers_anchor_to_first_member_not_chained(grader):
    # 50% equals 0.5 and 50 to the grader, but 0.5 != 50: each joins the group whose first answer it equals.
    assert sel.group_answers(["0.5", "50%", "50"], grader) == [0, 0, 1]
    assert sel.group_answers(["50%", "0.5", "50"], grader) == [0, 0, 0]  # both equal the anchor 50%


def test_top_score_ties_and_missing_answers():
    t = trajs(["4", None, "5", "6"], [0.1, 0.9, 0.5, 0.5])
    assert sel.top_score(t) == 2  # the unanswered 0.9 is never chosen; tie 0.5/0.5 -> first
    assert sel.top_score(trajs([None, None], [0.3, 0.2])) is None
    assert sel.top_score([]) is None
    with pytest.raises(ValueError, match="score"):
        sel.top_score(trajs(["1", "2"], [0.3, None]))


def test_majority_ties_broken_by_summed_score_then_first_seen():
    answers = ["2", "3", "3.0", "2", None]
    assert sel.majority(trajs(answers)) == 0  # 2 votes each, unscored -> first seen ("2"), its first member
    scores = [0.1, 0.5, 0.2, -0.3, 0.9]
    assert sel.majority(trajs(answers, scores)) == 1  # "3": 0.7 vs "2": -0.2; best-scored member
    assert sel.majority(trajs(["1/2", "0.5", "3", "3", "\\frac{1}{2}"])) == 0  # equivalent forms count together
    assert sel.majority(trajs([None, None])) is None


def test_majority_of_top_k():
    t = trajs(["5", "5", "5", "7", "7"], [-0.9, -0.8, -0.7, 0.9, 0.8])
    assert sel.majority(t) == 2
    assert sel.majority_of_top_k(t, 1) == 3
    assert sel.majority_of_top_k(t, 3) == 3  # top 3: 7, 7, 5
    assert sel.majority_of_top_k(t, 4) == 3  # 7, 7, 5, 5: tie on votes, 7 has the larger summed score
    assert sel.majority_of_top_k(t, 5) == sel.majority_of_top_k(t, 100) == 2
    # Unanswered trajectories do not take a top-k place.
    t2 = trajs([None, "1", "2", "2"], [1.0, 0.5, 0.4, 0.3])
    assert sel.majority_of_top_k(t2, 1) == 1
    assert sel.majority_of_top_k(t2, 3) == 2
    with pytest.raises(ValueError):
        sel.majority_of_top_k(t, 0)


def test_weighted_vote_shift_and_softmax():
    t = trajs(["a", "a", "a", "b"], [-0.9, -0.9, -0.9, 0.5])
    # Raw scores would give a -2.7; shifted weights: a 3 x 0.1 = 0.3 < b 1.5.
    assert sel.weighted_vote(t) == 3
    t = trajs(["a", "a", "a", "b"], [0.0, 0.0, 0.0, 0.9])
    assert sel.weighted_vote(t) == 0  # 3 x 1.0 > 1.9
    assert sel.weighted_vote(t, weighting="softmax") == 0  # 3 e^0 > e^0.9
    assert sel.weighted_vote(t, weighting="softmax", temperature=0.1) == 3  # 3 e^-9 < 1: ~top_score
    # Equal weight -> more summed score... then first seen; the representative is the best-scored member.
    t = trajs(["1/2", "b", "0.5"], [0.0, 1.0, 1.0])  # 1/2: 1 + 2 = 3 > b: 2
    assert sel.weighted_vote(t) == 2
    with pytest.raises(ValueError):
        sel.weighted_vote(t, weighting="raw")
    with pytest.raises(ValueError, match="score"):
        sel.weighted_vote(trajs(["1"], [None]))


def test_select_batches_problems_and_accepts_rule_names(grader):
    pools = [trajs(["0.3333", "1/3", "2"], [0.1, 0.2, 0.9], [False, True, False]),
             trajs([None, None], [0.5, 0.6]),
             trajs(["7", "8", "8"], [0.9, 0.1, 0.2], [True, False, False])]
    # No grader: 0.3333 and 1/3 differ, a three-way tie goes to the highest summed score ("2").
    assert sel.select_indices(pools, "majority") == [2, None, 2]
    assert sel.select_indices(pools, "majority", grader=grader) == [1, None, 2]
    assert sel.select_indices(pools, "top_score") == [2, None, 0]
    assert sel.select_indices(pools, "majority_of_top_k", k=1) == [2, None, 0]
    assert sel.select_indices(pools, sel.weighted_vote, grader=grader) == [1, None, 2]
    chosen = sel.select(pools, "top_score")
    assert chosen[0] is pools[0][2] and chosen[1] is None
    assert sel.accuracy(chosen) == 1 / 3
    assert sel.accuracy(sel.select(pools, "majority", grader=grader)) == 1 / 3


def test_pass_at_k():
    assert sel.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert sel.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert sel.pass_at_k(5, 0, 3) == 0.0
    assert sel.pass_at_k(5, 3, 3) == 1.0  # fewer than k wrong samples
    with pytest.raises(ValueError):
        sel.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        sel.pass_at_k(3, 1, 4)
    pools = [trajs(["1", "2"], correct=[True, False]), trajs(["1", "2"], correct=[None, False])]
    assert sel.mean_pass_at_k(pools, 1) == pytest.approx(0.25)
    assert sel.mean_pass_at_k(pools, 2) == pytest.approx(0.5)
    assert sel.accuracy([None, {"correct": True}]) == 0.5
