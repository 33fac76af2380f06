"""Flags and the stage runner shared by `experiments.sft` and `experiments.train_rm`.

A run directory holds everything of a stage: `flags.txt`, `checkpoints/` (orbax, resumable), `tb/`
(TensorBoard events), `profile/` (when asked) and `hf/` (the exported model). Re-running the same
command resumes from the newest complete checkpoint; a finished run just exports again.
"""
from __future__ import annotations

import os

from absl import flags

from experiments import multihost

_TRAIN = flags.DEFINE_list("train_records", None, "JSONL training records (comma-separated files)")
_EVAL = flags.DEFINE_list("eval_records", None, "JSONL held-out records; default: --holdout_fraction of the train set")
_HOLDOUT = flags.DEFINE_float("holdout_fraction", None, "fraction of the train records held out for evaluation "
                              "when --eval_records is not given (default: 0 for SFT, 0.05 for reward models)")
_OUT = flags.DEFINE_string("out_dir", None, "run directory (checkpoints, TensorBoard, HF export)")
_INIT_HF = flags.DEFINE_string("init_hf_dir", None, "HF Qwen2 directory to start from (SFT: the base model; "
                               "reward models: the round's policy, value head added fresh if absent)")
_PRESET = flags.DEFINE_string("preset", None, "random-init model preset instead of --init_hf_dir (e.g. tiny)")
_TOKENIZER = flags.DEFINE_string("tokenizer_dir", None, "tokenizer directory (default: --init_hf_dir)")
_MAX_LEN = flags.DEFINE_integer("max_len", 2048, "longest token sequence (prompt + response)")
_OVERLENGTH = flags.DEFINE_enum("overlength", "error", ["error", "truncate"], "a record over --max_len: refuse "
                                "with an error naming file:line, or truncate it and count")
_BATCH = flags.DEFINE_integer("batch_size", 128, "global rows per optimizer step")
_MICRO = flags.DEFINE_integer("microbatches", 1, "gradient accumulation: the batch in this many sequential pieces")
_EPOCHS = flags.DEFINE_float("epochs", 2.0, "passes over the training records")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "optimizer steps (overrides --epochs)")
_LR = flags.DEFINE_float("learning_rate", 7e-6, "peak learning rate")
_SCHEDULE = flags.DEFINE_enum("schedule", "linear", ["linear", "cosine", "constant"], "decay after warmup")
_WARMUP = flags.DEFINE_integer("warmup_steps", 0, "linear warmup steps")
_END_LR = flags.DEFINE_float("end_lr_fraction", 0.0, "final learning rate as a fraction of the peak")
_WD = flags.DEFINE_float("weight_decay", 0.1, "AdamW decoupled weight decay (not on biases and norms)")
_CLIP = flags.DEFINE_float("max_grad_norm", 1.0, "global gradient-norm clipping (0: off)")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "forward/backward dtype "
                           "(master parameters and optimizer state stay fp32)")
_REMAT = flags.DEFINE_bool("remat", False, "recompute each decoder layer in the backward pass (saves memory)")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"], "data,fsdp,tensor mesh axis sizes (-1: the rest)")
_SEED = flags.DEFINE_integer("seed", 0, "data order and fresh-init seed")
_BUCKETS = flags.DEFINE_list("length_buckets", None, "padded lengths (default: powers of two from 64, and --max_len)")
_CKPT_EVERY = flags.DEFINE_integer("checkpoint_every", 200, "save every N steps (and always at the end)")
_KEEP = flags.DEFINE_integer("keep_checkpoints", 3, "checkpoints kept")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "log metrics every N steps")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 0, "evaluate the held-out set every N steps (0: at the end only)")
_PROFILE_START = flags.DEFINE_integer("profile_start", -1, "capture a jax.profiler trace from this step (process 0)")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "steps in the profiler trace")
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "per-device peak FLOP/s for the MFU figure (e.g. 989e12 for an "
                           "H100's bf16); 0: measure a matmul at start")
_NO_EXPORT = flags.DEFINE_bool("skip_export", False, "do not write the HF export at the end")


def _require(flag, why: str):
    if flag.value in (None, "", []):
        raise flags.ValidationError(f"--{flag.name} is required: {why}")
    return flag.value


def _model(task_name: str, tokenizer, mesh):
    from flax import nnx

    from rstar_jax import tokenizer as tk
    from rstar_jax.models import PPM, Qwen2, preset
    from rstar_jax.models.hf_io import load_hf
    reward = task_name != "sft"
    if bool(_INIT_HF.value) == bool(_PRESET.value):
        raise flags.ValidationError("give exactly one of --init_hf_dir and --preset")
    if _INIT_HF.value:
        model = load_hf(_INIT_HF.value, ppm=reward, init_missing_value_head=reward, mesh=mesh)
    else:
        cfg = preset(_PRESET.value)
        model = PPM(cfg, rngs=nnx.Rngs(_SEED.value)) if reward else Qwen2(cfg, rngs=nnx.Rngs(_SEED.value))
    return tk.sync_model_vocab(model, tokenizer, nnx.Rngs(_SEED.value + 1), pad_to_multiple_of=mesh.shape["tensor"])


def run_stage(task_name: str) -> dict:
    """Reads records, trains with resume, exports; returns the final train / eval metrics."""
    import dataclasses
    import json

    import jax

    from rstar_jax import parallel
    from rstar_jax import tokenizer as tk
    from rstar_jax.models.hf_io import save_hf
    from rstar_jax.train.batching import BatchConfig, BatchIterator
    from rstar_jax.train.checkpoint import Checkpointer
    from rstar_jax.train.loop import fit
    from rstar_jax.train.metrics import MetricsWriter, measure_peak_flops
    from rstar_jax.train.optim import OptimConfig
    from rstar_jax.train.records import holdout_split, read_records
    from rstar_jax.train.tasks import TASKS
    from rstar_jax.train.trainer import Trainer, TrainConfig

    from absl import logging as absl_logging
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    multihost.initialize()
    out = _require(_OUT, "where checkpoints and the export go")
    train_files = _require(_TRAIN, "the JSONL records to train on")
    tok_dir = _TOKENIZER.value or _require(_INIT_HF, "the tokenizer comes from --tokenizer_dir or --init_hf_dir")
    os.makedirs(out, exist_ok=True)

    mesh_sizes = [int(x) for x in _MESH.value]
    if len(mesh_sizes) != 3:
        raise flags.ValidationError(f"--mesh needs 3 sizes (data,fsdp,tensor), got {_MESH.value}")
    mesh = parallel.make_mesh(parallel.MeshConfig(*mesh_sizes))
    tokenizer = tk.load_tokenizer(tok_dir)
    task_cls = TASKS[task_name]
    task = task_cls(tokenizer, _MAX_LEN.value, _OVERLENGTH.value,
                    pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    records = read_records(task_cls.kind, train_files)
    holdout = _HOLDOUT.value if _HOLDOUT.value is not None else (0.05 if task.is_reward_model else 0.0)
    if _EVAL.value:
        eval_records = read_records(task_cls.kind, _EVAL.value)
    elif holdout > 0:
        records, eval_records = holdout_split(records, holdout, _SEED.value)
    else:
        eval_records = []
    examples, stats = task.tokenize(records)
    print(f"{task_name}: {stats.examples} training examples from {len(records)} records "
          f"({stats.truncated} truncated, {stats.dropped} dropped at max_len={_MAX_LEN.value}), "
          f"{len(eval_records)} held out", flush=True)

    buckets = tuple(int(b) for b in _BUCKETS.value) if _BUCKETS.value else None
    batch_cfg = BatchConfig(batch_size=_BATCH.value, microbatches=_MICRO.value, seed=_SEED.value,
                            length_buckets=buckets)
    batches = BatchIterator(examples, task, batch_cfg, process_index=jax.process_index(),
                            process_count=jax.process_count())
    train_cfg = TrainConfig(epochs=_EPOCHS.value, max_steps=_MAX_STEPS.value, compute_dtype=_DTYPE.value,
                            remat=_REMAT.value, log_every=_LOG_EVERY.value, eval_every=_EVAL_EVERY.value,
                            profile_start=_PROFILE_START.value, profile_steps=_PROFILE_STEPS.value,
                            profile_dir=os.path.join(out, "profile"))
    optim = OptimConfig(learning_rate=_LR.value, schedule=_SCHEDULE.value, warmup_steps=_WARMUP.value,
                        end_lr_fraction=_END_LR.value, weight_decay=_WD.value, max_grad_norm=_CLIP.value)
    total = train_cfg.total_steps(batches.plan.batches_per_epoch)
    model = _model(task_name, tokenizer, mesh)
    print(f"model: {model.config.num_params() / 1e6:.2f}M params; {total} steps of {_BATCH.value} rows "
          f"({batches.plan.batches_per_epoch} per epoch, fill rate {batches.plan.fill_rate():.1%}); "
          f"mesh {dict(mesh.shape)}", flush=True)
    trainer = Trainer(task, model, optim, train_cfg, mesh, total)
    del model

    # Everything that changes the trajectory: a checkpoint of another config must not be resumed.
    run_config = {"task": task_name, "model": dataclasses.asdict(trainer.model_config),
                  "optim": dataclasses.asdict(optim), "data": dataclasses.asdict(batch_cfg), "total_steps": total,
                  "max_len": _MAX_LEN.value, "overlength": _OVERLENGTH.value, "examples": len(examples),
                  "compute_dtype": _DTYPE.value, "init": _INIT_HF.value or f"preset:{_PRESET.value}"}
    checkpointer = Checkpointer(os.path.join(out, "checkpoints"), run_config, every=_CKPT_EVERY.value,
                                keep=_KEEP.value)
    checkpointer.check_compatible()  # before anything is written: a mismatched rerun must not touch the run dir
    if jax.process_index() == 0:
        _write_flags(os.path.join(out, "flags.txt"))
    writer = MetricsWriter(os.path.join(out, "tb"), total)
    eval_fn = None
    if eval_records:
        eval_examples, _ = task.tokenize(eval_records)
        eval_cfg = BatchConfig(batch_size=_BATCH.value // _MICRO.value, seed=_SEED.value, shuffle=False,
                               length_buckets=buckets)
        eval_fn = lambda: _one_epoch(BatchIterator(eval_examples, task, eval_cfg, process_index=jax.process_index(),
                                                   process_count=jax.process_count()))
    peak = _PEAK.value or measure_peak_flops(_DTYPE.value)
    # CPU "devices" share one host's cores, so the host's peak is the whole machine's.
    total_peak = peak if jax.devices()[0].platform == "cpu" else peak * jax.device_count()
    print(f"{'given' if _PEAK.value else 'measured matmul'} peak: {peak / 1e9:.1f} GFLOP/s per device "
          f"({_DTYPE.value}, {jax.devices()[0].platform})", flush=True)
    try:
        result = fit(trainer, batches, checkpointer=checkpointer, writer=writer, eval_batches=eval_fn,
                     peak_flops=total_peak, release_initial=True)
    finally:
        checkpointer.close()
        writer.close()
    if not _NO_EXPORT.value:
        hf_dir = os.path.join(out, "hf")
        save_hf(trainer.model(result.state), hf_dir, tokenizer=tokenizer)
        print(f"exported {'the ' + task_name.upper() if task.is_reward_model else 'the policy'} to {hf_dir}",
              flush=True)
    summary = {"train": result.last_metrics, "eval": result.eval_metrics, "resumed_from": result.resumed_from}
    if jax.process_index() == 0:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _write_flags(path: str) -> None:
    """This stage's flags (not absl's own), as a flagfile that reruns it."""
    lines = []
    for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
        # Ours: experiments.* and the entry script itself (registered under its file path).
        if module.startswith("experiments.") or "/experiments/" in module or module == "__main__":
            lines += [flag.serialize() for flag in module_flags]
    with open(path, "w") as f:
        f.write("\n".join(line for line in lines if line) + "\n")


def _one_epoch(iterator):
    for _ in range(iterator.plan.batches_per_epoch):
        yield next(iterator)
