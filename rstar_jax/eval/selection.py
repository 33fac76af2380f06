"""Answer selection at inference: one final answer from several trajectories per problem, and accuracy helpers.

A trajectory is a mapping with at least ``final_answer`` (str or None) and ``score`` (the reward model's
tanh score in [-1, 1], or None), e.g. the dicts `rstar_jax.search.baselines` returns or one record per
independent MCTS run. Rules (RSTAR.md section 8):

- `top_score`: the trajectory with the highest score (the paper's rule; also Best-of-N with an ORM).
- `majority`: the most common answer (plain majority vote / self-consistency).
- `majority_of_top_k`: majority vote over the k highest-scored trajectories (the reference's rule, k = 4-8).
- `weighted_vote`: every trajectory votes for its answer with a weight from its score; the heaviest
  answer wins.

Each rule is ``rule(trajectories, groups=None, **params) -> index | None`` over one problem: the index of the
chosen trajectory, or None when no trajectory has an answer. Trajectories without an answer never vote and
are never chosen. `select` applies a rule to many problems, computing answer groups for all of them first.

Answer equivalence (the one place for it; the majority-vote baseline uses it too), `group_answers`:
1. key: the grader's canonical string (`canonical_answer`: spacing, `\\dfrac`, `\\text{}`, units, degrees,
   `$`), and for a plain number its exact value, so ``1/2``, ``\\frac{1}{2}``, ``0.5`` and ``0.50`` share a
   key (percentages keep their string: ``50%`` equals both ``0.5`` and ``50`` to the grader, which is not
   a partition). Pure Python, no grader needed.
2. with a `Grader`: key classes are further merged when the grader finds their answers equal
   (tolerance ``0.3333`` ~ ``1/3``, symbolic ``\\sqrt2/2`` ~ ``\\frac{\\sqrt{2}}{2}``, ``x=2`` ~ ``2``).
   Only distinct keys are compared (one `grade_batch` call for every problem), most pairs are settled by
   the grader's fast tier, and its verdict cache absorbs repeats. Merging is greedy in order of first
   appearance: a key joins the first earlier group whose first key it equals (grader equality with a
   tolerance is not transitive, so groups are anchored to their first answer instead of chained).

Tie-breaks, everywhere: more votes (or weight), then a higher summed score where every voter has one,
then the answer seen first. The trajectory returned for a winning answer is its highest-scored member
(the first one when unscored).

Weighted vote and negative scores: tanh scores lie in [-1, 1], so summing them directly would let one
answer's many low-scored votes count against it. `weighting="shift"` (default) uses ``score + 1`` in
[0, 2]: every vote counts for something unless the model is certain it is wrong, and weights add
linearly. `weighting="softmax"` uses ``exp(score / temperature)`` (normalised over the problem's voters),
which at small temperatures approaches `top_score` and at large ones plain majority.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from rstar_jax.verify.answer_equiv import parse_number
from rstar_jax.verify.answer_extract import canonical_answer

Trajectory = Mapping
Rule = Callable[..., "int | None"]
WEIGHTINGS = ("shift", "softmax")


# ---------------------------------------------------------------------------------------------------
# Answer equivalence


def answer_key(answer: str | None) -> str | None:
    """The grouping key of an answer: its canonical string, or ``num:<exact value>`` for a plain number.

    None for no answer (None, or nothing left after canonicalisation).
    """
    if answer is None:
        return None
    canonical = canonical_answer(answer)
    if not canonical:
        return None
    number = parse_number(canonical)
    if number is not None and not number.percent:
        return f"num:{number.value}"  # a Fraction: "num:1/2", "num:3"
    return canonical


def group_answers(answers: Sequence[str | None], grader=None) -> list[int | None]:
    """Group ids (0, 1, ... in order of first appearance) of one problem's answers; None for no answer."""
    return group_answers_batch([answers], grader)[0]


def group_answers_batch(answer_lists: Sequence[Sequence[str | None]], grader=None) -> list[list[int | None]]:
    """`group_answers` for many problems, with one grader call for all of them (see the module docstring)."""
    keys = [[answer_key(a) for a in answers] for answers in answer_lists]
    # Per problem: distinct keys in order of first appearance, each with its first raw answer.
    distinct: list[list[tuple[str, str]]] = []
    for answers, row in zip(answer_lists, keys):
        seen: dict[str, str] = {}
        for answer, key in zip(answers, row):
            if key is not None and key not in seen:
                seen[key] = answer
        distinct.append(list(seen.items()))

    equal: set[tuple[int, int, int]] = set()  # (problem, later key, earlier key) the grader finds equal
    if grader is not None:
        pairs = [(p, j, i) for p, d in enumerate(distinct) for j in range(len(d)) for i in range(j)]
        if pairs:
            boxed = lambda a: "\\boxed{" + a + "}"
            verdicts = grader.grade_batch([(boxed(distinct[p][j][1]), boxed(distinct[p][i][1])) for p, j, i in pairs])
            equal = {pair for pair, v in zip(pairs, verdicts) if v.equal}

    out = []
    for p, (row, d) in enumerate(zip(keys, distinct)):
        anchors: list[int] = []  # per group: the index (into d) of its first key
        group_of_key: dict[str, int] = {}
        for j, (key, _) in enumerate(d):
            group = next((g for g, i in enumerate(anchors) if (p, j, i) in equal), None)
            if group is None:
                group = len(anchors)
                anchors.append(j)
            group_of_key[key] = group
        out.append([None if key is None else group_of_key[key] for key in row])
    return out


# ---------------------------------------------------------------------------------------------------
# Selection rules (one problem)


def _groups(trajectories: Sequence[Trajectory], groups: Sequence[int | None] | None) -> list[int | None]:
    if groups is None:
        return group_answers([t.get("final_answer") for t in trajectories])
    if len(groups) != len(trajectories):
        raise ValueError(f"{len(groups)} group ids for {len(trajectories)} trajectories")
    return list(groups)


def _score(trajectory: Trajectory) -> float | None:
    score = trajectory.get("score")
    return None if score is None else float(score)


def _required_scores(trajectories: Sequence[Trajectory], indices: Sequence[int], rule: str) -> dict[int, float]:
    scores = {i: _score(trajectories[i]) for i in indices}
    missing = [i for i, s in scores.items() if s is None or math.isnan(s)]
    if missing:
        raise ValueError(f"{rule} needs a reward-model score on every trajectory with an answer; "
                         f"trajectories {missing[:5]} have none")
    return scores


def _vote(trajectories: Sequence[Trajectory], groups: Sequence[int | None], voters: Sequence[int],
          weights: Mapping[int, float] | None = None) -> int | None:
    """The winning group's representative among `voters` (indices): see the module's tie-break rules."""
    if not voters:
        return None
    scores = {i: _score(trajectories[i]) for i in voters}
    all_scored = all(s is not None and not math.isnan(s) for s in scores.values())
    tally: dict[int, list] = {}  # group -> [weight, summed score, first position, members]
    for position, i in enumerate(voters):
        entry = tally.setdefault(groups[i], [0.0, 0.0, position, []])
        entry[0] += 1.0 if weights is None else weights[i]
        entry[1] += scores[i] if all_scored else 0.0
        entry[3].append(i)
    weight, summed, first, members = max(tally.values(), key=lambda e: (e[0], e[1], -e[2]))
    if not all_scored:
        return members[0]
    return max(members, key=lambda i: (scores[i], -i))


def top_score(trajectories: Sequence[Trajectory], groups: Sequence[int | None] | None = None) -> int | None:
    """The answered trajectory with the highest score (ties: the first)."""
    groups = _groups(trajectories, groups)
    answered = [i for i, g in enumerate(groups) if g is not None]
    if not answered:
        return None
    scores = _required_scores(trajectories, answered, "top_score")
    return max(answered, key=lambda i: (scores[i], -i))


def majority(trajectories: Sequence[Trajectory], groups: Sequence[int | None] | None = None) -> int | None:
    """Plain majority vote over every answered trajectory; scores (when all present) only break ties."""
    groups = _groups(trajectories, groups)
    return _vote(trajectories, groups, [i for i, g in enumerate(groups) if g is not None])


def majority_of_top_k(trajectories: Sequence[Trajectory], k: int, groups: Sequence[int | None] | None = None
                      ) -> int | None:
    """Majority vote over the k answered trajectories with the highest scores (score ties: earlier first)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    groups = _groups(trajectories, groups)
    answered = [i for i, g in enumerate(groups) if g is not None]
    scores = _required_scores(trajectories, answered, "majority_of_top_k")
    top = sorted(answered, key=lambda i: -scores[i])[:k]  # stable: equal scores keep their order
    return _vote(trajectories, groups, sorted(top))


def weighted_vote(trajectories: Sequence[Trajectory], groups: Sequence[int | None] | None = None, *,
                  weighting: str = "shift", temperature: float = 1.0) -> int | None:
    """Score-weighted vote: each answer's weight is the sum over its trajectories of
    ``score + 1`` (weighting="shift") or ``softmax(score / temperature)`` (weighting="softmax")."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    groups = _groups(trajectories, groups)
    answered = [i for i, g in enumerate(groups) if g is not None]
    if not answered:
        return None
    scores = _required_scores(trajectories, answered, "weighted_vote")
    if weighting == "shift":
        weights = {i: scores[i] + 1.0 for i in answered}
    else:
        top = max(scores.values())
        raw = {i: math.exp((scores[i] - top) / temperature) for i in answered}
        total = sum(raw.values())
        weights = {i: w / total for i, w in raw.items()}
    return _vote(trajectories, groups, answered, weights)


RULES: dict[str, Rule] = {"top_score": top_score, "majority": majority, "majority_of_top_k": majority_of_top_k,
                          "weighted_vote": weighted_vote}


# ---------------------------------------------------------------------------------------------------
# Many problems


def select_indices(pools: Sequence[Sequence[Trajectory]], rule: Rule | str, *, grader=None, **params
                   ) -> list[int | None]:
    """`rule` on every problem's trajectories (answer groups for all problems first, one grader call)."""
    rule = RULES[rule] if isinstance(rule, str) else rule
    groups = group_answers_batch([[t.get("final_answer") for t in pool] for pool in pools], grader)
    return [rule(pool, groups=g, **params) for pool, g in zip(pools, groups)]


def select(pools: Sequence[Sequence[Trajectory]], rule: Rule | str, *, grader=None, **params
           ) -> list[Trajectory | None]:
    """The chosen trajectory of every problem (None where no trajectory has an answer).

    E.g. ``select(pools, "majority_of_top_k", k=4)`` or ``select(pools, weighted_vote, grader=grader)``.
    """
    return [None if i is None else pool[i] for pool, i in zip(pools, select_indices(pools, rule, grader=grader,
                                                                                     **params))]


# ---------------------------------------------------------------------------------------------------
# Accuracy


def is_correct(trajectory: Trajectory | None) -> bool:
    """A selected trajectory counts as correct only when it was graded correct (None: no answer)."""
    return trajectory is not None and trajectory.get("correct") is True


def accuracy(selected: Sequence[Trajectory | None]) -> float:
    """Fraction of problems whose selected trajectory is correct (pass@1 of a selection rule)."""
    if not selected:
        raise ValueError("accuracy of no problems")
    return sum(map(is_correct, selected)) / len(selected)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct among n samples: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(pools: Sequence[Sequence[Trajectory]], k: int) -> float:
    """pass@k averaged over problems, each pool's correct flags giving (n, c)."""
    if not pools:
        raise ValueError("pass@k of no problems")
    return sum(pass_at_k(len(pool), sum(map(is_correct, pool)), k) for pool in pools) / len(pools)
