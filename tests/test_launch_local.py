"""launch/local.sh starts N processes joined by jax.distributed; expand splits the problems between them."""
import json
import os
import subprocess
import sys


def test_local_launcher_runs_expand_on_two_processes(tmp_path):
    proc = subprocess.run(
        ["bash", "launch/local.sh", "2", "expand", "experiments/configs/miniature_expand.flags", f"--out={tmp_path}",
         "--warmup_steps=2", "--n=2", "--max_step_tokens=8"],
        capture_output=True, text=True, timeout=400,
        env={**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ids = []
    for i in range(2):  # 4 problems, round-robin: two each
        lines = (tmp_path / f"process_{i}" / "candidates.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == 4  # 2 problems x n=2
        ids += sorted({r["problem_id"] for r in records})
    assert sorted(ids) == [f"mini/{i}" for i in range(4)]

