"""The README's main job runs end to end: tokenizer, warm-up, sampling, sandbox, grader, records."""
import json
import subprocess
import sys


def test_expand_runs_every_stage(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.expand", f"--out={tmp_path}", "--warmup_steps=3", "--n=2",
         "--max_step_tokens=16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "candidates.jsonl").read_text().splitlines()]
    assert len(records) == 8  # 4 problems x n=2
    for r in records:
        assert r["kind"] in ("code", "answer") and r["finish_reason"] in ("stop", "eos", "length")
        assert ("failed" in r) if r["kind"] == "code" else ("equal" in r)
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    assert "8 candidates" in proc.stdout and "time: load" in proc.stdout
