"""Test setup: 8 fake CPU devices for sharding tests, absl flags kept away from pytest's argv, and the number of
parallel test processes."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS(["pytest"])


import pytest  # noqa: E402


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
