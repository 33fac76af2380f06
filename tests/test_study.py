"""experiments.study: runs side by side from their stages' summaries."""
import json
import os
import subprocess
import sys

import pytest

from experiments import study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(method, n, by):
    return {"set": "miniature", "method": method, "n": n, "accuracy": sum(by.values()) / len(by),
            "by_difficulty": {str(d): v for d, v in by.items()}}


def _write(path, summary):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "DONE.json"), "w") as f:
        json.dump(summary, f)


def _fake_run(root, base_greedy, rounds):
    """rounds: [(greedy, majority@2, mcts@2, coverage)] with accuracy (d3, d4) pairs."""
    _write(root / "base_eval", {"rows": [_row("greedy", 1, {3: base_greedy[0], 4: base_greedy[1]})]})
    for k, (greedy, majority, mcts, coverage) in enumerate(rounds, 1):
        _write(root / f"round_{k}" / "eval", {"rows": [
            _row("greedy", 1, dict(zip((3, 4), greedy))), _row("majority", 2, dict(zip((3, 4), majority))),
            _row("mcts/top_score", 2, dict(zip((3, 4), mcts)))]})
        _write(root / f"round_{k}" / "search", {"coverage_by_difficulty": {"all": coverage, "1": 1.0}})
    return str(root)


def test_means_sds_and_paired_claims(tmp_path):
    a = _fake_run(tmp_path / "a", (0.2, 0.0), [((0.4, 0.2), (0.4, 0.4), (0.6, 0.4), 0.5),
                                               ((0.6, 0.2), (0.6, 0.4), (0.8, 0.6), 0.7)])
    b = _fake_run(tmp_path / "b", (0.4, 0.2), [((0.4, 0.0), (0.6, 0.2), (0.6, 0.2), 0.6),
                                               ((0.4, 0.4), (0.4, 0.4), (0.4, 0.4), 0.5)])
    result = study.study([study.load_run(a), study.load_run(b)], ["4"])
    acc = {(r["round"], r["method"], r["n"]): r for r in result["accuracy"]}
    assert set(acc) == {(0, "greedy", 1)} | {(k, m, n) for k in (1, 2) for m, n in
                                             (("greedy", 1), ("majority", 2), ("mcts/top_score", 2))}
    assert acc[(2, "greedy", 1)]["values"] == [0.2, 0.4]
    assert acc[(2, "mcts/top_score", 2)]["mean"] == pytest.approx(0.5)
    assert acc[(2, "mcts/top_score", 2)]["sd"] == pytest.approx(0.1414, abs=1e-3)
    claims = {c["claim"]: c for c in result["claims"]}
    assert claims["round 2 greedy - base greedy"]["values"] == pytest.approx([0.2, 0.2])
    assert claims["round 2 greedy - base greedy"]["held"] == 2
    assert claims["round 2 mcts/top_score@2 - majority@2"]["values"] == pytest.approx([0.2, 0.0])
    assert claims["round 2 mcts/top_score@2 - majority@2"]["held"] == 1
    assert claims["coverage round 2 - round 1"]["values"] == pytest.approx([0.2, -0.1])
    # Both difficulties: their mean.
    both = study.study([study.load_run(a)], ["3", "4"])
    assert both["accuracy"][0]["values"] == [pytest.approx(0.1)]


def test_the_command_writes_markdown_and_json_and_names_an_unfinished_run(tmp_path):
    a = _fake_run(tmp_path / "a", (0.2, 0.0), [((0.4, 0.2), (0.4, 0.4), (0.6, 0.4), 0.5)])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.study", f"--runs={a}", "--difficulties=4",
                           f"--out={out}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| 1 | mcts/top_score | 2 | 40.0 ± 0.0 |" in (out / "study.md").read_text()
    assert json.loads((out / "study.json").read_text())["runs"] == 1
    proc = subprocess.run([sys.executable, "-m", "experiments.study", f"--runs={a},{tmp_path / 'nope'}",
                           f"--out={out}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "nope has no finished base model evaluation" in proc.stderr


def _study(*args):
    return subprocess.run([sys.executable, "-m", "experiments.study", *args], cwd=REPO, capture_output=True, text=True)


def test_runs_of_different_lengths_are_compared_on_their_common_rounds(tmp_path):
    rnd = ((0.4, 0.2), (0.4, 0.4), (0.6, 0.4), 0.5)
    a = _fake_run(tmp_path / "a", (0.2, 0.0), [rnd, rnd])
    b = _fake_run(tmp_path / "b", (0.4, 0.2), [rnd])
    base_only = _fake_run(tmp_path / "c", (0.4, 0.2), [])
    out = tmp_path / "out"
    proc = _study(f"--runs={a},{b}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "study.json").read_text())
    assert {r["round"] for r in result["accuracy"]} == {0, 1}
    assert result["notes"] == [f"runs with fewer rounds: {b} (1 of 2 rounds); compared on rounds 0-1, the rounds "
                               "all runs have"]
    assert f"Note: runs with fewer rounds: {b}" in (out / "study.md").read_text()
    # Only the base model in common: refused, never a claim of round 0 over itself.
    proc = _study(f"--runs={a},{base_only}", f"--out={tmp_path / 'out2'}")
    assert proc.returncode == 1 and "no finished round in common" in proc.stderr and f"{base_only} (0 of 2 rounds)" in (
        proc.stderr)
    assert "Traceback" not in proc.stderr and not (tmp_path / "out2").exists()
    assert not study.claims(study.study([study.load_run(base_only)], [])["accuracy"], [], 0)


def test_bad_difficulties_duplicate_runs_and_bad_summaries_are_named(tmp_path):
    rnd = ((0.4, 0.2), (0.4, 0.4), (0.6, 0.4), 0.5)
    a = _fake_run(tmp_path / "a", (0.2, 0.0), [rnd])
    proc = _study(f"--runs={a}", "--difficulties=4,9", f"--out={tmp_path / 'o'}")
    assert proc.returncode == 1 and "--difficulties: 9 not evaluated in any run; the runs have 3, 4" in proc.stderr
    proc = _study(f"--runs={a},{a}/", f"--out={tmp_path / 'o'}")
    assert proc.returncode == 1 and f"--runs: {a}/ is listed twice (also as {a})" in proc.stderr
    bad = [("{oops", "not valid JSON"), ('{"summary": 1}', "field 'rows': expected a list of evaluation rows, "
                                                          "got nothing (missing)"),
           ('{"rows": [{"method": "greedy", "n": 1, "accuracy": 0.5}]}', "rows[0]: missing field(s) 'by_difficulty'")]
    for k, (text, message) in enumerate(bad):
        run = _fake_run(tmp_path / f"bad{k}", (0.2, 0.0), [rnd])
        (tmp_path / f"bad{k}" / "round_1" / "eval" / "DONE.json").write_text(text)
        proc = _study(f"--runs={a},{run}", f"--out={tmp_path / 'o'}")
        assert proc.returncode == 1 and f"{run}/round_1/eval/DONE.json: {message}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_row_some_run_lacks_is_left_out_with_a_note(tmp_path):
    a = _fake_run(tmp_path / "a", (0.2, 0.0), [((0.4, 0.2), (0.4, 0.4), (0.6, 0.4), 0.5)])
    b = _fake_run(tmp_path / "b", (0.4, 0.2), [((0.4, 0.0), (0.6, 0.2), (0.6, 0.2), 0.6)])
    _write(tmp_path / "b" / "round_1" / "eval", {"rows": [  # b: no majority vote, mcts on difficulty 3 only
        _row("greedy", 1, {3: 0.4, 4: 0.0}), _row("mcts/top_score", 2, {3: 0.6})]})
    result = study.study([study.load_run(a), study.load_run(b)], ["4"])
    assert {(r["round"], r["method"]) for r in result["accuracy"]} == {(0, "greedy"), (1, "greedy")}
    assert result["left_out"] == ["round 1 majority@2 left out: not measured on difficulties 4 in run 2 of 2",
                                  "round 1 mcts/top_score@2 left out: not measured on difficulties 4 in run 2 of 2"]
    out = tmp_path / "out"
    proc = _study(f"--runs={a},{b}", "--difficulties=4", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    assert "Note: round 1 majority@2 left out: not measured on difficulties 4 in run 2 of 2." in proc.stdout
    assert "left_out" not in json.loads((out / "study.json").read_text())
