"""SFT training-step benchmark: our jitted train step vs a plain HF transformers PyTorch step.

  python -m experiments.bench.train                 # batch 4 x 256 tokens, 5 timed steps each
  python -m experiments.bench.train --batch=8 --seq_len=512 --steps=3
  python -m experiments.bench.train --loss_chunk=128  # our loss 128 positions at a time (logits recomputed)
  python -m experiments.bench.train --preset=qwen2.5-0.5b --dtype=bfloat16 --batch=8 --seq_len=2048  # GPU

Same ~48M-parameter Qwen2-shaped model (random weights; `--preset` for real shapes), same batch of
random tokens, full-sequence next-token loss, AdamW (weight decay 0.1, lr 1e-5), grad clipping at 1.0,
fp32 master weights; `--dtype=bfloat16` computes in bf16 (ours: the trainer's compute dtype; HF:
`torch.autocast`). Both run on JAX's default device (PyTorch on CUDA when JAX has a GPU). Ours is the
real `rstar_jax.train` step (Trainer.train_step on a one-device mesh); HF's is `Qwen2ForCausalLM`
forward with labels + backward + clip + `torch.optim.AdamW`. Prints tokens/s of both, our and HF's
achieved fraction of this machine's measured matmul peak (model FLOPs: 6 x matmul params + attention
per token), and last `ratio=<ours/HF tokens per second>`.
"""
from __future__ import annotations

import time

from absl import app, flags

from experiments.bench.common import model_config, peak_matmul_size, torch_device

flags.DEFINE_integer("batch", 4, "rows per step")
flags.DEFINE_integer("seq_len", 256, "tokens per row")
flags.DEFINE_integer("steps", 5, "timed steps (after 2 untimed warm-up steps)")
flags.DEFINE_bool("remat", False, "our step with per-layer rematerialisation")
flags.DEFINE_integer("loss_chunk", 0, "our LM head and loss this many positions at a time (0: all at once)")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_string("preset", "", "model shapes of this preset (rstar_jax.models.config.PRESETS); default: ~48M")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype of both steps")
flags.DEFINE_enum("attention_impl", "xla", ["xla", "dot_product", "cudnn"], "our attention")
FLAGS = flags.FLAGS


def run_ours(cfg, tokens, steps: int, remat: bool, loss_chunk: int = 0):
    import jax
    import numpy as np
    from flax import nnx

    from rstar_jax import parallel
    from rstar_jax.models import Qwen2
    from rstar_jax.train.optim import OptimConfig
    from rstar_jax.train.tasks import SFTTask
    from rstar_jax.train.trainer import Trainer, TrainConfig

    mesh = parallel.make_mesh(parallel.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    task = SFTTask(None, tokens.shape[1], eos_id=0, loss_chunk=loss_chunk)
    model = Qwen2(cfg.replace(dtype="float32"), rngs=nnx.Rngs(FLAGS.seed))  # fp32 master weights
    optim = OptimConfig(learning_rate=1e-5, schedule="constant", weight_decay=0.1, max_grad_norm=1.0)
    train_cfg = TrainConfig(max_steps=steps + 2, remat=remat, compute_dtype=cfg.dtype)
    trainer = Trainer(task, model, optim, train_cfg, mesh, steps + 2)
    mask = np.ones(tokens.shape, bool)
    batch = trainer.place_batch({"tokens": tokens[None], "mask": mask[None], "loss_mask": mask[None]})  # [1, B, T]
    state = trainer.init_state()
    start = time.perf_counter()
    for _ in range(2):  # the first compiles
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps, float(metrics["loss"]), warm, task


def run_hf(cfg, tokens, steps: int, device: str):
    import torch
    import transformers
    hf_config = transformers.Qwen2Config(**cfg.replace(dtype="float32").to_hf_dict())
    torch.manual_seed(FLAGS.seed)
    with torch.device(device):  # fp32 master weights, built where they train
        model = transformers.Qwen2ForCausalLM(hf_config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    ids = torch.from_numpy(tokens).long().to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()  # float(loss) waits for the step, on a GPU too
    return (time.perf_counter() - start) / steps, loss


def main(argv):
    del argv
    import jax
    import numpy as np
    import torch

    from rstar_jax.train.metrics import measure_peak_flops
    cfg = model_config(FLAGS.preset, FLAGS.dtype, FLAGS.attention_impl)
    device = torch_device()
    b, t = FLAGS.batch, FLAGS.seq_len
    tokens = np.random.default_rng(FLAGS.seed).integers(1, cfg.vocab_size, (b, t)).astype(np.int32)  # [B, T]
    print(f"workload: SFT step, batch {b} x {t} tokens, model {cfg.num_params() / 1e6:.1f}M params, {cfg.dtype} compute, "
          f"AdamW; jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} on {device} "
          f"({torch.get_num_threads()} threads)", flush=True)
    size = peak_matmul_size()
    peak = measure_peak_flops(cfg.dtype, size=size, reps=10)
    print(f"machine: matmul peak {peak / 1e9:.1f} GFLOP/s ({cfg.dtype} {size}x{size}, best of 10)", flush=True)

    ours_s, ours_loss, warm, task = run_ours(cfg, tokens, FLAGS.steps, FLAGS.remat, FLAGS.loss_chunk)
    flops = task.flops_per_token(cfg, t) * b * t  # per step
    ours_tps = b * t / ours_s
    print(f"ours: {ours_s * 1e3:.0f} ms/step = {ours_tps:.1f} tokens/s, {flops / ours_s / 1e9:.1f} GFLOP/s = "
          f"{flops / ours_s / peak:.0%} of matmul peak (loss {ours_loss:.3f}; compile + 2 warm-up steps "
          f"{warm:.1f} s{', remat' if FLAGS.remat else ''}"
          f"{f', loss in chunks of {FLAGS.loss_chunk}' if FLAGS.loss_chunk else ''})", flush=True)
    hf_s, hf_loss = run_hf(cfg, tokens, FLAGS.steps, device)
    hf_tps = b * t / hf_s
    print(f"hf:   {hf_s * 1e3:.0f} ms/step = {hf_tps:.1f} tokens/s, {flops / hf_s / 1e9:.1f} GFLOP/s = "
          f"{flops / hf_s / peak:.0%} of matmul peak (loss {hf_loss:.3f})", flush=True)
    print(f"ratio={ours_tps / hf_tps:.2f}")


if __name__ == "__main__":
    app.run(main)
