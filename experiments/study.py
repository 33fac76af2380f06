"""Runs of experiments.round side by side (seeds of the miniature, say): accuracy on chosen difficulties and
coverage per round, as the mean and standard deviation over the runs, and the method's claims as paired
differences.

  python -m experiments.study --runs=runs/mini_s0,runs/mini_s1,runs/mini_s2 --difficulties=4,5,6 --out=runs/study

Reads only the stages' summaries (`base_eval/DONE.json`, `round_<k>/eval/DONE.json`,
`round_<k>/search/DONE.json`) and writes `study.md` and `study.json` into --out. Accuracy on several
difficulties is the mean of their accuracies (the miniature's evaluation sets have equal sizes). Runs with
fewer rounds than the others are named in the report, which compares only the rounds every run has.
"""
from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence

from absl import flags

from experiments.stages import load_done, write_json_atomic
from experiments.usage import check_usage, run
from rstar_jax.errors import InputError

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_list("runs", None, "run directories of experiments.round")
    flags.DEFINE_list("difficulties", [], "difficulties to report (default: all of the evaluation set)")
    flags.DEFINE_string("out", None, "output directory")


def _summary(stage_dir: str) -> dict | None:
    """A finished stage's DONE.json (None if unfinished), its JSON checked: errors name the file."""
    path = os.path.join(stage_dir, "DONE.json")
    try:
        summary = load_done(stage_dir)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if summary is not None and not isinstance(summary, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary


def _eval_rows(summary: dict, stage_dir: str) -> list[dict]:
    """An evaluation summary's rows, with the fields the study reads (a bad one is named with its file)."""
    path = os.path.join(stage_dir, "DONE.json")
    rows = summary.get("rows")
    if not isinstance(rows, list):
        raise InputError(f"{path}: field 'rows': expected a list of evaluation rows, got "
                         f"{'nothing (missing)' if 'rows' not in summary else type(rows).__name__}")
    for i, row in enumerate(rows):
        missing = [f for f in ("method", "n", "accuracy", "by_difficulty") if not isinstance(row, dict) or f not in row]
        if missing:
            raise InputError(f"{path}: rows[{i}]: missing field(s) {', '.join(map(repr, missing))}")
        if not isinstance(row["by_difficulty"], dict):
            raise InputError(f"{path}: rows[{i}]: field 'by_difficulty': expected an object")
    return rows


def load_run(run_dir: str) -> list[dict]:
    """Rounds 0 (the base model) .. K of one run: [{"rows": eval rows, "coverage": {difficulty: fraction}}]."""
    base_dir = os.path.join(run_dir, "base_eval")
    base = _summary(base_dir)
    if base is None:
        raise InputError(f"{run_dir} has no finished base model evaluation ({os.path.join(base_dir, 'DONE.json')})")
    rounds = [{"rows": _eval_rows(base, base_dir), "coverage": None}]
    k = 1
    while (summary := _summary(eval_dir := os.path.join(run_dir, f"round_{k}", "eval"))) is not None:
        search_dir = os.path.join(run_dir, f"round_{k}", "search")
        coverage = (_summary(search_dir) or {}).get("coverage_by_difficulty")
        if coverage and not (isinstance(coverage, dict) and isinstance(coverage.get("all"), (int, float))):
            raise InputError(f"{os.path.join(search_dir, 'DONE.json')}: field 'coverage_by_difficulty': expected "
                             "an object with a number under 'all'")
        rounds.append({"rows": _eval_rows(summary, eval_dir), "coverage": coverage})
        k += 1
    return rounds


def check_distinct(run_dirs: Sequence[str]) -> None:
    """One run listed twice would count as two agreeing runs."""
    seen = {}
    for run_dir in run_dirs:
        real = os.path.realpath(run_dir)
        if real in seen:
            raise InputError(f"--runs: {run_dir} is listed twice"
                             + (f" (also as {seen[real]})" if seen[real] != run_dir else ""))
        seen[real] = run_dir


def check_runs(run_dirs: Sequence[str], runs: Sequence[list[dict]], difficulties: Sequence[str]) -> list[str]:
    """Refuses what would make the tables empty or the claims meaningless; returns notes for the report
    (runs with fewer rounds than the others: only the rounds all runs have are compared)."""
    # In the rows' order (numeric, as the evaluation writes them).
    present = dict.fromkeys(d for run in runs for rnd in run for row in rnd["rows"] for d in row["by_difficulty"])
    unknown = [d for d in difficulties if d not in present]
    if unknown:
        raise InputError(f"--difficulties: {', '.join(unknown)} not evaluated in any run; the runs have "
                         f"{', '.join(present) or 'none'}")
    lengths = [len(run) for run in runs]
    if len(set(lengths)) == 1:
        return []
    shorter = ", ".join(f"{d} ({n - 1} of {max(lengths) - 1} rounds)" for d, n in zip(run_dirs, lengths)
                        if n < max(lengths))
    if min(lengths) < 2:  # only the base model in common: no round to compare
        raise InputError(f"--runs: the runs have no finished round in common (fewer rounds: {shorter})")
    return [f"runs with fewer rounds: {shorter}; compared on rounds 0-{min(lengths) - 1}, the rounds all runs "
            "have"]


def subset_accuracy(row: dict, difficulties: Sequence[str]) -> float | None:
    """Mean accuracy over `difficulties` (all of the row's when empty); None if the row lacks one."""
    by = row["by_difficulty"]
    if not difficulties:
        return row["accuracy"]
    if any(d not in by for d in difficulties):
        return None
    return sum(by[d] for d in difficulties) / len(difficulties)


def _mean_sd(values: Sequence[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


def study(runs: Sequence[list[dict]], difficulties: Sequence[str]) -> dict:
    """Accuracy per (round, method, N) and coverage per round over the runs, plus the paired claims and
    `left_out`: a note for each (round, method, N) some run did not measure (on all of `difficulties`)."""
    num_rounds = min(len(r) for r in runs)
    accuracy, coverage, left_out = [], [], []
    for k in range(num_rounds):
        keys = dict.fromkeys((row["method"], row["n"]) for run in runs for row in run[k]["rows"])
        for method, n in keys:
            rows = [next((row for row in run[k]["rows"] if (row["method"], row["n"]) == (method, n)), None)
                    for run in runs]
            values = [row and subset_accuracy(row, difficulties) for row in rows]
            if all(v is not None for v in values):  # measured in every run
                accuracy.append({"round": k, "method": method, "n": n, **_mean_sd(values)})
            else:
                missing = ", ".join(str(i + 1) for i, v in enumerate(values) if v is None)
                left_out.append(f"round {k} {method}@{n} left out: not measured"
                                f"{' on difficulties ' + ','.join(difficulties) if difficulties else ''} "
                                f"in run {missing} of {len(runs)}")
        if k and all(run[k]["coverage"] for run in runs):
            coverage.append({"round": k, **_mean_sd([run[k]["coverage"]["all"] for run in runs])})
    return {"runs": len(runs), "difficulties": list(difficulties), "accuracy": accuracy, "coverage": coverage,
            "claims": claims(accuracy, coverage, num_rounds - 1), "left_out": left_out}


def claims(accuracy: list[dict], coverage: list[dict], last: int) -> list[dict]:
    """The paper's effects as paired differences over the runs (mean, sd, and in how many runs it held):
    the last round's greedy policy over the base model's; at the last round's largest N, PPM-guided MCTS
    over majority vote over greedy; each round's coverage over the previous round's."""
    get = lambda k, method, n=None: next((a for a in accuracy if a["round"] == k and a["method"] == method
                                          and (n is None or a["n"] == n)), None)
    # Round 0 is the base model: with no later round there is nothing to compare it with.
    pairs = [(f"round {last} greedy - base greedy", get(last, "greedy"), get(0, "greedy"))] if last > 0 else []
    majority_ns = {a["n"] for a in accuracy if a["round"] == last and a["method"] == "majority"}
    mcts_ns = {a["n"] for a in accuracy if a["round"] == last and a["method"].startswith("mcts/")}
    if shared := majority_ns & mcts_ns:
        n = max(shared)
        pairs += [(f"round {last} mcts/top_score@{n} - majority@{n}", get(last, "mcts/top_score", n),
                   get(last, "majority", n)),
                  (f"round {last} majority@{n} - greedy", get(last, "majority", n), get(last, "greedy"))]
    pairs += [(f"coverage round {b['round']} - round {a['round']}", b, a) for a, b in zip(coverage, coverage[1:])]
    out = []
    for name, high, low in pairs:
        if high and low:
            diffs = [h - lo for h, lo in zip(high["values"], low["values"])]
            out.append({"claim": name, **_mean_sd(diffs), "held": sum(d > 0 for d in diffs)})
    return out


def to_markdown(result: dict, run_dirs: Sequence[str]) -> str:
    pct = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['sd']:.1f}"
    subset = ",".join(result["difficulties"]) or "all"
    lines = [f"# Study of {result['runs']} runs", "", *[f"- `{r}`" for r in run_dirs], "",
             *[f"Note: {n}." for n in result.get("notes", [])], *([""] if result.get("notes") else []),
             f"Accuracy (%) on difficulties {subset}, mean ± sd over the runs (round 0 = the base model):", "",
             "| round | method | N | accuracy | per run |", "|---|---|---|---|---|"]
    lines += [f"| {a['round']} | {a['method']} | {a['n']} | {pct(a)} | "
              + " ".join(f"{100 * v:.0f}" for v in a["values"]) + " |" for a in result["accuracy"]]
    lines += ["", "Coverage of the training pool (%):", "", "| round | coverage | per run |", "|---|---|---|"]
    lines += [f"| {c['round']} | {pct(c)} | " + " ".join(f"{100 * v:.0f}" for v in c["values"]) + " |"
              for c in result["coverage"]]
    lines += ["", "Claims (paired differences, points):", "", "| claim | difference | held in |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {pct(c)} | {c['held']}/{result['runs']} |" for c in result["claims"]]
    return "\n".join(lines) + "\n"


def main(argv):
    check_usage(argv, "runs", "out")
    check_distinct(FLAGS.runs)
    runs = [load_run(r) for r in FLAGS.runs]
    notes = check_runs(FLAGS.runs, runs, FLAGS.difficulties)
    result = study(runs, FLAGS.difficulties)
    result["notes"] = notes + result.pop("left_out")
    os.makedirs(FLAGS.out, exist_ok=True)
    write_json_atomic(os.path.join(FLAGS.out, "study.json"), result)
    text = to_markdown(result, FLAGS.runs)
    with open(os.path.join(FLAGS.out, "study.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    define_flags()
    run(main)
