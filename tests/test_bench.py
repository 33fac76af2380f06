"""The benchmarks run end to end on a small workload and end with their `ratio=` line."""
import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("args, sides", [
    (["experiments.bench.decode", "--num_prompts=2", "--min_len=16", "--max_len=24", "--n=2", "--new_tokens=4"],
     ("ours:", "hf:")),
    (["experiments.bench.decode", "--against=xla_defaults", "--preset=tiny", "--num_prompts=2", "--min_len=16",
      "--max_len=24", "--n=2", "--new_tokens=4"], ("ours:", "ours with XLA's default")),
    (["experiments.bench.decode", "--against=one_call", "--preset=tiny", "--num_prompts=3", "--min_len=16",
      "--max_len=24", "--n=2", "--new_tokens=4"], ("ours:", "ours with one batch per call")),
    (["experiments.bench.decode", "--against=whole_prefill", "--preset=tiny", "--num_prompts=2", "--min_len=16",
      "--max_len=24", "--n=2", "--new_tokens=4", "--step_len=8"], ("ours:", "ours prefilling every prompt whole")),
    (["experiments.bench.train", "--batch=2", "--seq_len=32", "--steps=1", "--dtype=bfloat16",
      "--attention_impl=dot_product"], ("ours:", "hf:")),
    (["experiments.bench.score", "--preset=tiny", "--leaves=3", "--children=2", "--min_len=8", "--max_len=16",
      "--step_len=4", "--repeats=1"], ("whole:", "grouped:")),
    # The tree benchmark also checks its trees against the Python reference's, node by node.
    (["experiments.bench.tree", "--batch=8", "--n=4", "--max_depth=4", "--rollouts=2", "--python_trees=8",
      "--nomctx"], ("(a) ours", "(b) Python reference", "    check: on its 8 trees")),
    (["experiments.bench.executor", "--num_programs=6", "--num_fresh=2", "--repeats=1", "--num_workers=1"],
     ("(a) sandbox:", "(b) fresh python -c:", "(c) warm exec pool:")),
], ids=["decode", "decode_xla_defaults", "decode_one_call", "decode_whole_prefill", "train", "score", "tree",
        "executor"])
def test_benchmark_prints_both_sides_and_a_ratio(args, sides):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert all(any(line.startswith(side) for line in lines) for side in sides), lines
    assert re.fullmatch(r"ratio=\d+\.\d\d( isolation_cost=\d+\.\d\d)?", lines[-1]), lines[-1]
