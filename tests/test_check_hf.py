"""`python -m experiments.check_hf`: passes on good directories, fails (non-zero) on corrupted ones."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from absl.testing import flagsaver

pytest.importorskip("torch")
from experiments import check_hf  # noqa: E402
from rstar_jax.models import hf_io  # noqa: E402
from tests.hf_fixtures import make_bpe_tokenizer, make_hf_qwen2  # noqa: E402

PROMPT = "the cat sat on the mat"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """An HF-written tied checkpoint with a byte-level BPE tokenizer."""
    out = str(tmp_path_factory.mktemp("policy"))
    make_hf_qwen2(out, tied=True, vocab=320)
    make_bpe_tokenizer(out, [PROMPT] * 20 + ["what is 12 * 7? it is 84."] * 20)
    return out


@pytest.fixture(scope="module")
def ppm_dir(tmp_path_factory):
    """An HF-written untied checkpoint plus a trl-style value head, and no tokenizer (fixed ids)."""
    out = str(tmp_path_factory.mktemp("ppm"))
    make_hf_qwen2(out, tied=False, rope_theta=1e6, heads=4, kv_heads=1, seed=1)
    _edit_weights(out, lambda t: t.update({
        "v_head.summary.weight": np.random.default_rng(0).normal(0, 0.5, (1, 64)).astype(np.float32),
        "v_head.summary.bias": np.array([0.3], np.float32)}))
    return out


def _edit_weights(hf_dir, edit):
    path = os.path.join(hf_dir, WEIGHTS)
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _corrupted_copy(src, dst, edit):
    shutil.copytree(src, dst)
    _edit_weights(str(dst), edit)
    return str(dst)


def _run(capsys, **flags):
    with flagsaver.flagsaver(**flags):
        status = check_hf.main(["check_hf"])
    return status, capsys.readouterr().out.strip().splitlines()


def _max_abs_diff(lines):
    assert lines[-1].startswith("max_abs_diff=")
    return float(lines[-1].split("=", 1)[1])


def test_good_policy_dir_passes(policy_dir, capsys):
    status, lines = _run(capsys, hf_dir=policy_dir, prompt=PROMPT)
    assert status == 0
    assert _max_abs_diff(lines) <= 1e-4
    assert any(f"from the tokenizer: {PROMPT!r}" in line for line in lines)
    rows = [line for line in lines if line.rstrip().endswith(("' mat'", "' cat'"))]
    assert len(rows) == 2 and all(" yes " in row for row in rows)  # per-position rows with decoded text
    assert "argmax agrees at 6/6 positions" in lines


def test_our_side_runs_at_full_matmul_precision(policy_dir, capsys, monkeypatch):
    """GPUs (TF32) and TPUs (bf16 passes) would miss the tolerance at XLA's default precision."""
    from jax._src import config as jax_config
    seen, run = [], check_hf._run_ours
    monkeypatch.setattr(check_hf, "_run_ours", lambda *a: seen.append(jax_config.default_matmul_precision.value)
                        or run(*a))
    assert _run(capsys, hf_dir=policy_dir)[0] == 0 and seen == ["highest"]


def test_good_ppm_dir_passes_and_compares_the_score(ppm_dir, capsys):
    status, lines = _run(capsys, hf_dir=ppm_dir, ppm=True)
    assert status == 0, "\n".join(lines)
    assert any("fixed ids (no tokenizer files)" in line for line in lines)
    score = next(line for line in lines if line.startswith("value head score:"))
    ours, hf = (float(part.split("=")[1]) for part in score.split()[3:5])
    assert abs(ours - hf) <= 1e-4 and abs(hf) > 1e-3  # a real score, not a zero head on both sides
    assert _max_abs_diff(lines) <= 1e-4


def _misread_on_our_side(monkeypatch, bad_key):
    """Our loader reads `bad_key` off by 0.01 (as a bad conversion would); HF reads the file as it is."""
    real = hf_io.SafetensorsReader.read_block

    def buggy(self, key, layout, shape, index):
        block = real(self, key, layout, shape, index)
        return block + 0.01 if key == bad_key else block

    monkeypatch.setattr(hf_io.SafetensorsReader, "read_block", buggy)


def test_a_loader_bug_on_one_weight_fails(policy_dir, capsys, monkeypatch):
    _misread_on_our_side(monkeypatch, "model.layers.1.mlp.down_proj.weight")
    status, lines = _run(capsys, hf_dir=policy_dir, prompt=PROMPT)
    assert status == 1
    assert _max_abs_diff(lines) > 1e-4
    assert lines[-2].startswith("FAILED")


def test_a_wrong_ppm_head_fails(ppm_dir, capsys, monkeypatch):
    _misread_on_our_side(monkeypatch, "v_head.summary.bias")
    status, lines = _run(capsys, hf_dir=ppm_dir, ppm=True)
    assert status == 1 and abs(_max_abs_diff(lines) - 0.01) < 1e-4


def test_tolerance_flag_is_applied(policy_dir, capsys):
    status, lines = _run(capsys, hf_dir=policy_dir, prompt=PROMPT, tolerance=0.0)
    assert status == 1 and _max_abs_diff(lines) > 0  # fp32 rounding differs between the two frameworks


def test_nan_weight_fails_the_cli(policy_dir, tmp_path):
    # Both sides read the NaN, so their difference is NaN: it must fail, not compare False and pass.
    bad = _corrupted_copy(policy_dir, tmp_path / "nan", lambda t: t["model.norm.weight"].__setitem__(3, np.nan))
    proc = subprocess.run([sys.executable, "-m", "experiments.check_hf", f"--hf_dir={bad}", f"--prompt={PROMPT}"],
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "max_abs_diff=nan"


def test_tied_dir_with_a_different_lm_head_fails(policy_dir, tmp_path, capsys):
    # transformers unties such a checkpoint; our loader refuses it instead of silently differing.
    bad = _corrupted_copy(policy_dir, tmp_path / "head",
                          lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] * 1.5))
    status, lines = _run(capsys, hf_dir=bad, prompt=PROMPT)
    assert status == 1
    assert lines[0].startswith("FAILED") and any("'lm_head.weight' differs" in line for line in lines)


def test_without_torch_runs_our_model_and_notes_it(ppm_dir, capsys, monkeypatch):
    # `import torch` now raises ImportError. (A dir without tokenizer files: transformers, imported
    # here with torch, would still try to use it; without torch installed it does not.)
    monkeypatch.setitem(sys.modules, "torch", None)
    status, lines = _run(capsys, hf_dir=ppm_dir, ppm=True)
    assert status == 0
    assert any(line.startswith("our value head score: ") for line in lines)
    assert not any(line.startswith("max_abs_diff=") for line in lines)  # nothing was compared
    top = lines.index("our top 5 next tokens after the last position:")
    assert len(lines[top + 1:top + 6]) == 5 and all("logit=" in line for line in lines[top + 1:top + 6])
    assert lines[-1].startswith("NOTE: torch is not installed")


def test_hf_dir_is_required(capsys):
    with pytest.raises(Exception, match="--hf_dir is required"):
        _run(capsys, hf_dir=None)


@pytest.mark.parametrize("flag, message", [
    ("--prompt=", "--prompt must not be empty"),
    ("--tolerance=-1", "flag --tolerance=-1"),
])
def test_bad_flags_are_named(policy_dir, flag, message):
    proc = subprocess.run([sys.executable, "-m", "experiments.check_hf", f"--hf_dir={policy_dir}", flag],
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_missing_directory_is_named_as_missing(tmp_path, capsys):
    with pytest.raises(check_hf.InputError, match=f"--hf_dir={tmp_path / 'nope'}: no such directory"):
        _run(capsys, hf_dir=str(tmp_path / "nope"))
    (tmp_path / "file").write_text("")
    with pytest.raises(check_hf.InputError, match="file: not a directory"):
        _run(capsys, hf_dir=str(tmp_path / "file"))


def test_hints_name_the_flags_not_the_loader_s_arguments(policy_dir, ppm_dir, tmp_path, capsys):
    status, lines = _run(capsys, hf_dir=policy_dir, ppm=True)
    assert status == 1 and "hint: no value head stored: a policy checkpoint, not a PPM (check it without --ppm)" in (
        lines)
    status, lines = _run(capsys, hf_dir=ppm_dir)
    assert status == 1 and "hint: the checkpoint has a value head: check it with --ppm" in lines
    assert not any("=True" in line for line in lines)
    bad = _corrupted_copy(policy_dir, tmp_path / "head",
                          lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] * 1.5))
    status, lines = _run(capsys, hf_dir=bad)
    assert status == 1 and any(line.endswith("set tie_word_embeddings to false in config.json") for line in lines)
