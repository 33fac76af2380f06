"""MCTS-expansion decode benchmark: our sampler vs HF transformers `generate`, side by side.

  python -m experiments.bench.decode            # the issue's workload (several minutes on 2 cores)
  python -m experiments.bench.decode --num_prompts=8 --min_len=64 --max_len=128   # a quick look

  python -m experiments.bench.decode --preset=qwen2.5-1.5b --dtype=bfloat16   # on a GPU
  python -m experiments.bench.decode --against=xla_defaults --preset=tiny --min_len=64 --max_len=320 \
      --new_tokens=128   # the miniature's shapes: our CPU decode options vs XLA's defaults
  python -m experiments.bench.decode --against=one_call --preset=tiny --min_len=64 --max_len=320 \
      --num_prompts=32 --n=4 --new_tokens=72   # an MCTS expansion of the miniature: concurrent groups vs one call
  python -m experiments.bench.decode --against=whole_prefill --preset=tiny --min_len=100 --max_len=300 \
      --num_prompts=16 --n=4 --new_tokens=45 --step_len=40   # the miniature's expansion with the policy's store

Workload: prompts of random length in [min_len, max_len], n samples each, `new_tokens` sampled tokens
(no stop), random weights of a ~50M-parameter Qwen2-shaped fp32 config (or `--preset`'s shapes). Both
run on JAX's default device: a GPU if JAX has one (PyTorch then uses CUDA too), else the CPU. Prints
tokens/s and peak memory of both, our achieved fraction of this machine's measured matmul peak and
memory bandwidth, and last `ratio=<ours/HF tokens per second>`. `--against` compares with our own sampler
instead: `xla_defaults` compiled with XLA's default options (`rstar_jax.sampling.CPU_DECODE_COMPILER_OPTIONS`),
`one_call` running each call as one batch (no concurrent groups: `rstar_jax.sampling.CPU_CONCURRENT_CALLS`),
`whole_prefill` on prompts that each extend a stored parent (a random prompt as above) by `step_len` tokens,
ours prefilling only those tokens on the parent's stored keys/values (`Sampler(cache_mib=...)`, as MCTS
expansions do) against the same sampler prefilling every prompt whole.
"""
from __future__ import annotations

import time

from absl import app, flags

from experiments.bench.common import PeakMemory, model_config, peak_matmul_size, torch_device

flags.DEFINE_integer("num_prompts", 64, "prompts (MCTS leaves)")
flags.DEFINE_integer("min_len", 256, "shortest prompt, tokens")
flags.DEFINE_integer("max_len", 512, "longest prompt, tokens")
flags.DEFINE_integer("n", 8, "samples per prompt")
flags.DEFINE_integer("new_tokens", 48, "tokens generated per sample")
flags.DEFINE_integer("hf_prompts_per_call", 8, "prompts per HF generate call (bounds HF's memory)")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_integer("step_len", 40, "--against=whole_prefill: tokens a prompt adds to its stored parent")
flags.DEFINE_string("preset", "", "model shapes of this preset (rstar_jax.models.config.PRESETS); default: ~48M")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter and activation dtype of both models")
flags.DEFINE_enum("attention_impl", "xla", ["xla", "dot_product", "cudnn"], "our prefill attention")
# Baselines that are our own sampler with one setting changed: (description, Sampler keyword arguments).
OUR_BASELINES = {"xla_defaults": ("ours with XLA's default decode options", dict(xla_defaults=True)),
                 "one_call": ("ours with one batch per call", dict(concurrent_calls=1)),
                 "whole_prefill": ("ours prefilling every prompt whole", dict())}
flags.DEFINE_enum("against", "hf", ["hf", *OUR_BASELINES], "baseline: HF generate, or our sampler with XLA's "
                  "default decode compiler options, or with every call run as one batch, or prefilling prompts "
                  "whole that ours prefills after their stored parents")
FLAGS = flags.FLAGS


def measure_machine(dtype: str):
    """(matmul FLOP/s, memory bytes/s) of this machine through XLA, in `dtype`."""
    import jax
    import jax.numpy as jnp
    size = peak_matmul_size()
    a = jnp.ones((size, size), jnp.dtype(dtype))
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        mm(a).block_until_ready()
    flops = 2 * size**3 * reps / (time.perf_counter() - start)
    big = jnp.ones((64 << 20,), jnp.float32)  # 256 MiB, far beyond the caches
    copy = jax.jit(lambda x: x * 1.0001)
    copy(big).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        copy(big).block_until_ready()
    bandwidth = 2 * big.nbytes * reps / (time.perf_counter() - start)  # read + write
    return flops, bandwidth


def make_prompts(rng, num, lo, hi, vocab):
    return [rng.integers(1, vocab, int(n)).tolist() for n in rng.integers(lo, hi + 1, num)]


def run_ours(model, prompts, n, new_tokens, seed, parents=None, **sampler_kwargs):
    """parents: prompts[i] extends parents[i], prefilled and stored off the clock, so only its rest prefills."""
    from rstar_jax.sampling import Sampler, SamplingConfig
    sampler = Sampler(model, lambda ids: "", prompt_buckets=(64, 128, 256, 512, 1024),
                      cache_mib=1 << 20 if parents else 0, **sampler_kwargs)
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
    names = {}
    if parents:
        names = {"texts": [f"child {i}" for i in range(len(prompts))],
                 "parents": [f"parent {i}" for i in range(len(prompts))]}
        sampler.generate(parents, config=SamplingConfig(max_new_tokens=1), texts=names["parents"])
    first = {k: v[:1] for k, v in names.items()}
    sampler.generate(prompts[:1], n=n, config=cfg, seed=seed, **first)  # compile the batch-1 shapes off the clock
    warm = time.perf_counter()
    sampler.generate(prompts, n=n, config=cfg, seed=seed, **names)  # first full-size call compiles
    compile_s = time.perf_counter() - warm
    with PeakMemory("jax") as mem:
        start = time.perf_counter()
        out = sampler.generate(prompts, n=n, config=cfg, seed=seed + 1, **names)
        seconds = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for per in out for s in per)
    return tokens, seconds, mem.delta_mib, compile_s, sampler.last_timing


def run_hf(hf_model, prompts, n, new_tokens, per_call, device):
    import torch
    tokens, start = 0, time.perf_counter()
    with PeakMemory("torch") as mem, torch.no_grad():
        for i in range(0, len(prompts), per_call):
            chunk = prompts[i:i + per_call]
            width = max(map(len, chunk))
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, p in enumerate(chunk):  # left padding, as for decoder-only generation
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            out = hf_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, num_return_sequences=n,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, top_p=1.0, top_k=0,
                                    temperature=1.0, pad_token_id=0)
            tokens += (out.shape[1] - width) * out.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
    return tokens, time.perf_counter() - start, mem.delta_mib


def main(argv):
    del argv
    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from rstar_jax.models import Qwen2
    cfg = model_config(FLAGS.preset, FLAGS.dtype, FLAGS.attention_impl)
    device = torch_device()
    rng = np.random.default_rng(FLAGS.seed)
    prompts = make_prompts(rng, FLAGS.num_prompts, FLAGS.min_len, FLAGS.max_len, cfg.vocab_size)
    parents = None
    if FLAGS.against == "whole_prefill":  # each prompt is a stored parent and one step
        steps = make_prompts(rng, len(prompts), FLAGS.step_len, FLAGS.step_len, cfg.vocab_size)
        parents, prompts = prompts, [p + s for p, s in zip(prompts, steps)]
    extends = f" + {FLAGS.step_len} after a stored parent" if parents else ""
    print(f"workload: {len(prompts)} prompts of {FLAGS.min_len}-{FLAGS.max_len} tokens{extends}, n={FLAGS.n}, "
          f"{FLAGS.new_tokens} new tokens; model {cfg.num_params() / 1e6:.1f}M params {cfg.dtype}; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} on {device} "
          f"({torch.get_num_threads()} threads)", flush=True)
    peak_flops, bandwidth = measure_machine(cfg.dtype)
    print(f"machine: matmul peak {peak_flops / 1e9:.1f} GFLOP/s, memory bandwidth {bandwidth / 1e9:.1f} GB/s",
          flush=True)

    model = Qwen2(cfg, rngs=nnx.Rngs(FLAGS.seed))
    ours_tokens, ours_s, ours_mem, compile_s, timing = run_ours(model, prompts, FLAGS.n, FLAGS.new_tokens, FLAGS.seed,
                                                                parents)
    ours_tps = ours_tokens / ours_s
    print(f"ours: {ours_tokens} tokens in {ours_s:.2f} s = {ours_tps:.1f} tokens/s; peak memory +{ours_mem:.0f} MiB; "
          f"(compile {compile_s:.1f} s, off the clock; padded rows {timing['batch_rows']} in {timing['groups']} "
          f"concurrent groups, prompt bucket {timing['prompt_bucket']})", flush=True)

    # Model FLOPs actually needed: one prefill per prompt (of its tokens after a stored parent) + decode of every
    # sample.
    params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # embedding lookup is not a matmul
    lm_head = cfg.vocab_size * cfg.hidden_size
    prompt_tokens = sum(map(len, prompts))
    prefilled = prompt_tokens - (sum(map(len, parents)) if parents else 0)
    ctx = np.mean([len(p) for p in prompts]) + FLAGS.new_tokens / 2
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # per token per context position
    flops = (2 * (params + lm_head) * (prefilled + ours_tokens) + attn * ctx * ours_tokens
             + attn * (np.mean([len(p) for p in prompts]) - prefilled / len(prompts) / 2) * prefilled)
    # Bytes per decode step: all weights once, each prompt's shared KV once, each sample's own KV.
    width = cfg.jnp_dtype.itemsize
    slot_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * width
    kv_bytes = slot_bytes * (prompt_tokens + FLAGS.new_tokens / 2 * len(prompts) * FLAGS.n)
    bytes_moved = (cfg.num_params() * width + kv_bytes) * FLAGS.new_tokens
    print(f"ours: {flops / ours_s / 1e9:.1f} GFLOP/s = {flops / ours_s / peak_flops:.0%} of matmul peak; "
          f"{bytes_moved / ours_s / 1e9:.2f} GB/s = {bytes_moved / ours_s / bandwidth:.0%} of bandwidth", flush=True)

    if FLAGS.against in OUR_BASELINES:
        name, kwargs = OUR_BASELINES[FLAGS.against]
        base_tokens, base_s, base_mem, _, _ = run_ours(model, prompts, FLAGS.n, FLAGS.new_tokens, FLAGS.seed, **kwargs)
        print(f"{name}: {base_tokens} tokens in {base_s:.2f} s = {base_tokens / base_s:.1f} tokens/s; "
              f"peak memory +{base_mem:.0f} MiB", flush=True)
        print(f"ratio={ours_tps / (base_tokens / base_s):.2f}")
        return

    hf_config = transformers.Qwen2Config(**cfg.to_hf_dict())
    torch.manual_seed(FLAGS.seed)
    with torch.device(device):  # built where it runs: a preset's CPU init takes minutes
        hf_model = transformers.Qwen2ForCausalLM(hf_config).to(getattr(torch, cfg.dtype)).eval()
    hf_tokens, hf_s, hf_mem = run_hf(hf_model, prompts, FLAGS.n, FLAGS.new_tokens, FLAGS.hf_prompts_per_call, device)
    hf_tps = hf_tokens / hf_s
    print(f"hf:   {hf_tokens} tokens in {hf_s:.2f} s = {hf_tps:.1f} tokens/s; peak memory +{hf_mem:.0f} MiB "
          f"({FLAGS.hf_prompts_per_call} prompts x {FLAGS.n} per generate call)", flush=True)
    print(f"ratio={ours_tps / hf_tps:.2f}")


if __name__ == "__main__":
    app.run(main)
