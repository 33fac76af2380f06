"""`experiments.sft` killed with SIGKILL after a checkpoint and re-run with the same command ends with
exactly the parameters of an uninterrupted run; bad inputs stop it with an error naming them."""
import gc
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import safetensors.numpy

from tests.hf_fixtures import make_bpe_tokenizer
from tests.train_fixtures import write_jsonl


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_inputs")
    rng = random.Random(0)
    records = []
    for i in range(24):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        records.append({"id": f"s{i}", "prompt": f"Q: {a} plus {b}?\nA:", "response": f" {a} + {b} = {a + b}"})
    make_bpe_tokenizer(str(root / "tok"), [r["prompt"] + r["response"] for r in records], vocab_size=300)
    return {"tok": str(root / "tok"), "sft": write_jsonl(root / "sft.jsonl", records), "root": root}


def _command(inputs, out, *extra):
    return [sys.executable, "-m", "experiments.sft", "--preset=tiny", f"--tokenizer_dir={inputs['tok']}",
            f"--train_records={inputs['sft']}", f"--out_dir={out}", "--max_len=64", "--batch_size=8",
            "--max_steps=40", "--learning_rate=1e-3", "--checkpoint_every=5", "--log_every=10", "--mesh=1,2,1",
            "--length_buckets=64", "--peak_flops=1e11", *extra]


def _run(cmd, **kw):
    # Two fake devices (an fsdp mesh) instead of the test session's eight: each process compiles less.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.Popen(cmd, env=env, **kw)


def _weights(out):
    return safetensors.numpy.load_file(os.path.join(out, "hf", "model.safetensors"))


@pytest.mark.slow  # three training processes: about 40 s on 2 cores (the in-process variant below is fast)
def test_sigkill_then_rerun_equals_uninterrupted_run(inputs, tmp_path):
    full_out, killed_out = str(tmp_path / "full"), str(tmp_path / "killed")
    full = _run(_command(inputs, full_out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = _run(_command(inputs, killed_out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(killed_out, "checkpoints", "5", "commit_success.txt")
    deadline = time.time() + 120
    while not os.path.exists(marker) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed_out, "hf")), "the run finished before it was killed"
    rerun = _run(_command(inputs, killed_out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rerun_out, rerun_err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, rerun_err[-3000:]
    assert "resumed from step" in rerun_out
    out, err = full.communicate(timeout=180)
    assert full.returncode == 0, err[-3000:]
    a, b = _weights(full_out), _weights(killed_out)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with open(os.path.join(killed_out, "metrics.json")) as f:
        assert json.load(f)["resumed_from"] >= 5


class _Interrupt(Exception):
    pass


class _DiesAfter:
    """A batch iterator that dies (like a killed process) when asked for batch `n + 1`."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name in ("inner", "n"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __next__(self):
        if self.n == 0:
            raise _Interrupt
        self.n -= 1
        return next(self.inner)


# orbax leaves an asyncio callback behind after an aborted restore / save sequence (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_interrupted_fit_resumes_to_the_uninterrupted_parameters(tmp_path):
    from rstar_jax.train.checkpoint import Checkpointer
    from rstar_jax.train.loop import fit
    from tests.train_fixtures import make_trainer
    run = {"task": "sft", "steps": 9}

    def params(result):
        return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(result.state.params))]

    # One trainer (one compilation) for the three runs: it keeps no state between fits.
    trainer, it = make_trainer(steps=9, buckets=(32,))
    fresh_iterator = lambda: type(it)(it.examples, it.task, it.cfg)
    baseline = params(fit(trainer, it))
    ckpt = Checkpointer(str(tmp_path), run, every=4, async_save=False)
    with pytest.raises(_Interrupt):
        fit(trainer, _DiesAfter(fresh_iterator(), 6), checkpointer=ckpt)  # dies in step 7; newest checkpoint: 4
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path), run, every=4, async_save=False)
    result = fit(trainer, fresh_iterator(), checkpointer=ckpt)
    ckpt.close()
    assert result.resumed_from == 4
    gc.collect()  # collect orbax's leftovers here, under this test's warning filter
    for got, want in zip(params(result), baseline, strict=True):
        np.testing.assert_array_equal(got, want)


def test_bad_inputs_stop_with_a_named_error(inputs, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"id": "x", "prompt": "Q:", "response": " 1 + 2 = 3" * 40}])
    proc = subprocess.run(_command(inputs, str(tmp_path / "a"), f"--train_records={long}", "--mesh=-1,1,1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "long.jsonl:1: record 'x' is" in proc.stderr and "over max_len=64" in proc.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = subprocess.run(_command(inputs, str(tmp_path / "b"), f"--train_records={empty}", "--mesh=-1,1,1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "empty dataset: no sft records in" in proc.stderr
