"""A round's per-device memory on its target mesh, computed from abstract arrays only (nothing allocated).

`experiments.round --dry_run` builds the configs and a mesh of fake CPU devices of the target count, the
abstract sharded model (`nnx.eval_shape`) and optimizer state (`jax.eval_shape`), and prints per device:

- search: the policy's parameters in its dtype, and the KV cache of one lock-step expansion (the shared
  prompt prefix of every tree in the batch at the context limit, plus each candidate's own step slots);
- training: fp32 master parameters, AdamW moments, fp32 gradients, and activations of one microbatch:
  an estimate after Korthikanti et al. 2022 (per layer and token 17 hidden-size values plus 2.5 attention
  scores per head and key, in the compute dtype; per-layer inputs only with remat), plus fp32 logits.

Parameters, optimizer state and the cache are exact for the shardings the trainer and sampler use
(`rstar_jax.parallel` rules); activations are an estimate, good to a small factor.
"""
from __future__ import annotations

import dataclasses
import math

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


def memory_plan(model_config, mesh, *, search_trees: int, num_candidates: int, max_context_tokens: int,
                max_step_tokens: int, train_batch: int, train_seq: int, microbatches: int = 1,
                compute_dtype: str = "bfloat16", remat: bool = False, optim=None) -> list[MemoryItem]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rstar_jax.models import Qwen2
    from rstar_jax.train.optim import OptimConfig, make_optimizer
    cfg = model_config
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    with jax.set_mesh(mesh):
        policy = _sharded_bytes(params, mesh, cfg.jnp_dtype.itemsize)
        master = _sharded_bytes(params, mesh, 4)
    # The abstract optimizer state: copies of the parameters (AdamW's mu and nu, sharded like them) plus
    # replicated scalars (step counts).
    tx, _ = make_optimizer(optim or OptimConfig(), 1)
    fp32 = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.float32), params)
    opt_leaves = jax.tree.leaves(jax.eval_shape(tx.init, fp32))
    copies = sum(math.prod(x.shape) for x in opt_leaves if x.shape) // sum(map(math.prod, (
        x.shape for x in jax.tree.leaves(fp32))))
    scalars = sum(x.dtype.itemsize for x in opt_leaves if not x.shape)

    rows_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    tp = mesh.shape["tensor"]
    kv_heads = cfg.num_kv_heads // tp if cfg.num_kv_heads % tp == 0 else cfg.num_kv_heads
    slot = 2 * cfg.num_layers * kv_heads * cfg.head_dim * cfg.jnp_dtype.itemsize  # K and V of one token
    trees = _split(search_trees, rows_ways)
    cache = slot * trees * (max_context_tokens + num_candidates * max_step_tokens)

    act_bytes = jnp.dtype(compute_dtype).itemsize
    rows = _split(max(train_batch // microbatches, 1), rows_ways)
    tokens = rows * train_seq
    per_layer = tokens * (17 * cfg.hidden_size + 2.5 * cfg.num_heads * train_seq) / tp * act_bytes
    layer_inputs = tokens * cfg.hidden_size * act_bytes
    activations = cfg.num_layers * layer_inputs + per_layer if remat else cfg.num_layers * per_layer
    vocab_ways = tp if cfg.vocab_size % tp == 0 else 1
    logits = 2 * tokens * cfg.vocab_size * 4 / vocab_ways  # fp32 logits and their gradient
    return [
        MemoryItem("search", f"policy parameters ({cfg.dtype})", policy),
        MemoryItem("search", f"KV cache: {trees} trees x ({max_context_tokens} context + {num_candidates} x "
                             f"{max_step_tokens} step) slots", cache),
        MemoryItem("training", "master parameters (fp32)", master),
        MemoryItem("training", f"optimizer state (AdamW, {copies} fp32 values per parameter)",
                   copies * master + scalars),
        MemoryItem("training", "gradients (fp32)", master),
        MemoryItem("training", f"activations: {rows} rows x {train_seq} tokens, {compute_dtype}"
                               f"{', remat' if remat else ''} (estimate)", round(activations), exact=False),
        MemoryItem("training", f"logits and their gradient (fp32, vocab {cfg.vocab_size})", round(logits)),
    ]


def format_plan(items: list[MemoryItem], mesh, device_memory_gib: float | None = None) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    lines = [f"per-device memory on a mesh of {mesh.devices.size} devices ({shape}):"]
    for stage in ("search", "training"):
        part = [i for i in items if i.stage == stage]
        lines.append(f"  {stage}:")
        lines += [f"    {i.bytes_per_device / GIB:9.2f} GiB  {i.what}" for i in part]
        total = sum(i.bytes_per_device for i in part) / GIB
        verdict = ""
        if device_memory_gib:
            verdict = " (fits)" if total <= device_memory_gib else f" (does NOT fit in {device_memory_gib:g} GiB)"
        lines.append(f"    {total:9.2f} GiB  total{verdict}")
    return "\n".join(lines)
