"""The dry run's memory plan: exact parameter, optimizer and cache bytes per device on a fake mesh."""
import os
import subprocess
import sys

from experiments.dry_run import GIB, format_plan, mesh_over, search_memory, training_memory
from rstar_jax.models import preset

SEARCH = dict(trees=16, num_candidates=8, max_context_tokens=4096, max_step_tokens=2048)
TRAIN = dict(batch=128, seq=4096, microbatches=4)


def _by_name(items):
    return {i.what.split(" (")[0].split(":")[0]: i for i in items}


def test_one_device_holds_every_parameter():
    cfg = preset("tiny")
    mesh = mesh_over((1, 1, 1), 1)
    search = _by_name(search_memory(cfg, mesh, **SEARCH))
    train = _by_name(training_memory(cfg, mesh, **TRAIN))
    assert search["policy parameters"].bytes_per_device == cfg.num_params() * 4  # tiny is fp32
    assert train["master parameters"].bytes_per_device == cfg.num_params() * 4
    # AdamW's mu and nu, plus two int32 step counts (Adam's and the schedule's).
    assert train["optimizer state"].bytes_per_device == 2 * cfg.num_params() * 4 + 8


def test_7b_on_eight_devices_shards_weights_over_fsdp_and_tensor():
    cfg = preset("qwen2.5-math-7b")
    mesh = mesh_over((2, 2, 2), 8)
    search = _by_name(search_memory(cfg, mesh, **SEARCH))
    full = cfg.num_params() * 2  # bf16
    # Weights split 4 ways (fsdp x tensor); norms and biases (a tiny share) are replicated.
    assert full / 4 <= search["policy parameters"].bytes_per_device <= full / 4 * 1.01
    # KV cache: 16 trees over data x fsdp = 4 per device, kv heads over tensor.
    slot = 2 * cfg.num_layers * (cfg.num_kv_heads // 2) * cfg.head_dim * 2
    assert search["KV cache"].bytes_per_device == slot * 4 * (4096 + 8 * 2048)
    assert search["logits of one decode step"].bytes_per_device == 4 * 8 * cfg.vocab_size * 4
    assert "PPM parameters" not in search  # terminal-guided search has no PPM
    scored = _by_name(search_memory(cfg, mesh, **SEARCH, with_ppm=True))
    policy, ppm = scored["policy parameters"].bytes_per_device, scored["PPM parameters"].bytes_per_device
    head = cfg.vocab_size * cfg.hidden_size * 2 // 4  # 7B's untied LM head, not loaded for scoring
    assert 0 < ppm - (policy - head) <= (cfg.hidden_size + 1) * 2  # the policy's backbone + a value head
    items = training_memory(cfg, mesh, **TRAIN)
    train = _by_name(items)
    assert train["gradients"].bytes_per_device == train["master parameters"].bytes_per_device
    assert not train["activations"].exact
    remat = _by_name(training_memory(cfg, mesh, **TRAIN, remat=True))
    assert remat["activations"].bytes_per_device < train["activations"].bytes_per_device / 4
    chunked = _by_name(training_memory(cfg, mesh, **TRAIN, loss_chunk=512))  # 512 of 4096 positions at a time
    logits = "logits and their gradient"
    assert chunked[logits].bytes_per_device == train[logits].bytes_per_device / 8
    ppm = _by_name(training_memory(cfg, mesh, **TRAIN, reward_model=True))
    assert "logits and their gradient" not in ppm  # a value head, no vocabulary logits
    # 7B's untied LM head is kept in bf16 but not trained: no fp32 copy, gradient or AdamW moments of it.
    head = cfg.vocab_size * cfg.hidden_size
    assert ppm["the policy's untied LM head, kept untrained"].bytes_per_device == head * 2 // 4
    trained = train["master parameters"].bytes_per_device - ppm["master parameters"].bytes_per_device
    assert head * 4 // 4 - (cfg.hidden_size + 1) * 4 <= trained <= head * 4 // 4
    assert ppm["gradients"].bytes_per_device == ppm["master parameters"].bytes_per_device
    assert ppm["optimizer state"].what.startswith("optimizer state (AdamW, 2 fp32 values per parameter)")
    assert ppm["activations"].bytes_per_device == 2 * train["activations"].bytes_per_device  # pos and neg rows
    text = format_plan("policy SFT", items, mesh, device_memory_gib=80)
    assert text.startswith("policy SFT: per device on a mesh of 8 devices (data=2, fsdp=2, tensor=2)")
    total = sum(i.bytes_per_device for i in items) / GIB
    assert ("does NOT fit" in text) == (total > 80)


def test_running_the_module_points_to_the_round_s_dry_run():
    proc = subprocess.run([sys.executable, "-m", "experiments.dry_run"], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2 and "python -m experiments.round --dry_run" in proc.stderr
