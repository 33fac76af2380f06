"""Multi-host start-up flags shared by the experiments (the launchers in launch/ pass them)."""
from __future__ import annotations

from absl import flags

_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process "
                                   "start); default: detect Slurm / TPU pods / Open MPI, else single process")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")


def initialize() -> bool:
    """Starts jax.distributed when the flags or the environment say so; returns whether it did."""
    from rstar_jax import parallel
    return parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
