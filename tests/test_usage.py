"""Bad input to a program ends it with one line that names the problem, and nothing written."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(program, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", f"experiments.{program}", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr[-3000:]  # the message alone: no traceback, no page of flag help
    return lines[0]


def test_bad_input_is_one_line_naming_it(tmp_path):
    out = tmp_path / "out"
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n{"id": "b", "question": 3}\n')
    assert _run("search", f"--problems={problems}", f"--policy={tmp_path / 'none'}", f"--out={out}") == (
        f"experiments.search: error: --policy: {tmp_path / 'none'}: no such directory")
    line = _run("search", f"--problems={problems}", f"--policy={tmp_path}", f"--out={out}", "--temperature=nan")
    assert line == "experiments.search: error: --temperature=nan must be a finite number (--help lists the flags)"
    line = _run("sft", f"--train_records={problems}", f"--out_dir={out}", f"--tokenizer_dir={tmp_path}")
    assert line == ("experiments.sft: error: give exactly one of --init_hf_dir (a model to start from) and --preset "
                    "(a fresh one)")
    line = _run("train_rm", "--task=ppm", f"--train_records={problems}", f"--eval_records={tmp_path}/./p.jsonl",
                f"--out_dir={out}", "--preset=tiny", f"--tokenizer_dir={tmp_path}")
    assert line == (f"experiments.train_rm: error: --eval_records and --train_records both list {problems}: held-out "
                    "figures on training data would measure memorisation")
    line = _run("round", "--round=5", f"--run_dir={out}")
    assert line == "experiments.round: error: --round must be 1..4, got 5 (--help lists the flags)"
    assert not out.exists()
