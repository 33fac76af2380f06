"""Evaluation results: one row per (problem set, method, N) with a bootstrap interval, as JSON and markdown.

A row (the machine-readable summary's unit; README "Evaluation" documents the schema)::

    {"set": str, "method": str, "n": int, "num_problems": int, "accuracy": float,
     "ci95": [lo, hi], "by_difficulty": {str: float}, "tokens_per_problem": float, "wall_s": float,
     "correct": [bool, ...], "reward_auc": {"auc": float, "problems": int} | None}

`method` is "greedy", "majority", "best_of_n", "beam" or "mcts/<selection>"; `n` the samples, trajectories
or beam width behind one answer; `correct` the per-problem outcome in problem order, so that runs and seeds
can be compared problem by problem; `reward_auc` (rows that choose by reward-model score only: best_of_n
and mcts) says how well the scores rank a problem's answers (`ranking_auc`). Pure Python + numpy.
"""
from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from rstar_jax.eval.selection import answer_key
from rstar_jax.search.tree_record import Node, TreeRecord

SCHEMA = "rstar_jax.eval/1"


def bootstrap_ci(correct: Sequence[bool], samples: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy, resampling problems with replacement."""
    x = np.asarray(correct, np.float64)  # [P]
    if x.size == 0:
        raise ValueError("a confidence interval of no problems")
    means = np.random.default_rng(seed).choice(x, size=(samples, x.size), replace=True).mean(axis=1)  # [samples]
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def make_row(set_name: str, method: str, n: int, correct: Sequence[bool], difficulties: Sequence, tokens: float,
             wall_s: float, *, bootstrap: int = 1000, seed: int = 0) -> dict:
    """One result row; `tokens` is the total generated for these answers, `difficulties` per problem (None: -)."""
    correct = [bool(c) for c in correct]
    by = collections.defaultdict(list)
    for c, d in zip(correct, difficulties):
        if d is not None:
            by[str(d)].append(c)
    lo, hi = bootstrap_ci(correct, bootstrap, seed)
    return {"set": set_name, "method": method, "n": int(n), "num_problems": len(correct),
            "accuracy": sum(correct) / len(correct), "ci95": [lo, hi],
            "by_difficulty": {d: sum(v) / len(v) for d, v in sorted(by.items(), key=lambda kv: _order(kv[0]))},
            "tokens_per_problem": tokens / len(correct), "wall_s": round(wall_s, 3), "correct": correct}


def ranking_auc(pools: Sequence[Sequence[Mapping]]) -> dict | None:
    """How well reward-model scores separate a problem's correct answers from its wrong ones.

    pools: per problem, trajectories with "final_answer", "score" and "correct". Per problem with at least
    one correct and one wrong answered, scored trajectory: the probability that a correct one outscores a
    wrong one (ties count half; 0.5 is chance); the mean over those problems. Returns {"auc", "problems"},
    or None when no problem has both.
    """
    aucs = []
    for pool in pools:
        scored = [t for t in pool if t.get("score") is not None and answer_key(t.get("final_answer")) is not None]
        right = np.asarray([t["score"] for t in scored if t.get("correct") is True], np.float64)  # [C]
        wrong = np.asarray([t["score"] for t in scored if t.get("correct") is False], np.float64)  # [W]
        if right.size and wrong.size:
            diff = right[:, None] - wrong[None, :]  # [C, W]
            aucs.append(float(np.mean((diff > 0) + 0.5 * (diff == 0))))
    return {"auc": float(np.mean(aucs)), "problems": len(aucs)} if aucs else None


def _order(key: str):
    """Numeric difficulties in numeric order (Omni-MATH's are floats), then the others by name."""
    try:
        return (0, float(key), "")
    except ValueError:
        return (1, 0.0, key)


def best_answer(record: TreeRecord) -> Node | None:
    """One inference search's answer: its answer node with the highest PPM score among those with an
    extractable answer (RSTAR.md section 8: "the best answer (by PPM value) of each run"; ties: the first)."""
    scored = [n for n in record.answer_nodes() if answer_key(n.final_answer) is not None and n.init_value is not None]
    return max(scored, key=lambda n: n.init_value, default=None)


def run_answers(records: Iterable[TreeRecord | Mapping]) -> dict[str, list[dict]]:
    """Each inference search's answer (`best_answer`), per problem in seed order.

    Returns {problem_id: [trajectory]} with trajectories shaped for `rstar_jax.eval.selection`:
    {"final_answer", "score", "correct", "num_tokens", "seed"}; a run without an answer gives
    final_answer None (it never votes). `num_tokens` is every token that run generated.
    """
    by_problem: dict[str, list[dict]] = collections.defaultdict(list)
    for record in records:
        record = record if isinstance(record, TreeRecord) else TreeRecord.from_dict(record)
        best = best_answer(record)
        by_problem[record.problem_id].append({
            "final_answer": None if best is None else best.final_answer,
            "score": None if best is None else best.init_value,
            "correct": None if best is None else best.correct,
            "num_tokens": int(record.stats.get("generated_tokens", 0)), "seed": record.seed})
    return {pid: sorted(runs, key=lambda t: t["seed"]) for pid, runs in by_problem.items()}


def markdown_table(rows: Sequence[Mapping]) -> str:
    """The rows as a markdown table, accuracy per difficulty as extra columns."""
    columns = sorted({d for r in rows for d in r["by_difficulty"]}, key=_order)
    with_auc = any("reward_auc" in r for r in rows)
    head = (["set", "method", "N", "accuracy", "95% CI", "tokens/problem", "wall s"] + [f"d={d}" for d in columns]
            + ["RM AUC (problems)"] * with_auc)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lo, hi = r["ci95"]
        cells = [r["set"], r["method"], str(r["n"]), f"{100 * r['accuracy']:.1f}%",
                 f"{100 * lo:.1f}-{100 * hi:.1f}", f"{r['tokens_per_problem']:.0f}", f"{r['wall_s']:.1f}"]
        cells += [f"{100 * r['by_difficulty'][d]:.0f}%" if d in r["by_difficulty"] else "" for d in columns]
        if with_auc:
            auc = r.get("reward_auc")
            cells.append(f"{auc['auc']:.2f} ({auc['problems']})" if auc else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
