"""The dry run's memory plan: exact parameter, optimizer and cache bytes per device on a fake mesh."""
import jax
import pytest

from experiments.dry_run import GIB, format_plan, memory_plan
from rstar_jax import parallel
from rstar_jax.models import preset

PLAN = dict(search_trees=16, num_candidates=8, max_context_tokens=4096, max_step_tokens=2048, train_batch=128,
            train_seq=4096, microbatches=4)


def _plan(model, mesh_shape, **kw):
    mesh = parallel.make_mesh(parallel.MeshConfig(*mesh_shape), devices=jax.devices()[:mesh_shape[0] * mesh_shape[1]
                                                                                    * mesh_shape[2]])
    return {i.what.split(" (")[0].split(":")[0]: i for i in memory_plan(model, mesh, **{**PLAN, **kw})}, mesh


def test_one_device_holds_every_parameter():
    cfg = preset("tiny")
    items, _ = _plan(cfg, (1, 1, 1))
    assert items["policy parameters"].bytes_per_device == cfg.num_params() * 4  # tiny is fp32
    assert items["master parameters"].bytes_per_device == cfg.num_params() * 4
    # AdamW's mu and nu, plus two int32 step counts (Adam's and the schedule's).
    assert items["optimizer state"].bytes_per_device == 2 * cfg.num_params() * 4 + 8


def test_7b_on_eight_devices_shards_weights_over_fsdp_and_tensor():
    cfg = preset("qwen2.5-math-7b")
    items, mesh = _plan(cfg, (2, 2, 2))
    full = cfg.num_params() * 2  # bf16
    # Weights split 4 ways (fsdp x tensor); norms and biases (a tiny share) are replicated.
    assert full / 4 <= items["policy parameters"].bytes_per_device <= full / 4 * 1.01
    assert items["gradients"].bytes_per_device == items["master parameters"].bytes_per_device
    # KV cache: 16 trees over data x fsdp = 4 per device, kv heads over tensor.
    slot = 2 * cfg.num_layers * (cfg.num_kv_heads // 2) * cfg.head_dim * 2
    assert items["KV cache"].bytes_per_device == slot * 4 * (4096 + 8 * 2048)
    assert not items["activations"].exact
    remat, _ = _plan(cfg, (2, 2, 2), remat=True)
    assert remat["activations"].bytes_per_device < items["activations"].bytes_per_device / 4
    text = format_plan(list(items.values()), mesh, device_memory_gib=80)
    assert "mesh of 8 devices (data=2, fsdp=2, tensor=2)" in text and "total" in text
    total_training = sum(i.bytes_per_device for i in items.values() if i.stage == "training") / GIB
    assert ("does NOT fit" in text) == (total_training > 80)
