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
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1:
      raise ValueError(f"mesh {self}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
      raise ValueError(f"mesh {self} does not divide the {num_devices} available devices")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != num_devices:
      raise ValueError(f"mesh {self} uses {int(np.prod(sizes))} devices but {num_devices} are available")
    return tuple(sizes)


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


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide (e.g. a vocab of 151936 over 3 devices)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axes if dim % size == 0 else None)
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
  """`with_sharding_constraint` by logical names under the active mesh; a no-op without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, _fit_spec(logical_to_spec(logical_axes, rules), x.shape, mesh))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts `jax.distributed` on multi-host runs; a no-op on a single host.

  Explicit arguments win; otherwise TPU pods and Slurm are detected by JAX itself. Returns whether
  the distributed runtime was started.
  """
  explicit = coordinator_address is not None
  on_cluster = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
  if not explicit and not on_cluster:
    return False
  if explicit and (num_processes or 1) <= 1:
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def host_shard(items: Sequence, process_index: int | None = None, process_count: int | None = None) -> list:
  """The items this host owns (round-robin by position), so hosts split a problem set without overlap."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return list(items[index::count])
