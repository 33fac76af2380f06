"""Every shipped flagfile parses and dry-runs: the round's memory plan on the target's fake devices."""
import glob
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "qwen*.flags")))


def _dry_run(*flagfiles, extra=()):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run([sys.executable, "-m", "experiments.round", *(f"--flagfile={f}" for f in flagfiles),
                           "--dry_run", *extra], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def test_every_model_and_hardware_flagfile_fits_with_a_paper_round():
    assert len(TARGETS) == 4
    for i, target in enumerate(TARGETS):  # each target with another round's settings
        rounds = f"experiments/configs/paper/round{1 + i % 4}.flags"
        proc = _dry_run(rounds, target)
        assert proc.returncode == 0, proc.stderr[-3000:]
        devices = int(re.search(r"--dry_run_devices=(\d+)", open(target).read()).group(1))
        assert f"round {1 + i % 4}:" in proc.stdout and f"{devices} devices" in proc.stdout
        for stage in ("search", "evaluation search", "policy SFT", "PPM training"):
            assert f"\n{stage} (" in "\n" + proc.stdout, stage
        assert proc.stdout.count("(fits)") == 4, proc.stdout  # every stage within the device's memory


def test_the_miniature_flagfiles_dry_run_and_a_stage_that_does_not_fit_says_so():
    for k in range(1, 5):
        proc = _dry_run(f"experiments/configs/miniature/round{k}.flags", extra=["--dry_run_devices=1"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"round {k}:" in proc.stdout and "1 devices" in proc.stdout and "policy SFT" in proc.stdout
    proc = _dry_run("experiments/configs/paper/round1.flags", TARGETS[0], extra=["--device_memory_gib=1"])
    assert proc.returncode == 0 and "does NOT fit in 1 GiB" in proc.stdout


def test_a_dry_run_without_the_checkpoint_needs_a_preset():
    proc = _dry_run("experiments/configs/paper/round1.flags", extra=["--base_model=/nonexistent/ckpt"])
    assert proc.returncode != 0 and "--model_preset" in proc.stderr
