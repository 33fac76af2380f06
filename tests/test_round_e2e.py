"""experiments.round end to end: three rounds on a tiny pool whose base model was taught that pool.

Round 1 and 2 search terminal-guided, round 3 with round 2's PPM; round 1 also trains a PQM and an ORM;
every stage writes its outputs, a second invocation of a finished round skips every stage, and the report
covers rounds 0-3.
"""
import json
import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A pool of 6 one- and two-step problems, and a tiny base model trained on their teacher solutions."""
    from rstar_jax import tokenizer as tk
    from rstar_jax.data import miniature

    root = tmp_path_factory.mktemp("rounds")
    pool = miniature.make_pool(6, seed=3, difficulties=(1, 2), trap_rate=0.0, max_distractors=0)
    with open(root / "pool.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pool)
    rng = random.Random(0)
    records = [{"id": p["id"], "prompt": tk.format_prompt(p["question"]),
                "response": miniature.solve(p, rng, noise=0.0, trap_error_rate=0.0).text} for p in pool * 20]
    with open(root / "teacher.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    tk.build_sentencepiece_tokenizer([r["prompt"] + r["response"] for r in records], root / "tokenizer",
                                     vocab_size=400)
    # A subprocess on one device, like the rounds' own stages (in-process, on the suite's 8 fake devices,
    # XLA occasionally aborted here).
    _run([sys.executable, "-m", "experiments.sft", "--preset=tiny", f"--train_records={root / 'teacher.jsonl'}",
          f"--tokenizer_dir={root / 'tokenizer'}", f"--out_dir={root / 'base'}", "--max_len=256", "--batch_size=8",
          "--max_steps=200", "--learning_rate=3e-3", "--schedule=cosine", "--warmup_steps=20", "--weight_decay=0",
          "--checkpoint_every=1000", "--log_every=100"])
    return root


def _flags(root) -> list[str]:
    return [f"--problems={root / 'pool.jsonl'}", f"--eval_problems={root / 'pool.jsonl'}",
            f"--base_model={root / 'base' / 'hf'}", "--rollouts=2", "--num_candidates=3", "--max_depth=6",
            "--max_step_tokens=48", "--max_context_tokens=512", "--exec_timeout_s=10", "--min_edit_distance=0",
            "--sft_max_len=256", "--sft_batch_size=8", "--sft_epochs=1", "--sft_learning_rate=1e-4",
            "--sft_loss_chunk=64", "--ppm_max_len=256", "--ppm_batch_size=8", "--ppm_epochs=1", "--ppm_learning_rate=1e-3",
            "--eval_methods=greedy", "--progress_every_s=600"]


def _env(**env_vars):
    """The environment without the suite's 8 fake devices (each stage process sees one) and without its
    compilation cache (a round keeps its own in the run directory)."""
    dropped = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")
    return {**{k: v for k, v in os.environ.items() if k not in dropped}, **env_vars}


def _run(cmd, **env_vars):
    proc = subprocess.run(cmd, cwd=REPO, env=_env(**env_vars), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _round(root, k, *extra):
    return _run([sys.executable, "-m", "experiments.round", f"--run_dir={root / 'run'}", f"--round={k}",
                 *_flags(root), *extra])


@pytest.mark.slow
def test_three_rounds_resume_and_report(setup):
    root = setup
    run = root / "run"
    out = _round(root, 1, "--mode=terminal", "--reward_models=ppm,pqm,orm")
    for stage in ("search", "policy", "ppm", "pqm", "orm", "eval"):
        assert (run / "round_1" / stage / "DONE.json").exists(), stage
    assert (run / "round_1" / "policy" / "hf" / "config.json").exists()
    for model in ("ppm", "pqm", "orm"):  # round 1's reward models start from the base model (RSTAR.md section 6)
        assert (run / "round_1" / model / "hf" / "config.json").exists()
        assert json.loads((run / "round_1" / model / "config.json").read_text())["init_hf_dir"] == str(root / "base" / "hf")
    search = json.loads((run / "round_1" / "search" / "DONE.json").read_text())
    assert search["extracted"]["sft"] > 0 and search["coverage_by_difficulty"]["all"] > 0
    assert "[search] running" in out and "[base model evaluation] running" in out

    again = _round(root, 1, "--mode=terminal", "--reward_models=ppm,pqm,orm")  # complete: every stage is skipped
    assert "running" not in again and again.count("complete, skipped") == 7, again

    _round(root, 2, "--mode=terminal", "--max_rollouts_unsolved=4")
    ppm_2 = json.loads((run / "round_2" / "ppm" / "config.json").read_text())
    assert ppm_2["init_hf_dir"] == str(run / "round_2" / "policy" / "hf")  # later rounds: from the round's policy
    # Round 3 also asks for majority vote: the base model's evaluation is extended with it (greedy reused).
    out = _round(root, 3, "--mode=ppm", "--max_rollouts_unsolved=4", "--eval_methods=greedy,majority", "--eval_ns=1,2")
    assert "[base model evaluation] running" in out and "evaluate: reusing" in out, out
    trees = [json.loads(line) for line in open(run / "round_3" / "search" / "trees.jsonl")]
    assert trees and all(t["mode"] == "ppm" for t in trees)
    report = (run / "round_3" / "eval" / "rounds.md").read_text()
    for k in range(4):
        assert f"\n| {k} | " in report, report
    rounds = json.loads((run / "round_3" / "eval" / "rounds.json").read_text())
    assert [r["round"] for r in rounds["rounds"]] == [0, 1, 2, 3] and rounds["rounds"][0]["coverage"] is None
    majority = [r["accuracy"]["majority"] for r in rounds["rounds"]]
    assert majority[0] is not None and majority[1:3] == [None, None] and majority[3] is not None
    for k in (1, 2, 3):  # the same figures as the stages' summaries
        done = json.loads((run / f"round_{k}" / "eval" / "DONE.json").read_text())
        assert rounds["rounds"][k]["accuracy"]["greedy"] == done["rows"][0]["accuracy"]
        search = json.loads((run / f"round_{k}" / "search" / "DONE.json").read_text())
        assert rounds["rounds"][k]["coverage"] == search["coverage_by_difficulty"]
    assert (run / "round_3" / "eval" / "accuracy_per_round.png").stat().st_size > 1000
    assert (run / "round_3" / "eval" / "coverage_per_round.png").stat().st_size > 1000
    assert os.listdir(run / "jax_cache"), "compiled programs are cached in the run directory"


@pytest.mark.slow
def test_a_round_without_preference_pairs_stops_with_its_policy_saved(setup, tmp_path):
    cmd = [sys.executable, "-m", "experiments.round", f"--run_dir={tmp_path / 'run'}", "--round=1", *_flags(setup),
           "--mode=terminal", "--limit=2", "--min_margin=3"]  # Q differences are at most 2: no pair passes
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "yielded no preference pairs" in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "run" / "round_1" / "policy" / "DONE.json").exists()
    assert not (tmp_path / "run" / "round_1" / "ppm").exists()


@pytest.mark.slow
def test_a_round_as_two_processes(setup, tmp_path):
    """launch/local.sh: 2 processes x 4 fake CPU devices; each searches its half of the pool, process 0
    extracts from both, the SFT and PPM steps run over the 8-device global mesh, process 0 evaluates."""
    root, run = setup, tmp_path / "run"
    flagfile = tmp_path / "round.flags"
    flagfile.write_text("\n".join(_flags(root) + ["--round=1", "--mode=terminal"]) + "\n")
    out = _run(["bash", "launch/local.sh", "2", "round", str(flagfile), f"--run_dir={run}"],
               DEVICES_PER_PROCESS="4", PYTHON=sys.executable)
    assert out.count("mesh {'data': 8, 'fsdp': 1, 'tensor': 1}") == 2, out  # SFT and PPM on the global mesh
    search = run / "round_1" / "search"
    shards = [[json.loads(line)["problem_id"] for line in open(search / f"trees.process_{i}.jsonl")]
              for i in range(2)]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    assert len(shards[0]) + len(shards[1]) == 6
    buckets = [json.loads(line) for line in open(search / "extracted" / "buckets.jsonl")]
    assert sorted(b["id"] for b in buckets) == sorted(shards[0] + shards[1])  # merged from both processes
    sft = json.loads((run / "round_1" / "policy" / "metrics.json").read_text())
    assert sft["train"]["loss"] > 0
    for stage in ("search", "policy", "ppm", "eval"):
        assert (run / "round_1" / stage / "DONE.json").exists(), stage


@pytest.mark.slow
def test_a_round_that_solves_no_problem_stops_and_keeps_its_trees(setup, tmp_path):
    with open(setup / "pool.jsonl") as f:
        pool = [json.loads(line) for line in f][:2]
    impossible = tmp_path / "impossible.jsonl"
    impossible.write_text("".join(json.dumps({**p, "answer": "-987654321"}) + "\n" for p in pool))
    flags = [f for f in _flags(setup) if not f.startswith("--problems=")] + [f"--problems={impossible}"]
    cmd = [sys.executable, "-m", "experiments.round", f"--run_dir={tmp_path / 'run'}", "--round=1", *flags,
           "--mode=terminal"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "search solved none of the 2 pool problems" in proc.stderr, proc.stderr[-3000:]
    search = tmp_path / "run" / "round_1" / "search"
    assert len((search / "trees.jsonl").read_text().splitlines()) == 2  # kept: a rerun after a fix resumes
    assert not (search / "DONE.json").exists()
