"""Length-bucketed, seeded, host-sharded, exactly resumable batches of tokenized examples.

Each epoch is a seeded permutation of the examples, cut into windows of `bucket_window` batches; each
window is sorted by length and cut into batches, so a batch holds similar lengths and is padded only
to the smallest length bucket that fits its longest row (few distinct shapes, so few compilations).
The batch order of the epoch is then shuffled. The plan is a pure function of (seed, epoch), so the
iterator's whole state is (epoch, position): saved with a checkpoint, it resumes at the exact example.
No packing: rows never share an attention window, so no example can attend across a boundary.

Every host computes the same plan (only indices and lengths) and collates just its own rows of each
microbatch: its contiguous block of `rows / process_count` rows.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rstar_jax.train.tasks import Example, Task


def default_buckets(max_len: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` below max_len, then max_len itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    batch_size: int  # global rows per optimizer step
    microbatches: int = 1  # gradient accumulation: batch_size rows in this many sequential pieces
    seed: int = 0
    shuffle: bool = True
    bucket_window: int = 32  # batches' worth of examples sorted by length together
    length_buckets: tuple[int, ...] | None = None  # padded lengths; default: default_buckets(max_len)
    drop_remainder: bool = False  # else the epoch's last batch is filled with padding rows

    def __post_init__(self):
        if self.batch_size < 1 or self.microbatches < 1 or self.batch_size % self.microbatches:
            raise ValueError(f"batch_size={self.batch_size} must be a positive multiple of "
                             f"microbatches={self.microbatches}")


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    rows: np.ndarray  # [batch_size] example indices, -1 = padding row
    length: int  # padded sequence length


class BatchPlan:
    """The deterministic schedule of batches for any epoch."""

    def __init__(self, lengths: Sequence[int], cfg: BatchConfig, max_len: int, seqs_per_example: int = 1,
                 tokens: Sequence[int] | None = None):
        self.lengths = np.asarray(lengths, np.int64)  # [N] longest sequence of each example
        self.tokens = self.lengths if tokens is None else np.asarray(tokens, np.int64)  # [N] all its tokens
        self.seqs_per_example = seqs_per_example  # a pair is 2 sequences, each padded to the batch length
        self.cfg = cfg
        self.buckets = tuple(sorted(cfg.length_buckets or default_buckets(max_len)))
        if self.lengths.size == 0:
            raise ValueError("empty dataset: no examples to batch")
        if self.lengths.max() > self.buckets[-1]:
            raise ValueError(f"an example of {self.lengths.max()} tokens exceeds the largest length bucket "
                             f"{self.buckets[-1]}")
        if cfg.drop_remainder and len(self.lengths) < cfg.batch_size:
            raise ValueError(f"{len(self.lengths)} examples cannot fill one batch of {cfg.batch_size} "
                             "with drop_remainder=True")
        self._cache: dict[int, list[PlannedBatch]] = {}

    @property
    def batches_per_epoch(self) -> int:
        n, b = len(self.lengths), self.cfg.batch_size
        return n // b if self.cfg.drop_remainder else -(-n // b)

    def _bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def epoch(self, epoch: int) -> list[PlannedBatch]:
        if epoch not in self._cache:
            self._cache = {epoch: self._plan(epoch)}  # only the current epoch is kept
        return self._cache[epoch]

    def _plan(self, epoch: int) -> list[PlannedBatch]:
        cfg, n = self.cfg, len(self.lengths)
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(n) if cfg.shuffle else np.arange(n)
        window = cfg.batch_size * cfg.bucket_window
        batches = []
        for start in range(0, n, window):
            chunk = order[start:start + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            for b in range(0, len(chunk), cfg.batch_size):
                rows = chunk[b:b + cfg.batch_size]
                batches.append(rows)
        # Only the last window can leave a short batch; keep it last, so a resumed epoch sees the same.
        full = [r for r in batches if len(r) == cfg.batch_size]
        short = [r for r in batches if len(r) < cfg.batch_size]
        if cfg.shuffle:
            full = [full[i] for i in rng.permutation(len(full))]
        if short and not cfg.drop_remainder:
            rows = short[0]
            full.append(np.concatenate([rows, -np.ones(cfg.batch_size - len(rows), np.int64)]))
        return [PlannedBatch(rows, self._bucket(int(self.lengths[rows[rows >= 0]].max()))) for rows in full]

    def fill_rate(self, epoch: int = 0) -> float:
        """Real tokens / padded tokens over the epoch (what length bucketing achieves)."""
        real = padded = 0
        for pb in self.epoch(epoch):
            real, padded = real + self.real_tokens(pb), padded + self.padded_tokens(pb)
        return real / max(padded, 1)

    def real_tokens(self, pb: PlannedBatch) -> int:
        return int(self.tokens[pb.rows[pb.rows >= 0]].sum())

    def padded_tokens(self, pb: PlannedBatch) -> int:
        return len(pb.rows) * pb.length * self.seqs_per_example


@dataclasses.dataclass
class IteratorState:
    """Where the stream is: the next batch is batch `position` of epoch `epoch` of the plan for `seed`."""

    seed: int
    epoch: int = 0
    position: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class BatchIterator:
    """Host-local numpy batches shaped [microbatches, rows_per_host_microbatch, ...], in plan order."""

    def __init__(self, examples: Sequence[Example], task: Task, cfg: BatchConfig,
                 state: IteratorState | None = None, process_index: int = 0, process_count: int = 1):
        self.examples, self.task, self.cfg = examples, task, cfg
        if not examples:
            raise ValueError("empty dataset: no examples to batch")
        self.plan = BatchPlan([e.length for e in examples], cfg, task.max_len, len(examples[0].seqs),
                              [sum(len(s) for s in e.seqs) for e in examples])
        micro = cfg.batch_size // cfg.microbatches
        if micro % process_count:
            raise ValueError(f"microbatch rows {micro} (batch_size / microbatches) must divide over "
                             f"{process_count} processes")
        self.process_index, self.process_count = process_index, process_count
        self.state = state or IteratorState(seed=cfg.seed)
        if self.state.seed != cfg.seed:
            raise ValueError(f"iterator state has seed {self.state.seed} but the data config says {cfg.seed}")
        if self.state.position > self.plan.batches_per_epoch:
            raise ValueError(f"iterator position {self.state.position} is past the epoch's "
                             f"{self.plan.batches_per_epoch} batches: the dataset changed since the checkpoint")

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict[str, np.ndarray], dict]:
        """(batch arrays [A, rows, ...], info: real and padded tokens of the global batch, epoch)."""
        if self.state.position >= self.plan.batches_per_epoch:
            self.state = IteratorState(self.state.seed, self.state.epoch + 1, 0)
        pb = self.plan.epoch(self.state.epoch)[self.state.position]
        self.state = IteratorState(self.state.seed, self.state.epoch, self.state.position + 1)
        a = self.cfg.microbatches
        micro = pb.rows.reshape(a, -1)  # [A, B/A]
        per_host = micro.shape[1] // self.process_count
        mine = micro[:, self.process_index * per_host:(self.process_index + 1) * per_host]
        pieces = [self.task.collate([self.examples[i] if i >= 0 else None for i in row], pb.length) for row in mine]
        batch = {k: np.stack([p[k] for p in pieces]) for k in pieces[0]}
        return batch, {"real_tokens": self.plan.real_tokens(pb), "padded_tokens": self.plan.padded_tokens(pb),
                       "length": pb.length, "epoch": self.state.epoch}
