"""Flags and the stage runner shared by `experiments.sft` and `experiments.train_rm`.

A run directory holds everything of a stage: `config.json`, `checkpoints/` (orbax, resumable), `tb/`
(TensorBoard events), `profile/` (when asked) and `hf/` (the exported model). Re-running the same
command resumes from the newest complete checkpoint; a finished run just exports again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from typing import Callable, Sequence

from absl import flags

from experiments import multihost
from rstar_jax.errors import InputError
from rstar_jax.models.config import ATTENTION_IMPLS, PRESETS

_AT_LEAST_0, _AT_LEAST_1 = (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")


def _buckets_ok(lengths) -> bool:
    try:
        return all(int(v) >= 1 for v in lengths)
    except ValueError:
        return False


def _field(default, help_text: str, kind: str | None = None, choices: Sequence[str] | None = None,
           reward_only: bool = False, policy_only: bool = False, check: tuple[Callable, str] | None = None):
    """check: (predicate, what a value must be), validated when the flags are parsed."""
    kind = kind or {bool: "bool", int: "integer", float: "float", str: "string", tuple: "list"}[type(default)]
    return dataclasses.field(default=default, metadata={"help": help_text, "kind": kind, "choices": choices,
                                                        "reward_only": reward_only, "policy_only": policy_only,
                                                        "check": check})


@dataclasses.dataclass(frozen=True)
class TrainStageConfig:
    """Every setting of one training stage; each field is also a flag (same name, optional prefix)."""

    train_records: tuple = _field((), "JSONL training records (comma-separated files)")
    eval_records: tuple = _field((), "JSONL held-out records; default: --holdout_fraction of the train set")
    holdout_fraction: float | None = _field(None, "fraction of the train records held out for evaluation when "
                                            "--eval_records is not given (default: 0 for SFT, 0.05 for reward "
                                            "models)", "float",
                                            check=(lambda v: v is None or 0 <= v < 1, "in [0, 1)"))
    out_dir: str | None = _field(None, "run directory (checkpoints, TensorBoard, HF export)", "string")
    init_hf_dir: str | None = _field(None, "HF Qwen2 directory to start from (SFT: the base model; reward models: "
                                     "the round's policy, value head added fresh if absent)", "string")
    preset: str | None = _field(None, "random-init model preset instead of --init_hf_dir (e.g. tiny)", "string",
                                check=(lambda v: not v or v in PRESETS, f"one of {', '.join(sorted(PRESETS))}"))
    tokenizer_dir: str | None = _field(None, "tokenizer directory (default: --init_hf_dir)", "string")
    max_len: int = _field(2048, "longest token sequence (prompt + response)", check=_AT_LEAST_1)
    overlength: str = _field("error", "a record over --max_len: refuse with an error naming file:line, or "
                             "truncate it and count", "enum", ("error", "truncate"))
    batch_size: int = _field(128, "global rows per optimizer step")
    microbatches: int = _field(1, "gradient accumulation: the batch in this many sequential pieces")
    epochs: float = _field(2.0, "passes over the training records")
    max_steps: int | None = _field(None, "optimizer steps (overrides --epochs)", "integer")
    learning_rate: float = _field(7e-6, "peak learning rate")
    schedule: str = _field("linear", "decay after warmup", "enum", ("linear", "cosine", "constant"))
    warmup_steps: int = _field(0, "linear warmup steps")
    end_lr_fraction: float = _field(0.0, "final learning rate as a fraction of the peak")
    weight_decay: float = _field(0.1, "AdamW decoupled weight decay (not on biases and norms)", check=_AT_LEAST_0)
    max_grad_norm: float = _field(1.0, "global gradient-norm clipping (0: off)", check=_AT_LEAST_0)
    compute_dtype: str = _field("float32", "forward/backward dtype (master parameters and optimizer state stay "
                                "fp32)", "enum", ("float32", "bfloat16"))
    attention_impl: str = _field("xla", "attention kernel: xla (einsum), dot_product (jax.nn.dot_product_attention), "
                                 "cudnn (its fused cuDNN kernel: NVIDIA GPUs with --compute_dtype=bfloat16)", "enum",
                                 ATTENTION_IMPLS)
    head_dropout: float = _field(0.1, "dropout on the value head's input in training (the reference's 0.1)",
                                 reward_only=True, check=(lambda v: 0.0 <= v < 1.0, "in [0, 1)"))
    score_head: str = _field("reference", "reward model score: reference (the loss on the raw score; the search "
                             "reads tanh(raw / 5)) or paper (the loss on, and the search reading, tanh(raw) in "
                             "[-1, 1]); the export records which", "enum", ("reference", "paper"), reward_only=True)
    remat: bool = _field(False, "recompute each decoder layer in the backward pass (saves memory)")
    loss_chunk: int = _field(0, "positions per pass through the LM head, its logits recomputed in the backward "
                             "pass, so the [batch, seq, vocab] logits are never held whole (0: all at once)",
                             policy_only=True, check=_AT_LEAST_0)
    mesh: tuple = _field(("-1", "1", "1"), "data,fsdp,tensor mesh axis sizes (-1: the rest)",
                         check=multihost.MESH_CHECK)
    seed: int = _field(0, "data order and fresh-init seed")
    length_buckets: tuple = _field((), "padded lengths (default: powers of two from 64, and --max_len)",
                                   check=(_buckets_ok, "positive integers"))
    checkpoint_every: int = _field(200, "save every N steps (and always at the end)", check=_AT_LEAST_1)
    keep_checkpoints: int = _field(3, "checkpoints kept", check=_AT_LEAST_1)
    log_every: int = _field(10, "log metrics every N steps", check=_AT_LEAST_1)
    eval_every: int = _field(0, "evaluate the held-out set every N steps (0: at the end only)", check=_AT_LEAST_0)
    profile_start: int = _field(-1, "capture a jax.profiler trace from this step (process 0)")
    profile_steps: int = _field(3, "steps in the profiler trace", check=_AT_LEAST_1)
    peak_flops: float = _field(0.0, "per-device peak FLOP/s for the MFU figure; 0: the spec sheet's for known "
                               "accelerators in bf16 (H100/H200/A100/L4, TPU v4/v5e/v5p/v6e), else a matmul "
                               "measured at start", check=_AT_LEAST_0)
    skip_export: bool = _field(False, "do not write the HF export at the end")


def define_flags(prefix: str = "", reward: bool = True) -> None:
    """Defines the stage's flags (`--<prefix><field>`; the reward-model-only ones with reward=True, the
    policy-only ones with reward=False).
    Called by the programs' main only, so that modules importing each other never define a flag twice;
    `experiments.round` uses prefixes `sft_` and `ppm_`."""
    for field in dataclasses.fields(TrainStageConfig):
        name, meta = prefix + field.name, field.metadata
        if (meta["reward_only"] and not reward) or (meta["policy_only"] and reward):
            continue
        if meta["kind"] == "enum":
            flags.DEFINE_enum(name, field.default, meta["choices"], meta["help"])
        else:
            default = list(field.default) if isinstance(field.default, tuple) else field.default
            getattr(flags, f"DEFINE_{meta['kind']}")(name, default, meta["help"])
        if meta["check"]:
            predicate, what = meta["check"]
            flags.register_validator(name, predicate, message=f"--{name} must be {what}")


def config_from_flags(prefix: str = "", **overrides) -> TrainStageConfig:
    """The stage's settings from `--<prefix>*`, checked as a whole (ValueError naming the flag)."""
    values = {}
    for field in dataclasses.fields(TrainStageConfig):
        if prefix + field.name not in flags.FLAGS:  # e.g. a reward-model-only setting of an SFT stage
            continue
        value = flags.FLAGS[prefix + field.name].value
        values[field.name] = tuple(value or ()) if field.metadata["kind"] == "list" else value
    cfg = TrainStageConfig(**{**values, **overrides})
    stage_configs(cfg, prefix)
    return cfg


def stage_configs(cfg: TrainStageConfig, prefix: str = ""):
    """(BatchConfig, TrainConfig, OptimConfig) of a stage. Their checks of settings that only make sense together
    (the batch and its microbatches, epochs or steps, the schedule) raise ValueError naming the flag."""
    from rstar_jax.train.batching import BatchConfig
    from rstar_jax.train.optim import OptimConfig
    from rstar_jax.train.trainer import TrainConfig
    try:
        return (BatchConfig(batch_size=cfg.batch_size, microbatches=cfg.microbatches, seed=cfg.seed,
                            length_buckets=tuple(int(b) for b in cfg.length_buckets) or None),
                TrainConfig(epochs=cfg.epochs, max_steps=cfg.max_steps, compute_dtype=cfg.compute_dtype,
                            remat=cfg.remat, log_every=cfg.log_every, eval_every=cfg.eval_every,
                            profile_start=cfg.profile_start, profile_steps=cfg.profile_steps,
                            profile_dir=cfg.out_dir and os.path.join(cfg.out_dir, "profile"), seed=cfg.seed),
                OptimConfig(learning_rate=cfg.learning_rate, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
                            end_lr_fraction=cfg.end_lr_fraction, weight_decay=cfg.weight_decay,
                            max_grad_norm=cfg.max_grad_norm))
    except ValueError as e:  # their messages start with the field's name, the flag's after the prefix
        raise ValueError(f"--{prefix}{e}") from None


def _require(value, name: str, why: str):
    if value in (None, "", ()):
        raise InputError(f"--{name} is required: {why}")
    return value


def _model(task_name: str, cfg: TrainStageConfig, tokenizer, mesh):
    from flax import nnx

    from rstar_jax import tokenizer as tk
    from rstar_jax.models import PPM, Qwen2, preset
    from rstar_jax.models.hf_io import load_hf
    from rstar_jax.models.ppm import DEFAULT_SCORE_SCALE
    reward = task_name != "sft"
    if cfg.init_hf_dir:
        model = load_hf(cfg.init_hf_dir, ppm=reward, init_missing_value_head=reward, mesh=mesh,
                        attention_impl=cfg.attention_impl)
    else:
        model_cfg = preset(cfg.preset).replace(attention_impl=cfg.attention_impl)
        model = PPM(model_cfg, rngs=nnx.Rngs(cfg.seed)) if reward else Qwen2(model_cfg, rngs=nnx.Rngs(cfg.seed))
    if reward:
        model.score_scale = 1.0 if cfg.score_head == "paper" else DEFAULT_SCORE_SCALE
    return tk.sync_model_vocab(model, tokenizer, nnx.Rngs(cfg.seed + 1), pad_to_multiple_of=mesh.shape["tensor"])


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def run_training(task_name: str, cfg: TrainStageConfig) -> dict:
    """Reads records, trains with resume, exports; returns the final train / eval metrics."""
    import jax

    from rstar_jax import parallel
    from rstar_jax import tokenizer as tk
    from rstar_jax.models.hf_io import save_hf
    from rstar_jax.train.batching import BatchConfig, BatchIterator
    from rstar_jax.train.checkpoint import Checkpointer
    from rstar_jax.train.loop import fit
    from rstar_jax.train.metrics import MetricsWriter, measure_peak_flops, spec_peak_flops
    from rstar_jax.train.records import holdout_split, read_records
    from rstar_jax.train.tasks import TASKS
    from rstar_jax.train.trainer import Trainer

    from absl import logging as absl_logging
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    multihost.initialize()
    out = _require(cfg.out_dir, "out_dir", "where checkpoints and the export go")
    train_files = list(_require(cfg.train_records, "train_records", "the JSONL records to train on"))
    tok_dir = cfg.tokenizer_dir or _require(cfg.init_hf_dir, "init_hf_dir",
                                            "the tokenizer comes from --tokenizer_dir or --init_hf_dir")
    if bool(cfg.init_hf_dir) == bool(cfg.preset):
        raise InputError("give exactly one of --init_hf_dir (a model to start from) and --preset (a fresh one)")
    both = sorted(set(map(os.path.realpath, cfg.eval_records)) & set(map(os.path.realpath, train_files)))
    if both:
        raise InputError(f"--eval_records and --train_records both list {', '.join(both)}: held-out figures "
                         "on training data would measure memorisation")
    os.makedirs(out, exist_ok=True)

    mesh_sizes = [int(x) for x in cfg.mesh]
    if len(mesh_sizes) != 3:
        raise ValueError(f"mesh needs 3 sizes (data,fsdp,tensor), got {cfg.mesh}")
    mesh = parallel.make_mesh(parallel.MeshConfig(*mesh_sizes))
    tokenizer = tk.load_tokenizer(tok_dir)
    task_cls = TASKS[task_name]
    task = task_cls(tokenizer, cfg.max_len, cfg.overlength,
                    pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                    **({"head_dropout": cfg.head_dropout} if task_cls.is_reward_model else
                       {"loss_chunk": cfg.loss_chunk}),
                    **({"bounded": cfg.score_head == "paper"} if task_name == "ppm" else {}))
    records = read_records(task_cls.kind, train_files)
    holdout = cfg.holdout_fraction
    if holdout is None:  # the default: a reward model's accuracy on 5%, when that is at least one record
        holdout = 0.05 if task.is_reward_model and len(records) >= 20 else 0.0
    if cfg.eval_records:
        eval_records = read_records(task_cls.kind, cfg.eval_records)
    elif holdout > 0:
        records, eval_records = holdout_split(records, holdout, cfg.seed)
    else:
        eval_records = []
    examples, stats = task.tokenize(records)
    print(f"{task_name}: {stats.examples} training examples from {len(records)} records "
          f"({stats.truncated} truncated, {stats.dropped} dropped at max_len={cfg.max_len}), "
          f"{len(eval_records)} held out", flush=True)

    batch_cfg, train_cfg, optim = stage_configs(cfg)
    batches = BatchIterator(examples, task, batch_cfg, process_index=jax.process_index(),
                            process_count=jax.process_count())
    total = train_cfg.total_steps(batches.plan.batches_per_epoch)
    model = _model(task_name, cfg, tokenizer, mesh)
    print(f"model: {model.config.num_params() / 1e6:.2f}M params; {total} steps of {cfg.batch_size} rows "
          f"({batches.plan.batches_per_epoch} per epoch, fill rate {batches.plan.fill_rate():.1%}); "
          f"mesh {dict(mesh.shape)}", flush=True)
    trainer = Trainer(task, model, optim, train_cfg, mesh, total)
    del model

    # Everything that changes the trajectory: a checkpoint of another config must not be resumed.
    run_config = {"task": task_name, "model": dataclasses.asdict(trainer.model_config),
                  "optim": dataclasses.asdict(optim), "data": dataclasses.asdict(batch_cfg), "total_steps": total,
                  "max_len": cfg.max_len, "overlength": cfg.overlength, "examples": len(examples),
                  "records_digest": _digest([r.fields for r in records]),
                  "compute_dtype": cfg.compute_dtype, "init": cfg.init_hf_dir or f"preset:{cfg.preset}",
                  **({"head_dropout": cfg.head_dropout} if task_cls.is_reward_model else {}),
                  **({"score_head": cfg.score_head} if task_cls.is_reward_model and cfg.score_head != "reference"
                     else {})}  # runs from before the paper's head resume as they were
    checkpointer = Checkpointer(os.path.join(out, "checkpoints"), run_config, every=cfg.checkpoint_every,
                                keep=cfg.keep_checkpoints)
    checkpointer.check_compatible()  # before anything is written: a mismatched rerun must not touch the run dir
    if jax.process_index() == 0:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    writer = MetricsWriter(os.path.join(out, "tb"), total)
    eval_fn = None
    if eval_records:
        eval_examples, _ = task.tokenize(eval_records)
        eval_cfg = BatchConfig(batch_size=cfg.batch_size // cfg.microbatches, seed=cfg.seed, shuffle=False,
                               length_buckets=batch_cfg.length_buckets)
        eval_fn = lambda: _one_epoch(BatchIterator(eval_examples, task, eval_cfg, process_index=jax.process_index(),
                                                   process_count=jax.process_count()))
    device = jax.devices()[0]
    spec = spec_peak_flops(device.device_kind, cfg.compute_dtype)
    peak = cfg.peak_flops or spec or measure_peak_flops(cfg.compute_dtype)
    # CPU "devices" share one host's cores, so the host's peak is the whole machine's.
    total_peak = peak if device.platform == "cpu" else peak * jax.device_count()
    source = "given" if cfg.peak_flops else f"{device.device_kind} spec" if spec else "measured matmul"
    print(f"{source} peak: {peak / 1e9:.1f} GFLOP/s per device ({cfg.compute_dtype}, {device.platform})", flush=True)
    try:
        result = fit(trainer, batches, checkpointer=checkpointer, writer=writer, eval_batches=eval_fn,
                     peak_flops=total_peak, release_initial=True)
    finally:
        checkpointer.close()
        writer.close()
    if not cfg.skip_export:
        hf_dir = os.path.join(out, "hf")
        save_hf(trainer.model(result.state), hf_dir, tokenizer=tokenizer)
        print(f"exported {'the ' + task_name.upper() if task.is_reward_model else 'the policy'} to {hf_dir}",
              flush=True)
    summary = {"train": result.last_metrics, "eval": result.eval_metrics, "resumed_from": result.resumed_from}
    if jax.process_index() == 0:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _one_epoch(iterator):
    for _ in range(iterator.plan.batches_per_epoch):
        yield next(iterator)
