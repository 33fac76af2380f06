"""The training loop: resume, step, log, evaluate, profile, checkpoint; shared by every stage."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

import jax

from rstar_jax.train.batching import BatchIterator, IteratorState
from rstar_jax.train.checkpoint import Checkpointer
from rstar_jax.train.metrics import MetricsWriter
from rstar_jax.train.trainer import Trainer, TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FitResult:
    state: TrainState
    resumed_from: int  # the step restored from a checkpoint (0: a fresh start)
    last_metrics: dict
    eval_metrics: dict | None


class _Profiler:
    """A jax.profiler trace of steps [start, start + count) on process 0."""

    def __init__(self, start: int, count: int, logdir: str | None):
        self.start, self.stop = start, start + count
        self.logdir = logdir if logdir and start >= 0 and count > 0 and jax.process_index() == 0 else None
        self.active = False

    def before(self, step: int) -> None:
        if self.logdir and step == self.start:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step + 1 >= self.stop:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            log.info("profiler trace of steps %d..%d written to %s", self.start, self.stop - 1, self.logdir)


def fit(trainer: Trainer, batches: BatchIterator, *, checkpointer: Checkpointer | None = None,
        writer: MetricsWriter | None = None, eval_batches: Callable[[], Iterable] | None = None,
        peak_flops: float | None = None, release_initial: bool = False) -> FitResult:
    """Trains to `trainer.total_steps`, resuming from the newest complete checkpoint if there is one.

    `release_initial` frees the trainer's copy of the initial parameters once the state exists (a
    whole model's worth of memory during a long run; the trainer cannot start over afterwards).
    """
    cfg, total = trainer.cfg, trainer.total_steps
    start = 0
    restored = checkpointer.restore_latest(trainer.abstract_state()) if checkpointer else None
    if restored is not None:
        start, state, data_state = restored
        batches.state = IteratorState(**data_state)
        if jax.process_index() == 0:
            print(f"resumed from step {start} (epoch {batches.state.epoch}, batch {batches.state.position})",
                  flush=True)
    else:
        state = trainer.init_state()
    if release_initial:
        trainer.drop_initial_params()
    writer = writer or MetricsWriter(None, total)
    profiler = _Profiler(cfg.profile_start, cfg.profile_steps, cfg.profile_dir)
    last: dict = {}
    window_start, window_tokens, window_flops, window_fill = time.perf_counter(), 0, 0.0, [0, 0]
    for step in range(start, total):
        local, info = next(batches)
        batch = trainer.place_batch(local)
        profiler.before(step)
        state, metrics = trainer.train_step(state, batch)
        profiler.after(step, state)
        window_tokens += info["real_tokens"]
        window_flops += info["real_tokens"] * trainer.task.flops_per_token(trainer.model_config, info["length"])
        window_fill[0] += info["real_tokens"]
        window_fill[1] += info["padded_tokens"]
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            fetched = {k: float(v) for k, v in jax.device_get(metrics).items()}
            last = {"loss": fetched.pop("loss"), **fetched}  # loss first, then task metrics, lr, grad_norm
            last["lr"], last["grad_norm"] = last.pop("lr"), last.pop("grad_norm")
            elapsed = time.perf_counter() - window_start
            last["tokens_per_s"] = window_tokens / elapsed
            last["fill_rate"] = window_fill[0] / max(window_fill[1], 1)
            if peak_flops:
                last["mfu"] = window_flops / elapsed / peak_flops
            last["epoch"] = float(info["epoch"])
            writer.write(done, last)
            writer.progress(done, last)
            window_start, window_tokens, window_flops, window_fill = time.perf_counter(), 0, 0.0, [0, 0]
        if checkpointer and (checkpointer.should_save(done) or done == total):
            checkpointer.save(done, state, batches.state.to_dict())
        if eval_batches and cfg.eval_every and done % cfg.eval_every == 0 and done != total:
            _evaluate(trainer, state, eval_batches, writer, done)
    if checkpointer:
        checkpointer.wait()
    eval_metrics = _evaluate(trainer, state, eval_batches, writer, total) if eval_batches else None
    return FitResult(state, start, last, eval_metrics)


def _evaluate(trainer, state, eval_batches, writer, step) -> dict:
    result = trainer.evaluate(state, eval_batches())
    writer.write(step, result, prefix="eval")
    if jax.process_index() == 0:
        print(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()), flush=True)
    return result
