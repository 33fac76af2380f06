"""Device mesh, logical-axis sharding rules, and multi-host initialisation.

Every parameter carries `logical_axes` metadata (e.g. `("embed", "mlp")`) and activations are
constrained by logical names too; one rule table maps logical names to the mesh axes
`data`, `fsdp`, `tensor`. Nothing here knows about a particular model.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated). Batch-like axes split over
# data x fsdp; weights are FSDP-sharded on their "embed" dimension and tensor-parallel on heads / mlp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("cache_batch", ("data", "fsdp")),
    ("seq", None),
    ("cache_seq", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 on at most one axis means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """Resolves the -1 axis: MeshConfig(-1, 2, 2).shape(8) == (2, 2, 2)."""
        sizes = dict(zip(MESH_AXES, (self.data, self.fsdp, self.tensor)))
        bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
        if bad:
            raise ValueError(f"mesh {self}: axis sizes must be positive or -1 (fill), got {bad}")
        fill = [k for k, v in sizes.items() if v == -1]
        if len(fill) > 1:
            raise ValueError(f"mesh {self}: at most one axis may be -1 (fill), got {fill}")
        known = int(np.prod([v for v in sizes.values() if v != -1]))
        if fill:
            if num_devices % known:
                raise ValueError(f"mesh {self}: the fixed axes use {known} devices, which does not divide the "
                                 f"{num_devices} available devices, so {fill[0]!r}=-1 cannot fill the rest")
            sizes[fill[0]] = num_devices // known
        elif known != num_devices:
            raise ValueError(f"mesh {self} uses {known} devices but {num_devices} are available "
                             "(set one axis to -1 to fill)")
        return tuple(sizes[k] for k in MESH_AXES)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    # Auto axes: shardings propagate through the model from parameters and constraints (GSPMD).
    return jax.make_mesh(config.shape(len(devices)), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def check_tensor_parallel(mesh: jax.sharding.Mesh, num_kv_heads: int) -> None:
    """Tensor parallelism splits KV heads, so it cannot exceed (and must divide) their count."""
    tp = mesh.shape["tensor"]
    if num_kv_heads % tp:
        raise ValueError(f"tensor parallel size {tp} must divide num_kv_heads={num_kv_heads} "
                         f"(at most {num_kv_heads}-way tensor parallelism for this model)")


def logical_to_spec(logical_axes: Sequence[str | None], rules=DEFAULT_RULES) -> PartitionSpec:
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis may shard only one dimension
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh, usable: set[str] | None = None) -> PartitionSpec:
    """Makes `spec` valid for an array of `shape` on `mesh`.

    Per dimension, mesh axes that are absent from the mesh (or not in `usable`) are dropped, and then
    trailing axes are dropped until the remaining ones divide the dimension: a batch of 2 over
    ("data", "fsdp") = (2, 4) keeps "data"; a vocab of 151936 over 3 tensor devices stays replicated.
    """
    if len(spec) > len(shape):
        raise ValueError(f"partition spec {spec} has more entries than the array has dimensions {tuple(shape)}")
    usable = set(mesh.axis_names) if usable is None else usable & set(mesh.axis_names)
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = [a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if a in usable]
        while names and dim % int(np.prod([mesh.shape[a] for a in names])):
            names.pop()
        out.append(names[0] if len(names) == 1 else (tuple(names) or None))
    return PartitionSpec(*out)


def sharding_for(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: jax.sharding.Mesh,
                 rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, _fit_spec(logical_to_spec(logical_axes, rules), shape, mesh))


def _logical_axes_of(var: nnx.Variable) -> tuple[str | None, ...]:
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
        return (None,) * len(var.shape)
    if len(axes) != len(var.shape):
        raise ValueError(f"logical_axes {axes} do not match shape {var.shape}")
    return tuple(axes)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """A pytree of NamedShardings matching `state` (abstract or concrete), from `logical_axes` metadata."""
    return jax.tree.map(lambda v: sharding_for(v.shape, _logical_axes_of(v), mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
    """Sharding constraint by logical names under the mesh set with `jax.set_mesh`; a no-op without one.

    Only `Auto` mesh axes are constrained: `Manual` axes (inside `jax.shard_map`) are already split by
    hand and `Explicit` axes carry their sharding in the array type. Outside `jit` the array is placed
    on the concrete mesh instead.
    """
    if len(logical_axes) != x.ndim:
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match an array of shape {x.shape}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    auto = {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Auto}
    spec = _fit_spec(logical_to_spec(logical_axes, rules), x.shape, mesh, usable=auto)
    if not isinstance(x, jax.core.Tracer):
        return jax.device_put(x, NamedSharding(jax.sharding.get_mesh(), spec))
    return jax.lax.with_sharding_constraint(x, spec)


def _cluster_env_is_multiprocess(env=os.environ) -> bool:
    """Whether the environment announces a multi-process job that `jax.distributed` can auto-detect."""
    def count(key):
        try:
            return int(env.get(key, "1"))
        except ValueError:
            return 1
    slurm_step = all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID"))
    tpu_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return ((slurm_step and count("SLURM_NTASKS") > 1)  # inside `srun` with several tasks
            or count("OMPI_COMM_WORLD_SIZE") > 1  # mpirun
            or len([h for h in tpu_hosts.split(",") if h]) > 1  # GKE / multi-host TPU VM
            or "MEGASCALE_COORDINATOR_ADDRESS" in env  # multislice TPU
            or "JAX_COORDINATOR_ADDRESS" in env)  # set by launch/tpu_pod.sh; JAX reads it itself


def _slurm_node_devices(env=os.environ) -> list[int] | None:
    """The node's GPUs for a Slurm step of one task per node (launch/slurm_gpu.sbatch), where JAX would give the
    task only GPU SLURM_LOCALID; None otherwise (one task per GPU: JAX's choice is right)."""
    tasks = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") or ""  # e.g. "1(x4)"
    gpus = env.get("SLURM_GPUS_ON_NODE", "")
    return list(range(int(gpus))) if tasks.split("(")[0] == "1" and gpus.isdigit() else None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, initialization_timeout: int = 300) -> bool:
    """Starts `jax.distributed` for a multi-process run; a no-op for a single process.

    Must run before anything touches a JAX device. Explicit: `coordinator_address` ("host:port" of
    process 0) with `num_processes` and `process_id` (launch/local.sh). Without a coordinator, JAX
    detects everything when the environment announces a multi-process job: a Slurm `srun` step with
    several tasks (launch/slurm_gpu.sbatch: one per node, with all of its GPUs), Open MPI, a TPU pod (launch/tpu_pod.sh exports
    JAX_COORDINATOR_ADDRESS; GKE sets TPU_WORKER_HOSTNAMES). `num_processes=1` always means a single
    process. Returns whether the distributed runtime is running.
    """
    if jax.distributed.is_initialized():
        return True
    if num_processes == 1:
        return False
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError(f"coordinator_address={coordinator_address!r} also needs num_processes and process_id; "
                             f"got num_processes={num_processes}, process_id={process_id}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    elif not _cluster_env_is_multiprocess():
        if num_processes is not None:
            raise ValueError(f"num_processes={num_processes} needs a coordinator_address (or a Slurm / MPI / TPU pod "
                             "environment that JAX can detect)")
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=initialization_timeout,
                               local_device_ids=None if coordinator_address else _slurm_node_devices())
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def host_shard(items: Sequence, process_index: int | None = None, process_count: int | None = None) -> list:
    """The items this host owns (round-robin by position), so hosts split a problem set without overlap."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count})")
    return list(items[index::count])
