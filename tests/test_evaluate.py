"""Evaluation: report rows with bootstrap intervals, per-run MCTS answers, every method end to end on the tiny
policy and PPM (resumable, consistent across N), plots, and the CLI's input checks."""
import json
import os
import random
import subprocess
import sys

import pytest

from experiments.evaluate import EvalSpec, evaluate
from experiments.expand import example_problem
from rstar_jax.eval import plots, report
from rstar_jax.search.config import SearchConfig

PNG = b"\x89PNG\r\n\x1a\n"


def test_bootstrap_interval_brackets_the_accuracy_and_is_seeded():
    correct = [True] * 30 + [False] * 70
    lo, hi = report.bootstrap_ci(correct, samples=2000, seed=1)
    assert lo < 0.3 < hi and 0.15 < lo and hi < 0.45  # ~ +-1.96 * sqrt(.21 / 100) = +-0.09
    assert report.bootstrap_ci(correct, samples=2000, seed=1) == (lo, hi)
    assert report.bootstrap_ci([True] * 5) == (1.0, 1.0)
    with pytest.raises(ValueError, match="no problems"):
        report.bootstrap_ci([])


def test_row_accuracy_by_difficulty_and_table():
    row = report.make_row("mini", "majority", 4, [True, False, True, True], [1, 1, 10, None], tokens=40, wall_s=2)
    assert row["accuracy"] == 0.75 and row["by_difficulty"] == {"1": 0.5, "10": 1.0}
    assert list(row["by_difficulty"]) == ["1", "10"]  # numeric order
    assert row["tokens_per_problem"] == 10 and row["correct"] == [True, False, True, True]
    table = report.markdown_table([row])
    assert "| mini | majority | 4 | 75.0% |" in table and "d=10" in table
    omni = report.make_row("omni", "greedy", 1, [True, False, True], [10.0, 2.5, "x"], tokens=3, wall_s=1)
    assert list(omni["by_difficulty"]) == ["2.5", "10.0", "x"]


def test_ranking_auc_is_the_chance_a_correct_answer_outscores_a_wrong_one():
    t = lambda score, ok, answer="1": {"final_answer": answer, "score": score, "correct": ok}
    pools = [[t(0.9, True), t(0.1, False), t(0.5, False)],  # both wrong ones below: 1.0
             [t(0.2, True), t(0.2, False), t(0.6, False)],  # a tie and a loss: 0.25
             [t(0.3, True), t(0.1, True)],  # no wrong answer: not counted
             [t(0.9, False, None), t(0.1, True)],  # the wrong one has no answer: not counted
             [t(None, False), t(0.5, True)]]  # unscored: not counted
    assert report.ranking_auc(pools) == {"auc": pytest.approx(0.625), "problems": 2}
    assert report.ranking_auc(pools[2:]) is None
    flipped = [[{**x, "score": -x["score"]} for x in pool] for pool in pools[:2]]
    assert report.ranking_auc(flipped)["auc"] == pytest.approx(1 - 0.625)
    row = {**report.make_row("s", "best_of_n", 2, [True, False], [1, 1], 4, 1.0), "reward_auc": report.ranking_auc(pools)}
    plain = report.make_row("s", "majority", 2, [True, False], [1, 1], 4, 1.0)
    table = report.markdown_table([plain, row])
    assert "RM AUC (problems)" in table and "| 0.62 (2) |" in table
    assert "RM AUC" not in report.markdown_table([plain])


def _record(pid, seed, answers, tokens=7):
    """A minimal inference tree: root plus one answer node per (answer, ppm score, correct)."""
    nodes = [{"id": 0, "parent": -1, "depth": 0, "text": "", "visits": 1, "value_sum": 0.0, "init_value": None,
              "terminal_reason": None, "final_answer": None, "correct": None}]
    for k, (answer, score, ok) in enumerate(answers, start=1):
        nodes.append({"id": k, "parent": 0, "depth": 1, "text": f"\\boxed{{{answer}}}", "visits": 1,
                      "value_sum": score, "init_value": score, "terminal_reason": "answer", "final_answer": answer,
                      "correct": ok})
    return {"problem_id": pid, "prompt": "q", "answer": "1", "mode": "inference", "config_digest": "d", "seed": seed,
            "nodes": nodes, "stats": {"generated_tokens": tokens}}


def test_each_search_answers_with_its_highest_scored_answer_in_seed_order():
    runs = report.run_answers([_record("a", 1, [("2", 0.9, False), ("1", 0.95, True)]),
                               _record("a", 0, [("3", 0.1, False)]), _record("b", 0, [])])
    assert [(t["seed"], t["final_answer"], t["score"], t["correct"]) for t in runs["a"]] == [
        (0, "3", 0.1, False), (1, "1", 0.95, True)]
    assert runs["b"][0]["final_answer"] is None and runs["b"][0]["num_tokens"] == 7


def test_plots_write_pngs(tmp_path):
    rows = [report.make_row("s", m, n, [n > 1, True], [1, 2], 10 * n, 1.0) for m in ("majority", "mcts/top_score")
            for n in (1, 2, 4)] + [report.make_row("s", "greedy", 1, [True, False], [1, 2], 5, 1.0)]
    plots.scaling_curve(rows, str(tmp_path / "scaling.png"))
    plots.per_round({"greedy": [0.1, 0.3, None, 0.5], "mcts": [None, 0.4, 0.6, 0.7]}, str(tmp_path / "rounds.png"),
                    ylabel="accuracy (%)", title="per round")
    for name in ("scaling.png", "rounds.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


SMALL = SearchConfig(mode="inference", rollouts=2, num_candidates=3, max_depth=4, max_step_tokens=40,
                     max_context_tokens=512, batch_size=4, exec_timeout_s=10.0, temperature=1.0)


@pytest.fixture(scope="module")
def evaluated(miniature, tmp_path_factory):
    rng = random.Random(11)
    # Difficulty under MATH-500's name for it, "level".
    problems = [{**example_problem(rng, i)[0], "level": 1 + i % 2} for i in range(3)]
    out = str(tmp_path_factory.mktemp("eval"))
    spec = EvalSpec(methods=("greedy", "majority", "best_of_n", "beam", "mcts"), ns=(1, 2), beam_width=2,
                    bootstrap=200)
    lines = []
    summary = evaluate(problems, set_name="mini", policy_dir=miniature["policy"], reward_dir=miniature["ppm"],
                       out_dir=out, spec=spec, search_config=SMALL, progress=lines.append)
    return problems, out, spec, summary, lines


def test_every_method_and_n_has_a_row(evaluated):
    problems, out, spec, summary, _ = evaluated
    got = {(r["method"], r["n"]) for r in summary["rows"]}
    assert got == {("greedy", 1), ("beam", 2)} | {(m, n) for n in (1, 2) for m in (
        "majority", "best_of_n", "mcts/top_score", "mcts/majority_of_top_k", "mcts/weighted_vote")}
    for r in summary["rows"]:
        assert r["num_problems"] == 3 and len(r["correct"]) == 3
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert set(r["by_difficulty"]) == {"1", "2"}
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["rows"] == summary["rows"]
    assert open(os.path.join(out, "scaling.png"), "rb").read(8) == PNG
    assert "| mini | greedy | 1 |" in open(os.path.join(out, "report.md")).read()


def test_results_agree_with_the_raw_samples_and_searches(evaluated):
    problems, out, _, summary, _ = evaluated
    rows = {(r["method"], r["n"]): r for r in summary["rows"]}
    with open(os.path.join(out, "methods", "greedy.json")) as f:
        greedy = json.load(f)["pools"]
    assert rows["greedy", 1]["correct"] == [pool[0]["correct"] is True for pool in greedy]
    with open(os.path.join(out, "methods", "samples.json")) as f:
        samples = json.load(f)["pools"]
    # One sample: majority and best-of-N both answer with it.
    first = [pool[0]["correct"] is True for pool in samples]
    assert rows["majority", 1]["correct"] == first == rows["best_of_n", 1]["correct"]
    # The reward model's ranking of the answers best-of-N chose among; majority vote never reads scores.
    assert rows["best_of_n", 2]["reward_auc"] == report.ranking_auc(samples)
    assert "reward_auc" not in rows["majority", 2] and "reward_auc" not in rows["greedy", 1]
    tokens = lambda n: sum(t["num_tokens"] for pool in samples for t in pool[:n]) / 3
    assert rows["majority", 2]["tokens_per_problem"] == pytest.approx(tokens(2))
    # One search: all three selections pick its answer; two searches cost the tokens of both.
    runs = report.run_answers(json.loads(line) for line in open(os.path.join(out, "mcts", "trees.jsonl")))
    one = [runs[p["id"]][0]["correct"] is True for p in problems]
    for rule in ("top_score", "majority_of_top_k", "weighted_vote"):
        assert rows[f"mcts/{rule}", 1]["correct"] == one
        assert rows[f"mcts/{rule}", 2]["reward_auc"] == report.ranking_auc([runs[p["id"]] for p in problems])
    assert sorted(t["seed"] for p in problems for t in runs[p["id"]]) == [0, 0, 0, 1, 1, 1]
    assert rows["mcts/top_score", 2]["tokens_per_problem"] == pytest.approx(
        sum(t["num_tokens"] for p in problems for t in runs[p["id"]]) / 3)
    assert rows["mcts/top_score", 2]["tokens_per_problem"] > rows["mcts/top_score", 1]["tokens_per_problem"] > 0


def test_a_rerun_reuses_finished_methods(evaluated, miniature):
    problems, out, spec, summary, _ = evaluated
    lines = []
    again = evaluate(problems, set_name="mini", policy_dir=miniature["policy"], reward_dir=miniature["ppm"],
                     out_dir=out, spec=spec, search_config=SMALL, progress=lines.append)
    assert sum("reusing" in line for line in lines) == 3  # greedy, samples, beam; MCTS resumes its trees file
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    assert strip(again["rows"]) == strip(summary["rows"])
    # The trees resume by search settings; searches of other models on that directory are refused up front.
    with pytest.raises(ValueError, match="mcts/trees.jsonl holds searches by policy"):
        evaluate(problems, set_name="mini", policy_dir=miniature["policy"] + "/", reward_dir=miniature["ppm"],
                 out_dir=out, spec=spec, search_config=SMALL)


def test_methods_needing_a_reward_model_are_refused_without_one(tmp_path):
    with pytest.raises(ValueError, match="need a reward model"):
        evaluate([{"id": "a", "question": "q", "answer": "1"}], set_name="s", policy_dir="unused", reward_dir=None,
                 out_dir=str(tmp_path), spec=EvalSpec(methods=("mcts",)), search_config=SMALL)
    with pytest.raises(ValueError, match="unknown method"):
        EvalSpec(methods=("greedy", "oracle"))
    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--problems=x.jsonl", "--policy=p",
                           f"--out={tmp_path}", "--methods=greedy,best_of_n"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "needs --reward_model" in proc.stderr


@pytest.mark.parametrize("flag, message", [
    ("--bootstrap=0", "flag --bootstrap=0: 0 is not a positive integer"),
    ("--bootstrap=-5", "flag --bootstrap=-5"),
    ("--vote_top_k=0", "flag --vote_top_k=0"),
    ("--beam_width=0", "flag --beam_width=0"),
    ("--methods=", "--methods must name at least one method"),
    ("--set_name=", "--set_name must not be empty"),
    ("--ns=1,abc", "--ns must be positive integers"),
    ("--ns=0", "--ns must be positive integers"),
])
def test_bad_settings_are_refused_before_anything_is_loaded(tmp_path, flag, message):
    """Found at parse time, not after all generation and search (where they were first used)."""
    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--problems=x.jsonl", "--policy=p",
                           f"--out={tmp_path}", "--methods=greedy", flag], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not os.listdir(tmp_path)


def test_spec_model_and_problem_set_checks(tmp_path, miniature):
    for bad, message in ((dict(methods=()), "no methods"), (dict(vote_top_k=0), "vote_top_k=0 must be >= 1"),
                         (dict(bootstrap=-5, beam_width=0), "beam_width=0, bootstrap=-5 must be >= 1")):
        with pytest.raises(ValueError, match=message):
            EvalSpec(**bad)
    from rstar_jax.errors import InputError
    with pytest.raises(InputError, match="empty: no problems to evaluate"):
        evaluate([], set_name="empty", policy_dir="unused", reward_dir=None, out_dir=str(tmp_path), spec=EvalSpec(),
                 search_config=SMALL)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for policy, message in (("p", "--policy: p: no such directory"),
                            (miniature["policy"], f"--problems={empty}: no problems")):
        proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--problems={empty}",
                               f"--policy={policy}", f"--out={tmp_path / 'out'}", "--methods=greedy"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_method_killed_midway_resumes_from_its_finished_chunks(tmp_path, monkeypatch):
    from experiments import evaluate as ev
    monkeypatch.setattr(ev, "CHUNK_PROBLEMS", 2)
    problems = [{"id": f"p{i}"} for i in range(5)]
    computed = []

    def compute(chunk, die_after=None):
        if die_after is not None and len(computed) >= die_after:
            raise KeyboardInterrupt  # the kill
        computed.extend(p["id"] for p in chunk)
        return [[{"answer": p["id"]}] for p in chunk]

    path, lines = str(tmp_path / "greedy.json"), []
    with pytest.raises(KeyboardInterrupt):
        ev._cached(path, "d1", problems, lambda chunk: compute(chunk, die_after=2), lines.append)
    with open(path + ".partial.jsonl", "a") as f:
        f.write('{"ids": ["p2"')  # and a write the kill cut short
    raw = ev._cached(path, "d1", problems, compute, lines.append)
    assert computed == ["p0", "p1", "p2", "p3", "p4"]  # each problem once
    assert [pool[0]["answer"] for pool in raw["pools"]] == [p["id"] for p in problems]
    assert "evaluate: resuming greedy.json: 2/5 problems done" in lines and not os.path.exists(path + ".partial.jsonl")
    assert any(line.startswith("evaluate: greedy.json: 4/5 problems,") and "ETA" in line for line in lines), lines
    assert ev._cached(path, "d1", problems, lambda chunk: 1 / 0, lines.append) == raw  # complete: reused
    computed.clear()
    assert ev._cached(path, "d2", problems, compute, lines.append)["digest"] == "d2" and len(computed) == 5
