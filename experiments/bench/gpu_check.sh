#!/usr/bin/env bash
# The GPU check, one run on one NVIDIA GPU (~7 min): model parity tests on the GPU, then the decode and
# training benchmarks side by side with PyTorch on the same chip, fused (cuDNN) attention included.
#
#   bash experiments/bench/gpu_check.sh            # logs go to $OUT (default /tmp/gpu_check)
#
# Runs with the machine's own python3 and its jax/torch/transformers. If its flax cannot build our
# model, the pinned flax wheel from .whl/ (if carried) is installed under /tmp/site and used instead.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py=python3
section() { echo "=== $* ($(date +%T))"; }

section versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
smoke='import jax, flax, torch, transformers
from flax import nnx
from rstar_jax.models import Qwen2, preset, positions_from_mask
m = Qwen2(preset("tiny"), rngs=nnx.Rngs(0))
mask = jax.numpy.ones((1, 4), bool)
m(jax.numpy.ones((1, 4), jax.numpy.int32), positions_from_mask(mask), mask)
print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "torch", torch.__version__,
      "transformers", transformers.__version__)'
if ! $py -c "$smoke"; then
    section "the image's flax fails: using the carried wheel"
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    $py -c "$smoke" || exit 1
fi

section "parity tests on the GPU (fp32 at full matmul precision: TF32 would miss 1e-4)"
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 $py -m pytest -q -rs -o addopts= -p no:cacheprovider \
    tests/test_models_hf_parity.py tests/test_kv_cache.py tests/test_sampling.py -k "not sharded" 2>&1 \
    | tee "$OUT/parity.log" | tail -15

bench() {  # name, timeout, module, flags...
    local name=$1 limit=$2
    shift 2
    section "$name: $*"
    timeout "$limit" $py -m "$@" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tee "$OUT/$name.log"
}
bench decode_48m 120 experiments.bench.decode --dtype=bfloat16 --hf_prompts_per_call=64
bench decode_1.5b 150 experiments.bench.decode --dtype=bfloat16 --preset=qwen2.5-1.5b --hf_prompts_per_call=64
bench train_0.5b_xla 120 experiments.bench.train --dtype=bfloat16 --preset=qwen2.5-0.5b --batch=8 --seq_len=1024
bench train_0.5b_cudnn 120 experiments.bench.train --dtype=bfloat16 --preset=qwen2.5-0.5b --batch=8 --seq_len=1024 \
    --attention_impl=cudnn
section done
