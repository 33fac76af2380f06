#!/usr/bin/env bash
# Runs one experiment on every host of a Cloud TPU VM slice: the flagfile is copied to all workers
# and the same command runs on each (gcloud ... ssh --worker=all). JAX_COORDINATOR_ADDRESS (worker 0,
# port 8482) turns on jax.distributed in parallel.initialize_distributed; JAX takes the process count
# and id from the TPU metadata.
#
# usage: TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh MODULE FLAGFILE [extra flags...]
#   e.g. TPU_NAME=rstar ZONE=us-central2-b launch/tpu_pod.sh expand experiments/configs/miniature_expand.flags
# The repository must be checked out at ~/$REPO_DIR (default rstar_jax) on every worker with the
# package installed (pip install -e '.[tpu]'); PYTHON (default python3) and PROJECT are optional.
set -euo pipefail
if (( $# < 2 )); then sed -n '2,/^set -e/p' "$0" | sed '$d' >&2; exit 2; fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
module=${1#experiments.} flagfile=$2
shift 2
where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
remote_flags=/tmp/rstar_jax_$(basename "$flagfile")

coordinator=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" \
  --format='value(networkEndpoints[0].ipAddress)')
[[ -n $coordinator ]] || { echo "tpu_pod.sh: no internal IP for worker 0 of $TPU_NAME" >&2; exit 1; }
gcloud compute tpus tpu-vm scp "$flagfile" "$TPU_NAME:$remote_flags" --worker=all "${where[@]}"
printf -v command '%q ' "${PYTHON:-python3}" -m "experiments.$module" --flagfile="$remote_flags" "$@"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${where[@]}" \
  --command="cd ${REPO_DIR:-rstar_jax} && JAX_COORDINATOR_ADDRESS=$coordinator:8482 $command"
