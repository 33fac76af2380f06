"""Test setup: 8 fake CPU devices for sharding tests, absl flags kept away from pytest's argv, the number of
parallel test processes, and one XLA compilation cache for the session."""
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests build the same tiny models in many processes (test workers, the programs they start): each
# program is compiled once per session and read from this cache after. Set here, in the main process, so
# the workers and their subprocesses inherit it; removed when the session ends.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rstar-jax-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS(["pytest"])


import pytest  # noqa: E402


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the main process, which made it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): one test process per usable core, at most 4 (each holds a few GiB)."""
    return min(len(os.sched_getaffinity(0)), 4)


@pytest.fixture(scope="session")
def miniature(tmp_path_factory):
    """The miniature's tokenizer and tiny Qwen2, briefly taught the step format (shared: it takes ~30 s),
    also saved as HF directories: `policy`, and `ppm` (a PPM on the same backbone)."""
    from flax import nnx

    from experiments.expand import miniature_policy
    from rstar_jax.models.hf_io import save_hf
    from rstar_jax.models.ppm import PPM
    root = tmp_path_factory.mktemp("miniature")
    tokenizer, model = miniature_policy(str(root), seed=0, warmup_steps=150)
    save_hf(model, str(root / "policy"), tokenizer=tokenizer)
    save_hf(PPM(model.config, rngs=nnx.Rngs(1), backbone=model), str(root / "ppm"), tokenizer=tokenizer)
    return {"tokenizer": tokenizer, "model": model, "policy": str(root / "policy"), "ppm": str(root / "ppm")}
