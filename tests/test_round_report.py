"""The rounds' report: rounds.md, rounds.json and the per-round plots, from the stages' summaries alone."""
import json

from experiments import round as round_cli
from experiments.stages import write_json_atomic


def _done(path, summary):
    path.mkdir(parents=True)
    write_json_atomic(str(path / "DONE.json"), summary)


def _row(method, n, accuracy):
    return {"method": method, "n": n, "accuracy": accuracy}


def test_round_report_has_every_figure_of_its_table_in_json(tmp_path):
    run = tmp_path / "run"
    _done(run / "base_eval", {"rows": [_row("greedy", 1, 0.2)]})
    for k, (greedy, maj, coverage) in enumerate([(0.25, 0.3, 0.5), (0.35, 0.4, 0.625)], start=1):
        rows = [_row("greedy", 1, greedy), _row("majority", 1, 0.1), _row("majority", 4, maj)]
        _done(run / f"round_{k}" / "eval", {"rows": rows})
        _done(run / f"round_{k}" / "search", {"coverage_by_difficulty": {"all": coverage, "3": coverage / 2}})

    text = round_cli.round_report(str(run), 2)

    out = run / "round_2" / "eval"
    assert (out / "rounds.md").read_text() == text
    assert "| 2 | 35.0% | 40.0% | 62.5% |" in text  # majority at its largest N
    assert "| 0 | 20.0% |  |  |" in text  # the base model: greedy only, no search
    rounds = json.loads((out / "rounds.json").read_text())
    assert rounds["schema"] == round_cli.ROUNDS_SCHEMA and rounds["run_dir"] == str(run)
    assert rounds["rounds"] == [
        {"round": 0, "accuracy": {"greedy": 0.2, "majority": None}, "coverage": None},
        {"round": 1, "accuracy": {"greedy": 0.25, "majority": 0.3}, "coverage": {"all": 0.5, "3": 0.25}},
        {"round": 2, "accuracy": {"greedy": 0.35, "majority": 0.4}, "coverage": {"all": 0.625, "3": 0.3125}}]
    for png in ("accuracy_per_round.png", "coverage_per_round.png"):
        assert (out / png).stat().st_size > 1000


def test_a_round_started_from_given_models_reports_without_earlier_rounds(tmp_path):
    """Round 2 run with --policy/--ppm on a fresh run directory: no round 1 there, and the report still reads."""
    run = tmp_path / "run"
    _done(run / "base_eval", {"rows": [_row("greedy", 1, 0.2)]})
    _done(run / "round_2" / "eval", {"rows": [_row("greedy", 1, 0.25)]})
    _done(run / "round_2" / "search", {"coverage_by_difficulty": {"all": 0.5}})
    text = round_cli.round_report(str(run), 2)
    assert "| 1 |  |  |" in text and "| 2 | 25.0% | 50.0% |" in text, text
