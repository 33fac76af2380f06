"""A round's per-device memory on its target mesh, computed from abstract arrays only (nothing allocated).

`experiments.round --dry_run` builds the configs and a mesh of fake CPU devices of the target count, the
abstract sharded model (`nnx.eval_shape`) and optimizer state (`jax.eval_shape`), and prints per device:

- search: the policy's parameters in its dtype (and the PPM's, without an untied LM head, when the search
  scores with one), the KV cache of one lock-step expansion (the shared prompt prefix of every tree in the
  batch at the context limit, plus each candidate's own step slots), and one decode step's fp32 logits;
- training: fp32 master parameters, AdamW moments, fp32 gradients (a reward model's inherited untied LM head
  is none of these: it is kept in the model's dtype, untrained), and activations of one microbatch:
  an estimate after Korthikanti et al. 2022 (per layer and token 17 hidden-size values plus 2.5 attention
  scores per head and key, in the compute dtype; per-layer inputs only with remat), plus fp32 logits
  (one chunk's with a chunked loss).

Parameters, optimizer state and the cache are exact for the shardings the trainer and sampler use
(`rstar_jax.parallel` rules); activations are an estimate, good to a small factor.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryItem:
    stage: str  # "search" or "training"
    what: str
    bytes_per_device: int
    exact: bool = True


def _sharded_bytes(abstract_state, mesh, itemsize: int) -> int:
    """Bytes of the largest shard per device of every Variable, stored with `itemsize` bytes per value."""
    import jax
    from flax import nnx

    from rstar_jax import parallel
    shardings = parallel.state_shardings(abstract_state, mesh)
    is_var = lambda x: isinstance(x, nnx.Variable)
    variables = jax.tree.leaves(abstract_state, is_leaf=is_var)
    return sum(math.prod(s.shard_shape(v.shape)) * itemsize
               for v, s in zip(variables, jax.tree.leaves(shardings), strict=True))


def _split(n: int, ways: int) -> int:
    """Per-device share of n rows split `ways` ways (the rules drop axes that do not divide; ceil is close)."""
    return -(-n // ways)


def search_memory(model_config, mesh, *, trees: int, num_candidates: int, max_context_tokens: int,
                  max_step_tokens: int, with_ppm: bool = False) -> list[MemoryItem]:
    """The policy's parameters (and the PPM's, when the search scores with one), the KV cache of one lock-step
    expansion of `trees` trees, and the fp32 logits of one decode step."""
    import jax

    cfg = model_config
    with jax.set_mesh(mesh):
        policy = _sharded_bytes(_abstract_params(cfg), mesh, cfg.jnp_dtype.itemsize)
        ppm = _sharded_bytes(_ppm_params(cfg)[1], mesh, cfg.jnp_dtype.itemsize) if with_ppm else 0
    tp = mesh.shape["tensor"]
    kv_heads = cfg.num_kv_heads // tp if cfg.num_kv_heads % tp == 0 else cfg.num_kv_heads
    slot = 2 * cfg.num_layers * kv_heads * cfg.head_dim * cfg.jnp_dtype.itemsize  # K and V of one token
    per_device = _split(trees, mesh.shape["data"] * mesh.shape["fsdp"])
    cache = slot * per_device * (max_context_tokens + num_candidates * max_step_tokens)
    items = [MemoryItem("search", f"policy parameters ({cfg.dtype})", policy)]
    if with_ppm:
        items.append(MemoryItem("search", f"PPM parameters ({cfg.dtype}; the policy's backbone and a value head)",
                                ppm))
    return items + [
        MemoryItem("search", f"KV cache: {per_device} trees x ({max_context_tokens} context + {num_candidates} x "
                             f"{max_step_tokens} step) slots", cache),
        MemoryItem("search", f"logits of one decode step: {per_device * num_candidates} rows x vocab {cfg.vocab_size} "
                             "(fp32)", per_device * num_candidates * cfg.vocab_size * 4)]


def training_memory(model_config, mesh, *, batch: int, seq: int, microbatches: int = 1,
                    compute_dtype: str = "bfloat16", remat: bool = False, loss_chunk: int = 0, optim=None,
                    reward_model: bool = False, stage: str = "training") -> list[MemoryItem]:
    """fp32 master parameters, AdamW state, fp32 gradients, and one microbatch's activations and (policy)
    logits. A reward model's example is a pair: two sequences per row, a value head instead of logits."""
    import jax
    import jax.numpy as jnp

    from rstar_jax.train.optim import OptimConfig, make_optimizer
    cfg = model_config
    frozen, params = _ppm_params(cfg) if reward_model else ({}, _abstract_params(cfg))
    with jax.set_mesh(mesh):
        master = _sharded_bytes(params, mesh, 4)
        kept = _sharded_bytes(frozen, mesh, cfg.jnp_dtype.itemsize)
    # The abstract optimizer state: copies of the parameters (AdamW's mu and nu, sharded like them) plus
    # replicated scalars (step counts).
    tx, _ = make_optimizer(optim or OptimConfig(), 1)
    fp32 = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.float32), params)
    opt_leaves = jax.tree.leaves(jax.eval_shape(tx.init, fp32))
    copies = round(sum(math.prod(x.shape) for x in opt_leaves if x.shape) / sum(map(math.prod, (
        x.shape for x in jax.tree.leaves(fp32)))))  # rounded: a value head's scalar bias has scalar moments
    scalars = sum(x.dtype.itemsize for x in opt_leaves if not x.shape)

    tp = mesh.shape["tensor"]
    act_bytes = jnp.dtype(compute_dtype).itemsize
    rows = _split(max(batch // microbatches, 1), mesh.shape["data"] * mesh.shape["fsdp"]) * (2 if reward_model else 1)
    tokens = rows * seq
    per_layer = tokens * (17 * cfg.hidden_size + 2.5 * cfg.num_heads * seq) / tp * act_bytes
    layer_inputs = tokens * cfg.hidden_size * act_bytes
    activations = cfg.num_layers * layer_inputs + per_layer if remat else cfg.num_layers * per_layer
    vocab_ways = tp if cfg.vocab_size % tp == 0 else 1
    chunked = 0 < loss_chunk < seq
    logit_rows = rows * (loss_chunk if chunked else seq)
    logits = 2 * logit_rows * cfg.vocab_size * 4 / vocab_ways  # fp32 logits and their gradient
    items = [
        MemoryItem(stage, "master parameters (fp32)", master),
        MemoryItem(stage, f"optimizer state (AdamW, {copies} fp32 values per parameter)", copies * master + scalars),
        MemoryItem(stage, "gradients (fp32)", master),
        MemoryItem(stage, f"activations: {rows} rows x {seq} tokens, {compute_dtype}{', remat' if remat else ''} "
                          "(estimate)", round(activations), exact=False),
    ]
    if not reward_model:
        chunk = f", one chunk of {loss_chunk} positions" if chunked else ""
        items.append(MemoryItem(stage, f"logits and their gradient (fp32, vocab {cfg.vocab_size}{chunk})",
                                round(logits)))
    if kept:
        items.append(MemoryItem(stage, f"the policy's untied LM head, kept untrained ({cfg.dtype})", kept))
    return items


def _abstract_params(cfg, ppm: bool = False):
    from flax import nnx

    from rstar_jax.models import PPM, Qwen2
    return nnx.state(nnx.eval_shape(lambda: (PPM if ppm else Qwen2)(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _ppm_params(cfg):
    """A PPM's (untied LM head, other parameters): search loads only the others (`load_hf(lm_head=False)`),
    training trains only them."""
    from flax import nnx

    from rstar_jax.models.ppm import UNUSED_BY_SCORE
    return nnx.split_state(_abstract_params(cfg, ppm=True), UNUSED_BY_SCORE, ...)


def format_plan(stage: str, items: list[MemoryItem], mesh, device_memory_gib: float | None = None) -> str:
    """One stage's items per device, with the total and whether it fits in `device_memory_gib`."""
    shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    lines = [f"{stage}: per device on a mesh of {mesh.devices.size} devices ({shape})"]
    lines += [f"  {i.bytes_per_device / GIB:9.2f} GiB  {i.what}" for i in items]
    total = sum(i.bytes_per_device for i in items) / GIB
    verdict = ""
    if device_memory_gib:
        verdict = " (fits)" if total <= device_memory_gib else f" (does NOT fit in {device_memory_gib:g} GiB)"
    lines.append(f"  {total:9.2f} GiB  total{verdict}")
    return "\n".join(lines)


def use_fake_devices(count: int) -> None:
    """Makes JAX see `count` CPU devices; must run before anything asks JAX for its devices."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                       if not f.startswith("--xla_force_host_platform_device_count")) + \
        f" --xla_force_host_platform_device_count={count}"
    import jax
    if jax.device_count() < count:
        raise RuntimeError(f"--dry_run needs {count} fake devices but JAX already started with {jax.device_count()}")


def mesh_over(shape, count: int):
    """A mesh of `shape` (data, fsdp, tensor; -1 fills) over the first `count` devices."""
    import jax

    from rstar_jax import parallel
    return parallel.make_mesh(parallel.MeshConfig(*shape), devices=jax.devices()[:count])


if __name__ == "__main__":  # a library of experiments.round: run alone, it would silently do nothing
    sys.stderr.write("experiments.dry_run: error: not a program; use python -m experiments.round --dry_run ... "
                     "(the round's flags choose the models, mesh and sizes)\n")
    sys.exit(2)
