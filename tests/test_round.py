"""experiments.round: flags and inputs checked before anything is written, and flags pinned per run directory."""
import json
import os
import subprocess
import sys

import numpy as np
import safetensors.numpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _round(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "experiments.round", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _fake_model(path):
    """A directory that passes the up-front check (a Qwen2 config.json, safetensors weights, a tokenizer file) and
    fails when a stage loads it (the weights are not the model's, the tokenizer file is empty)."""
    from rstar_jax.models.config import preset
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(preset("tiny").to_hf_dict()))
    safetensors.numpy.save_file({"x": np.zeros(1, np.float32)}, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text("{}")
    return path


def _problems(tmp_path, name="p.jsonl"):
    path = tmp_path / name
    path.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    return path


def test_bad_flags_and_missing_inputs_are_refused_before_anything_is_written(tmp_path):
    problems, base, run = _problems(tmp_path), _fake_model(tmp_path / "base"), tmp_path / "run"
    common = [f"--run_dir={run}", f"--problems={problems}", f"--eval_problems={problems}"]
    out = _round(*common, f"--base_model={tmp_path / 'no_such_model'}")
    assert out.returncode != 0 and "base model" in out.stderr and "does not exist (pass" in out.stderr, out.stderr
    out = _round(*common, f"--base_model={tmp_path}")
    assert out.returncode != 0 and f"base model: {tmp_path}: no config.json (not an HF model" in out.stderr
    broken = _fake_model(tmp_path / "broken")
    (broken / "config.json").write_text("{")
    out = _round(*common, f"--base_model={broken}")
    assert out.returncode != 0 and f"base model: {broken}/config.json: not valid JSON" in out.stderr, out.stderr
    (broken / "config.json").write_text((base / "config.json").read_text())
    (broken / "model.safetensors").unlink()
    out = _round(*common, f"--base_model={broken}")
    assert out.returncode != 0 and f"{broken}: no model.safetensors or model.safetensors.index" in out.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = _round(*common[:2], f"--eval_problems={empty}", f"--base_model={base}")
    assert out.returncode != 0 and f"--eval_problems={empty}: no problems in it" in out.stderr, out.stderr
    out = _round(*common, f"--base_model={base}", "--round=2")
    assert out.returncode != 0 and "round_1/policy/hf does not exist (run round 1 first" in out.stderr, out.stderr
    out = _round(*common, f"--base_model={base}", "--round=3", "--mode=ppm", f"--policy={base}")
    assert out.returncode != 0 and "round_2/ppm/hf does not exist" in out.stderr, out.stderr
    out = _round(*common, f"--base_model={base}", "--rollouts=0")
    assert out.returncode != 0 and "bad flag value: --rollouts must be >= 1, got 0" in out.stderr, out.stderr
    for flag, message in (("--sft_learning_rate=-1", "--sft_learning_rate=-1.0 must be positive"),
                          ("--ppm_batch_size=0", "--ppm_batch_size=0 must be a positive multiple"),
                          ("--sft_mesh=1,1", "--sft_mesh must be 3 sizes"),
                          ("--ppm_mesh=1,8,1", "--ppm_mesh=1,8,1 does not fit the devices of all processes"),
                          ("--search_mesh=2,1,1", "--search_mesh=2,1,1 does not fit this host's devices"),
                          ("--temperature=-1", "--temperature must be >= 0"),
                          ("--miniature_eval_difficulties=9", "--miniature_eval_difficulties must be one or more of"),
                          ("--limit=-5", "--limit")):
        out = _round(*common, f"--base_model={base}", flag)
        assert out.returncode != 0 and message in out.stderr, (flag, out.stderr)
    out = _round(f"--run_dir={run}", f"--problems={tmp_path / 'nope.jsonl'}", f"--eval_problems={problems}",
                 f"--base_model={base}")
    assert out.returncode != 0 and f"--problems={tmp_path / 'nope.jsonl'}" in out.stderr, out.stderr
    out = _round(*common[:2], f"--eval_problems={tmp_path / 'nope.jsonl'}", f"--base_model={base}")
    assert out.returncode != 0 and "--eval_problems=" in out.stderr, out.stderr
    out = _round(*common, f"--base_model={base}", "--eval_methods=greedy,vibes")
    assert out.returncode != 0 and "--eval_methods" in out.stderr and "vibes" in out.stderr, out.stderr
    out = _round(*common, f"--base_model={base}", "--reward_models=pqm")
    assert out.returncode != 0 and "--reward_models=pqm: must include ppm" in out.stderr, out.stderr
    out = _round(*common, f"--base_model={base}", "--mode=inference", f"--ppm={base}")
    assert out.returncode != 0 and "--mode=inference scores answers with the PPM" in out.stderr, out.stderr
    out = _round(*common, f"--base_model={base}", "--run_dir=gs://bucket/run")
    assert out.returncode != 0 and "--run_dir=gs://bucket/run" in out.stderr and "gcsfuse" in out.stderr
    assert not run.exists(), "a failed start wrote to the run directory"
    # The corrected command starts: it pins its flags and fails only where a stage loads the fake model.
    out = _round(*common, f"--base_model={base}")
    assert out.returncode != 0 and "[search]" in out.stdout + out.stderr and "saved" not in out.stderr
    assert "warning: round" not in out.stderr
    assert json.loads((run / "round_1" / "flags.json").read_text())["rollouts"] == 8


def test_conflicting_flags_on_a_run_directory_are_refused(tmp_path):
    problems, base = _problems(tmp_path), _fake_model(tmp_path / "base")
    common = [f"--run_dir={tmp_path / 'run'}", f"--problems={problems}"]
    out = _round(*common, f"--eval_problems={problems}", f"--base_model={base}", "--rollouts=8",
                 "--progress_every_s=5")
    assert out.returncode != 0 and "[search]" in out.stdout + out.stderr, out.stderr  # pinned, then a stage failed
    out = _round(*common, f"--eval_problems={problems}", f"--base_model={base}", "--rollouts=16",
                 "--progress_every_s=99", "--sft_loss_chunk=256", "--ppm_remat",
                 "--score_cache_mib=64", "--policy_cache_mib=0")  # these may change freely
    assert out.returncode != 0, out.stderr
    assert "--rollouts: saved 8, now 16" in out.stderr, out.stderr
    assert not [w for w in ("progress_every_s", "loss_chunk", "remat", "cache_mib") if w in out.stderr], out.stderr
    # A training stage's flags may be corrected until that stage is complete (its checkpoints refuse other
    # settings themselves); then they are pinned like the started search's.
    flags_json = tmp_path / "run" / "round_1" / "flags.json"
    out = _round(*common, f"--eval_problems={problems}", f"--base_model={base}", "--sft_learning_rate=3e-5")
    assert out.returncode != 0 and "saved" not in out.stderr and "[search]" in out.stdout + out.stderr, out.stderr
    assert json.loads(flags_json.read_text())["sft_learning_rate"] == 3e-5
    (tmp_path / "run" / "round_1" / "policy").mkdir()
    (tmp_path / "run" / "round_1" / "policy" / "DONE.json").write_text("{}")
    out = _round(*common, f"--eval_problems={problems}", f"--base_model={base}", "--sft_learning_rate=1e-4")
    assert out.returncode != 0 and "--sft_learning_rate: saved 3e-05, now 0.0001" in out.stderr, out.stderr
    # Rounds share the base model and the evaluation set: round 2 may not change them.
    _fake_model(tmp_path / "run" / "round_1" / "policy" / "hf")
    other_base, other_eval = _fake_model(tmp_path / "base2"), _problems(tmp_path, "q.jsonl")
    out = _round(*common, "--round=2", f"--eval_problems={other_eval}", f"--base_model={other_base}")
    assert out.returncode != 0 and f"{tmp_path / 'run' / 'flags.json'}" in out.stderr, out.stderr
    assert f"--base_model: saved '{base}', now '{other_base}'" in out.stderr, out.stderr
    assert f"--eval_problems: saved '{problems}', now '{other_eval}'" in out.stderr, out.stderr


def test_the_miniature_flags_are_pinned_for_every_round(tmp_path):
    """Rounds share the miniature's data and base model, so a later round may not change their flags."""
    base = _fake_model(tmp_path / "base")
    _fake_model(tmp_path / "run" / "round_1" / "policy" / "hf")
    common = [f"--run_dir={tmp_path / 'run'}", "--problems=miniature", f"--base_model={base}"]
    out = _round(*common, "--round=2")
    assert out.returncode != 0 and "round 1's policy stage is not complete" in out.stderr, out.stderr
    (tmp_path / "run" / "round_1" / "policy" / "DONE.json").write_text("{}")
    out = _round(*common, "--round=2", "--miniature_pool=8")  # pins, builds the data, fails at the fake policy
    assert out.returncode != 0 and (tmp_path / "run" / "miniature" / "data" / "DONE.json").exists(), out.stderr
    out = _round(*common, "--round=3", f"--policy={base}", "--miniature_pool=16")
    assert out.returncode != 0 and "--miniature_pool: saved 8, now 16" in out.stderr, out.stderr
    # Round 3 with round 2's settings (terminal-guided) is allowed, with a warning.
    assert "warning: round 3 searches with --mode=terminal, where the paper's round 3 is ppm" in out.stderr
