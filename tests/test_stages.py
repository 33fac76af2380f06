"""Run-directory stages: completion markers, skipping, and pinned flags."""
import json
import os

import pytest

from experiments import stages


def test_stage_runs_once_and_an_interrupted_stage_runs_again(tmp_path):
    calls = []

    def work(d):
        calls.append(d)
        if len(calls) == 1:
            raise KeyboardInterrupt  # interrupted: no DONE marker
        with open(os.path.join(d, "out.txt"), "w") as f:
            f.write("x")
        return {"rows": 3}

    with pytest.raises(KeyboardInterrupt):
        stages.run_stage("s", str(tmp_path / "s"), work, log=lambda m: None)
    assert not stages.is_done(str(tmp_path / "s"))
    summary = stages.run_stage("s", str(tmp_path / "s"), work, log=lambda m: None)
    assert summary["rows"] == 3 and stages.is_done(str(tmp_path / "s"))
    again = stages.run_stage("s", str(tmp_path / "s"), work, log=lambda m: None)
    assert again == summary and len(calls) == 2


def test_pinned_flags_refuse_conflicts_and_ignore_listed_ones(tmp_path):
    stages.pin_flags(str(tmp_path), {"rollouts": 8, "seed": 0, "progress_every_s": 30.0})
    stages.pin_flags(str(tmp_path), {"rollouts": 8, "seed": 0, "progress_every_s": 5.0}, ignore=["progress_every_s"])
    with pytest.raises(stages.FlagConflictError, match=r"--rollouts: saved 8, now 16"):
        stages.pin_flags(str(tmp_path), {"rollouts": 16, "seed": 0, "progress_every_s": 30.0})
    with open(tmp_path / "flags.json") as f:
        assert json.load(f)["rollouts"] == 8
