"""`experiments.miniature_sets` writes the miniature's problems exactly as the rounds generate them."""
import json
import subprocess
import sys

from rstar_jax.data import miniature


def _run(*args):
    return subprocess.run([sys.executable, "-m", "experiments.miniature_sets", *args], capture_output=True, text=True,
                          timeout=120)


def test_eval_sets_and_pools_as_problem_files(tmp_path):
    out = _run("--split=eval", "--per_difficulty=3", "--difficulties=6,4", "--seed=2", f"--out={tmp_path / 'e.jsonl'}")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in open(tmp_path / "e.jsonl")]
    assert rows == miniature.make_eval_sets(3, 2, [6])[6] + miniature.make_eval_sets(3, 2, [4])[4]
    assert [r["difficulty"] for r in rows] == [6] * 3 + [4] * 3
    out = _run("--split=pool", "--num=5", "--seed=7", f"--out={tmp_path / 'p.jsonl'}")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in open(tmp_path / "p.jsonl")] == miniature.make_pool(5, 7)
    out = _run("--difficulties=0,9", f"--out={tmp_path / 'x.jsonl'}")
    assert out.returncode != 0 and "--difficulties must be integers 1..7" in out.stderr
