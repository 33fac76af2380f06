#!/usr/bin/env bash
# Runs one experiment as N local CPU processes joined by jax.distributed with explicit coordinator
# flags, to exercise multi-host code paths (global meshes, host_shard, process-0-only I/O) on one box.
#
# usage: launch/local.sh NUM_PROCESSES MODULE FLAGFILE [extra flags...]
#   e.g. launch/local.sh 2 expand experiments/configs/miniature_expand.flags --out=/tmp/expand
# MODULE is experiments.<MODULE> (e.g. "expand"). Each process gets DEVICES_PER_PROCESS
# (default 2) fake CPU devices; process 0 prints to the terminal, process i logs to
# $LOG_DIR/process_i.log (default /tmp/rstar_local_<port>). PORT picks the coordinator port (default
# a free one). If any process fails, the others are stopped.
set -euo pipefail
if (( $# < 3 )); then sed -n '2,/^set -e/p' "$0" | sed '$d' >&2; exit 2; fi
num_processes=$1 module=${2#experiments.} flagfile=$(realpath "$3")
shift 3
python=${PYTHON:-python}
cd "$(dirname "$0")/.."
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-/tmp/rstar_local_$port}
mkdir -p "$log_dir"
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}"

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for ((i = 0; i < num_processes; i++)); do
  cmd=("$python" -m "experiments.$module" --flagfile="$flagfile" --coordinator_address="127.0.0.1:$port"
       --num_processes="$num_processes" --process_id="$i" "$@")
  if ((i == 0)); then "${cmd[@]}" & else "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 & fi
  pids+=($!)
done
for ((i = 0; i < num_processes; i++)); do
  wait -n || { echo "local.sh: a process failed; stopping the rest (logs: $log_dir)" >&2; exit 1; }
done
