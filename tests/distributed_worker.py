"""One process of the 2-process CPU test in test_distributed.py (run as a script, not collected).

usage: python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON

The parent sets XLA_FLAGS=--xla_force_host_platform_device_count=2 and JAX_PLATFORMS=cpu. Each
process joins `jax.distributed`, builds one mesh over every process's devices, runs sharded
computations over it and writes what it saw to OUT_JSON.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from rstar_jax import parallel
from rstar_jax.models.config import preset
from rstar_jax.models.qwen2 import Qwen2, positions_from_mask

CFG = preset("tiny").replace(num_layers=2)


def global_array(host_value: np.ndarray, mesh, spec) -> jax.Array:
    """A global array of which each process materialises only its own shards."""
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(host_value.shape, sharding, lambda index: host_value[index])


def rows_here(array: jax.Array) -> int:
    """How many distinct rows (dimension 0) of a global array this process holds."""
    return len({i for shard in array.addressable_shards for i in range(array.shape[0])[shard.index[0]]})


def matmul_sum(mesh) -> dict:
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 10  # [B, D]
    w = np.cos(np.arange(6 * 4, dtype=np.float32)).reshape(6, 4)  # [D, F]
    xg = global_array(x, mesh, P(("data", "fsdp"), "tensor"))
    wg = global_array(w, mesh, P("tensor", None))
    replicated = NamedSharding(mesh, P())
    y, total = jax.jit(lambda x, w: (x @ w, jnp.sum(x @ w)), out_shardings=(replicated, replicated))(xg, wg)
    return {"x_rows_here": rows_here(xg),
            "matmul_err": float(np.max(np.abs(np.asarray(y.addressable_data(0)) - x @ w))),
            "sum": float(total.addressable_data(0)), "sum_expected": float(np.sum(x @ w))}


def host_params(abstract: nnx.State, seed: int = 0) -> nnx.State:
    """Deterministic numpy parameters of the abstract state's shapes (the same in every process)."""
    rng = np.random.default_rng(seed)

    def draw(leaf):  # norm weights near 1, matrices and biases small, so logits are O(1)
        noise = rng.normal(size=leaf.shape).astype(leaf.dtype)
        return 1 + 0.1 * noise if leaf.ndim == 1 else 0.05 * noise

    return jax.tree.map(draw, abstract)


def sharded_forward(mesh) -> dict:
    """Tiny Qwen2 with parameters sharded across both processes vs. this process alone."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CFG.vocab_size, (4, 8)).astype(np.int32)  # [B, T]
    mask = np.ones((4, 8), bool)
    mask[:2, :3] = False  # [B, T]: left padding

    def forward(graphdef, state, tokens, mask):
        model = nnx.merge(graphdef, state)
        hidden, _ = model(tokens, positions_from_mask(mask), mask)
        return model.logits(hidden)  # [B, T, V]

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen2(CFG, rngs=nnx.Rngs(0))))
    params = host_params(abstract)
    want = np.asarray(jax.jit(forward, static_argnums=0)(graphdef, params, tokens, mask))  # this process alone

    # Each process materialises only its own shards, as when restoring a checkpoint on a pod.
    state = jax.tree.map(lambda s, p: p.replace(global_array(p[...], s.mesh, s.spec)),
                         parallel.state_shardings(abstract, mesh), params,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    q_proj = state["layers"][0]["self_attn"]["q_proj"][...]  # [D, H, Dh], split over fsdp x tensor
    batch = P(("data", "fsdp"), None)
    with jax.set_mesh(mesh):
        logits = jax.jit(forward, static_argnums=0, out_shardings=NamedSharding(mesh, P()))(
            graphdef, state, global_array(tokens, mesh, batch), global_array(mask, mesh, batch))
    got = np.asarray(logits.addressable_data(0))
    return {"q_proj_rows_here": rows_here(q_proj), "logits_max_abs": float(np.max(np.abs(want))),
            "forward_err": float(np.max(np.abs(got - want))),
            "logits_checksum": float(np.sum(got, dtype=np.float64))}


def host_shard_coverage(num_items: int = 11) -> list[int]:
    """How many processes own each item (should be exactly one)."""
    owned = np.zeros(num_items, np.int32)
    owned[parallel.host_shard(list(range(num_items)))] = 1
    return multihost_utils.process_allgather(owned).sum(axis=0).tolist()  # [num_items]


def main(process_id: int, num_processes: int, port: int, out_path: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU collectives (default)
    started = parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id,
                                              initialization_timeout=30)
    # fsdp spans the processes (parameters and batch are split between them), tensor their local devices.
    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=num_processes, tensor=-1))
    report = {"started": started, "process_index": jax.process_index(), "process_count": jax.process_count(),
              "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
              "mesh_processes": sorted({d.process_index for d in mesh.devices.flat})}
    report.update(matmul_sum(mesh))
    report.update(sharded_forward(mesh))
    report["host_shard_owners"] = host_shard_coverage()
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
