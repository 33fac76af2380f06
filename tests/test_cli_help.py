"""Every program's --help lists all of its flags, including those defined by the modules it shares."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("program,flag_names", [
    ("round", ["run_dir", "rollouts", "num_candidates", "sft_learning_rate", "ppm_epochs", "coordinator_address"]),
    ("search", ["problems", "rollouts", "min_edit_distance", "coordinator_address"]),
    ("evaluate", ["methods", "num_candidates", "temperature"]),
    ("sft", ["learning_rate", "train_records", "mesh", "loss_chunk"]),
    ("train_rm", ["task", "head_dropout", "learning_rate"]),
    ("expand", ["coordinator_address"]),
])
def test_help_lists_every_flag(program, flag_names):
    out = subprocess.run([sys.executable, "-m", f"experiments.{program}", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    text = out.stdout + out.stderr
    missing = [name for name in flag_names if f"--{name}:" not in text]
    assert not missing, f"experiments.{program} --help does not list {missing}"
