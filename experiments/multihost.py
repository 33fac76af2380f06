"""Multi-host start-up flags shared by the experiments (the launchers in launch/ pass them)."""
from __future__ import annotations

from absl import flags

_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process "
                                   "start); default: detect Slurm / TPU pods / Open MPI, else single process")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")


def _mesh_ok(sizes) -> bool:
    """3 axis sizes, each >= 1 or -1 (the rest), at most one -1."""
    try:
        values = [int(v) for v in sizes]
    except ValueError:
        return False
    return len(values) == 3 and all(v >= 1 or v == -1 for v in values) and values.count(-1) <= 1


# The check of a mesh flag (data,fsdp,tensor sizes): (predicate, what a value must be).
MESH_CHECK = (_mesh_ok, "3 sizes, each >= 1 or -1 (at most one -1: the rest)")


def initialize() -> bool:
    """Starts jax.distributed when the flags or the environment say so; returns whether it did."""
    from rstar_jax import parallel
    return parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
