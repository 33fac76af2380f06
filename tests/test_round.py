"""experiments.round: inputs checked before any stage runs, and flags pinned per run directory."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _round(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "experiments.round", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_missing_inputs_are_refused_before_any_stage_runs(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    common = [f"--run_dir={tmp_path / 'run'}", f"--problems={problems}", f"--eval_problems={problems}"]
    out = _round(*common, f"--base_model={tmp_path / 'no_such_model'}")
    assert out.returncode != 0 and "base model" in out.stderr and "does not exist" in out.stderr, out.stderr
    out = _round(*common, f"--base_model={tmp_path}", "--round=2")
    assert out.returncode != 0 and "round_1/policy/hf does not exist (run round 1 first" in out.stderr, out.stderr
    out = _round(*common, f"--base_model={tmp_path}", "--round=3", "--mode=ppm", f"--policy={tmp_path}")
    assert out.returncode != 0 and "round_2/ppm/hf does not exist" in out.stderr, out.stderr
    assert not os.path.exists(tmp_path / "run" / "miniature"), "a stage ran before the inputs were checked"


def test_conflicting_flags_on_a_run_directory_are_refused(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    common = [f"--run_dir={tmp_path / 'run'}", f"--problems={problems}", f"--eval_problems={problems}",
              f"--base_model={tmp_path / 'missing'}"]
    _round(*common, "--rollouts=8", "--progress_every_s=5")
    out = _round(*common, "--rollouts=16", "--progress_every_s=99")  # progress_every_s may change freely
    assert out.returncode != 0, out.stderr
    assert "--rollouts: saved 8, now 16" in out.stderr and "progress_every_s" not in out.stderr, out.stderr


def test_the_miniature_flags_are_pinned_for_every_round(tmp_path):
    """Rounds share the miniature's data and base model, so a later round may not change their flags."""
    common = [f"--run_dir={tmp_path / 'run'}", "--problems=miniature", "--base_model=miniature"]
    out = _round(*common, "--round=2", "--miniature_pool=8")  # pins, then stops: round 1 is missing
    assert out.returncode != 0 and "round_1/policy/hf does not exist" in out.stderr, out.stderr
    out = _round(*common, "--round=3", "--miniature_pool=16")
    assert out.returncode != 0 and "--miniature_pool: saved 8, now 16" in out.stderr, out.stderr
    assert "miniature/flags.json" in out.stderr
