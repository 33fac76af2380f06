"""`experiments.train_rm` trains a PPM end to end (held-out pairwise accuracy, HF export with the value
head), and the PQM and ORM into scorers the search loads; the loop writes TensorBoard scalars and a profiler
trace of the asked-for steps. A PPM scores a row at its last real token, however the batch pads it."""
import glob
import json
import os
import random
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_fixtures import make_bpe_tokenizer
from tests.train_fixtures import write_jsonl


@pytest.mark.parametrize("side", ["right", "left"])  # the trainer's batches are right-padded
def test_ppm_score_of_a_padded_row_is_its_unpadded_score(side):
    from flax import nnx

    from rstar_jax.models import PPM
    from tests.train_fixtures import CFG
    ppm = PPM(CFG.replace(num_layers=2), rngs=nnx.Rngs(0))
    # A ~N(0, 1e-6) head scores everything ~0: a larger one makes the comparison meaningful.
    ppm.v_head.weight[...] = np.linspace(-1, 1, ppm.config.hidden_size).astype(np.float32)
    short, long = [5, 9, 12, 7], [3, 8, 6, 11, 4, 10, 2, 13, 14]
    alone = float(ppm(jnp.asarray([short]), jnp.ones((1, len(short)), bool))[0])
    pad = [0] * (len(long) - len(short))
    row, row_mask = (short + pad, [True] * len(short) + [False] * len(pad)) if side == "right" else \
        (pad + short, [False] * len(pad) + [True] * len(short))
    tokens, mask = jnp.asarray([row, long]), jnp.asarray([row_mask, [True] * len(long)])  # [2, 9]
    scores = np.asarray(ppm(tokens, mask))  # [2]
    np.testing.assert_allclose(scores[0], alone, atol=1e-5)
    np.testing.assert_allclose(scores[1], float(ppm(tokens[1:], mask[1:])[0]), atol=1e-5)
    # Not vacuous: the padded row's last position, or the long row's, scores otherwise.
    at_the_end = float(ppm(tokens[:1], jnp.ones((1, len(long)), bool))[0])
    assert min(abs(at_the_end - alone), abs(scores[1] - alone)) > 100 * 1e-5, (alone, at_the_end, scores)


def test_train_rm_ppm_end_to_end(tmp_path):
    rng = random.Random(0)
    pairs = []
    for i in range(48):
        a = rng.randint(1, 50)
        pairs.append({"id": f"p{i}", "prompt": f"Q: {a} plus {a}?\nA:", "pos": f" {2 * a} right",
                      "neg": f" {2 * a + 1} wrong", "pos_count": 1 + i % 2, "neg_count": 2, "margin": 0.5})
    records = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    make_bpe_tokenizer(str(tmp_path / "tok"), [p["prompt"] + p["pos"] + p["neg"] for p in pairs], vocab_size=300)
    out = tmp_path / "ppm"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train_rm", "--task=ppm", "--preset=tiny",
         f"--tokenizer_dir={tmp_path / 'tok'}",
         f"--train_records={records}", f"--out_dir={out}", "--max_len=32", "--batch_size=8", "--max_steps=20",
         "--learning_rate=2e-3", "--holdout_fraction=0.25", "--log_every=10", "--length_buckets=32",
         "--peak_flops=1e11", "--attention_impl=dot_product"], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A quarter held out, whole prompts at a time (some prompts repeat): 12 or a few more.
    counts = re.search(r"(\d+) training examples from \1 records .* (\d+) held out", proc.stdout)
    assert counts and int(counts[1]) + int(counts[2]) == 48 and 12 <= int(counts[2]) <= 15, proc.stdout
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["eval"]["accuracy"] >= 0.9  # the "right" token is a give-away
    assert metrics["train"]["loss"] < 0.3
    assert glob.glob(str(out / "tb" / "events.out.tfevents.*"))
    with open(out / "config.json") as f:
        assert json.load(f)["attention_impl"] == "dot_product"

    from rstar_jax.models.hf_io import load_hf
    ppm = load_hf(str(out / "hf"), ppm=True)
    from rstar_jax.tokenizer import load_tokenizer
    tok = load_tokenizer(str(out / "hf"))
    enc = lambda text: tok.encode(text, add_special_tokens=False)
    p = pairs[0]
    rows = [enc(p["prompt"]) + enc(p["pos"]), enc(p["prompt"]) + enc(p["neg"])]
    width = max(map(len, rows))
    tokens = jnp.asarray([r + [0] * (width - len(r)) for r in rows])
    mask = jnp.asarray([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    r_pos, r_neg = np.asarray(ppm(tokens, mask))
    assert r_pos > r_neg
    with open(out / "hf" / "config.json") as f:  # the reference's head: the search reads tanh(raw / 5)
        assert json.load(f)["rstar_score_scale"] == ppm.score_scale == 5.0


def test_the_papers_ppm_head_is_exported_and_read_by_the_search(tmp_path):
    """--score_head=paper: trained on tanh(raw), and the scorer the search loads reads tanh(raw) too."""
    pairs = [{"id": f"p{i}", "prompt": f"Q: {i}?\nA:", "pos": " right", "neg": " wrong", "pos_count": 1, "margin": 1.0,
              "neg_count": 1} for i in range(16)]
    records = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    make_bpe_tokenizer(str(tmp_path / "tok"), [p["prompt"] + p["pos"] + p["neg"] for p in pairs], vocab_size=200)
    out = tmp_path / "ppm"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train_rm", "--task=ppm", "--preset=tiny", "--score_head=paper",
         f"--tokenizer_dir={tmp_path / 'tok'}", f"--train_records={records}", f"--out_dir={out}", "--max_len=16",
         "--batch_size=8", "--max_steps=4", "--learning_rate=2e-3", "--holdout_fraction=0", "--length_buckets=16",
         "--peak_flops=1e11"], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "hf" / "config.json") as f:
        assert json.load(f)["rstar_score_scale"] == 1.0

    from experiments.search import load_scorer
    from rstar_jax.models.hf_io import load_hf
    from rstar_jax.tokenizer import load_tokenizer
    text = "Q: 3?\nA: right"
    ids = load_tokenizer(str(out / "hf")).encode(text, add_special_tokens=False)
    raw = float(load_hf(str(out / "hf"), ppm=True)(jnp.asarray([ids]), jnp.ones((1, len(ids)), bool))[0])
    np.testing.assert_allclose(load_scorer(str(out / "hf"), max_tokens=64).score([text])[0], np.tanh(raw), rtol=1e-5)


@pytest.mark.parametrize("task", ["pqm", "orm"])
def test_train_rm_pqm_and_orm_score_what_they_were_taught(task, tmp_path):
    """A Q-value regression (PQM) and an outcome model (ORM) learn a give-away word and score with it."""
    rng = random.Random(1)
    records = []
    for i in range(64):
        a, good = rng.randint(1, 50), i % 2 == 0
        label = {"q": 1.0 if good else -1.0} if task == "pqm" else {"correct": good}
        records.append({"id": f"p{i}", "prompt": f"Q: {a} plus {a}?\nA:",
                        "response": f" {2 * a} right" if good else f" {2 * a + 1} wrong", **label})
    path = write_jsonl(tmp_path / f"{task}.jsonl", records)
    make_bpe_tokenizer(str(tmp_path / "tok"), [r["prompt"] + r["response"] for r in records], vocab_size=300)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    command = [sys.executable, "-m", "experiments.train_rm", f"--task={task}", "--preset=tiny",
               f"--tokenizer_dir={tmp_path / 'tok'}", f"--train_records={path}", f"--out_dir={tmp_path / task}",
               "--max_len=32", "--batch_size=8", "--max_steps=30", "--learning_rate=2e-3", "--holdout_fraction=0",
               "--log_every=10", "--length_buckets=32", "--attention_impl=dot_product"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    from experiments.search import load_scorer
    scorer = load_scorer(str(tmp_path / task / "hf"), max_tokens=64)
    good, bad = scorer.score(["Q: 7 plus 7?\nA: 14 right", "Q: 7 plus 7?\nA: 15 wrong"])
    assert -1 <= bad < good <= 1
    if task == "orm":  # what shapes the run must match for its checkpoints to be resumed
        again = subprocess.run(command + ["--head_dropout=0.3"], capture_output=True, text=True, timeout=180, env=env)
        assert again.returncode != 0 and "head_dropout" in again.stderr, again.stderr[-3000:]
        write_jsonl(path, [{**r, "correct": not r["correct"]} for r in records])  # other labels, as many records
        again = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
        assert again.returncode != 0 and "records_digest" in again.stderr, again.stderr[-3000:]


def test_fit_writes_tensorboard_and_a_profile_window(tmp_path):
    from rstar_jax.train.loop import fit
    from rstar_jax.train.metrics import MetricsWriter
    from tests.train_fixtures import make_trainer
    trainer, it = make_trainer(steps=3, buckets=(32,), profile_start=1, profile_steps=1,
                               profile_dir=str(tmp_path / "profile"))
    lines = []
    writer = MetricsWriter(str(tmp_path / "tb"), 3, print_fn=lambda s, flush: lines.append(s))
    result = fit(trainer, it, writer=writer, peak_flops=1e11)
    writer.close()
    assert len(lines) == 3 and lines[-1].startswith("step 3/3 (100%) | loss ")
    assert "tokens_per_s" in lines[-1] and "mfu" in lines[-1] and "eta 00:00" in lines[-1]
    assert 0 < result.last_metrics["mfu"] and result.last_metrics["lr"] > 0
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)


def test_head_dropout_out_of_range_is_refused_naming_the_flag():
    proc = subprocess.run([sys.executable, "-m", "experiments.train_rm", "--task=ppm", "--head_dropout=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--head_dropout must be in [0, 1)" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "experiments.sft", "--head_dropout=0.1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Unknown command line flag 'head_dropout'" in proc.stderr  # SFT has no value head
