"""The pluggable part of the trainer: how records become token rows, rows become a batch, a batch a loss.

One task per training stage: `SFTTask` (policy, response-only next-token loss), `PPMTask` (pairwise
Bradley-Terry with 1/(pos*neg) weights, score at the last real token: on the raw score as the reference
does, or on the bounded one as the paper does), `PQMTask` (MSE of the bounded score tanh(raw/scale)
against the Q value) and `ORMTask` (binary cross-entropy of sigmoid(raw) against the trajectory's
correctness; the bounded score is monotone in raw, so best-of-N ranks candidates the same way the ORM
was trained to). Sequences are right-padded; every batch array has a
leading row axis, and rows of a padded (partial) batch have all-zero masks and `valid` False.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.ppm import UNUSED_BY_SCORE, search_score
from rstar_jax.models.qwen2 import positions_from_mask
from rstar_jax.train import losses
from rstar_jax.train.records import Record, RecordError

OVERLENGTH_POLICIES = ("error", "truncate")


@dataclasses.dataclass(frozen=True)
class Example:
    """One training row: token sequences (1 for SFT/PQM/ORM, 2 for a pair) and scalar targets."""

    seqs: tuple[np.ndarray, ...]  # each [n_i] int32
    prompt_len: int  # tokens of the prompt at the start of seqs[0] (SFT: masked out of the loss)
    scalars: dict  # task targets, e.g. {"q": 0.5}
    where: str

    @property
    def length(self) -> int:
        return max(len(s) for s in self.seqs)


@dataclasses.dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # truncation left nothing to learn from (e.g. the prompt alone fills max_len)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _pad_rows(seqs: list[np.ndarray | None], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads sequences (None = an empty padding row) -> tokens [B, T] int32, mask [B, T] bool."""
    tokens = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        if s is not None:
            tokens[i, :len(s)], mask[i, :len(s)] = s, True
    return tokens, mask


def _attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    # Forward + backward of QK^T and PV over the full (not causally halved) context, as PaLM's MFU counts.
    return 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def _matmul_params(cfg: ModelConfig) -> int:
    return cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)


class Task:
    """Interface; subclasses fill it for one record kind and one model type."""

    kind: ClassVar[str]  # the record kind it reads (records.KINDS)
    is_reward_model: ClassVar[bool]
    frozen: ClassVar = nnx.Nothing  # parameters the loss never reads: kept as loaded, not trained

    def __init__(self, tokenizer, max_len: int, overlength: str = "error", pad_id: int | None = None):
        if overlength not in OVERLENGTH_POLICIES:
            raise ValueError(f"overlength={overlength!r}; expected one of {OVERLENGTH_POLICIES}")
        if max_len < 2:
            raise ValueError(f"max_len={max_len} must be >= 2")
        self.tokenizer, self.max_len, self.overlength = tokenizer, max_len, overlength
        self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_token_id or 0) if tokenizer else 0

    # ---- records -> examples (host side)
    def tokenize(self, records: list[Record]) -> tuple[list[Example], TokenizeStats]:
        stats, out = TokenizeStats(), []
        for rec in records:
            ex = self._tokenize(rec, stats)
            if ex is None:
                stats.dropped += 1
            else:
                out.append(ex)
        stats.examples = len(out)
        if not out:
            raise RecordError(f"empty dataset: all {len(records)} records were dropped by truncation to "
                              f"max_len={self.max_len}")
        return out, stats

    def _fit(self, ids: list[int], rec: Record, stats: TokenizeStats, keep: str) -> list[int] | None:
        """Applies the over-length policy; keep='head' (SFT) or 'tail' (scores are read at the end)."""
        if len(ids) <= self.max_len:
            return ids
        if self.overlength == "error":
            raise RecordError(f"{rec.where}: record {rec.fields['id']!r} is {len(ids)} tokens, over "
                              f"max_len={self.max_len} (raise --max_len, or pass --overlength=truncate; in "
                              "experiments.round, the --sft_ / --ppm_ versions)")
        stats.truncated += 1
        return ids[:self.max_len] if keep == "head" else ids[-self.max_len:]

    def _tokenize(self, rec: Record, stats: TokenizeStats) -> Example | None:
        raise NotImplementedError

    # ---- examples -> numpy batch (rows may be None: padding)
    def collate(self, rows: list[Example | None], length: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # ---- batch -> loss (inside jit; batch arrays have leading [B])
    def loss_sums(self, model, batch: dict, key: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """(loss sum, {metric: (numerator, denominator)}) over one microbatch. key: randomness of the
        training step (dropout); None when evaluating."""
        raise NotImplementedError

    def normalizer(self, batch: dict) -> jax.Array:
        """What the loss sum of the whole batch is divided by (any leading axes)."""
        raise NotImplementedError

    def flops_per_token(self, cfg: ModelConfig, seq_len: int) -> float:
        raise NotImplementedError


class SFTTask(Task):
    """Policy SFT: prompt + response + eos, next-token loss on the response (and eos) only."""

    kind, is_reward_model = "sft", False

    def __init__(self, tokenizer, max_len: int, overlength: str = "error", pad_id: int | None = None,
                 eos_id: int | None = None, loss_chunk: int = 0):
        """loss_chunk: positions per pass through the LM head, its logits recomputed in the backward pass
        (`losses.chunked_lm_sums`); 0: all at once."""
        super().__init__(tokenizer, max_len, overlength, pad_id)
        self.eos_id = eos_id if eos_id is not None else tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token; pass eos_id")
        if loss_chunk < 0:
            raise ValueError(f"loss_chunk={loss_chunk} must be >= 0")
        self.loss_chunk = loss_chunk

    def _tokenize(self, rec, stats):
        prompt = _encode(self.tokenizer, rec.fields["prompt"])
        ids = self._fit(prompt + _encode(self.tokenizer, rec.fields["response"]) + [self.eos_id], rec, stats, "head")
        if len(prompt) >= len(ids):  # no response token survived truncation
            return None
        return Example((np.asarray(ids, np.int32),), len(prompt), {}, rec.where)

    def collate(self, rows, length):
        tokens, mask = _pad_rows([r.seqs[0] if r else None for r in rows], length, self.pad_id)
        loss_mask = mask.copy()
        for i, r in enumerate(rows):
            if r is not None:
                loss_mask[i, :r.prompt_len] = False
        return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}  # [B, T] each

    def loss_sums(self, model, batch, key=None):
        hidden, _ = model(batch["tokens"], positions_from_mask(batch["mask"]), batch["mask"])  # [B, T, D]
        b, t, d = hidden.shape
        if 0 < self.loss_chunk < t:
            total, _ = losses.chunked_lm_sums(hidden, model.logits, batch["tokens"], batch["loss_mask"],
                                              self.loss_chunk)
            return total, {}
        # The LM head on [B*T, D]: XLA:CPU runs a 2-D dot and its gradient ~15% faster than the 3-D one.
        logits = model.logits(hidden.reshape(b * t, d)).reshape(b, t, -1)  # [B, T, V] fp32
        total, _ = losses.masked_lm_sums(logits, batch["tokens"], batch["loss_mask"])
        return total, {}

    def normalizer(self, batch):
        return jnp.sum(batch["loss_mask"][..., 1:].astype(jnp.float32))

    def flops_per_token(self, cfg, seq_len):
        return 6.0 * (_matmul_params(cfg) + cfg.vocab_size * cfg.hidden_size) + _attention_flops_per_token(cfg, seq_len)


class _ScoreTask(Task):
    """Reward models: a PPM-shaped model scores each sequence at its last real token."""

    is_reward_model = True
    frozen = UNUSED_BY_SCORE

    def __init__(self, *args, head_dropout: float = 0.0, **kwargs):
        """head_dropout: dropout rate on the value head's input in training (the reference: 0.1)."""
        super().__init__(*args, **kwargs)
        if not 0.0 <= head_dropout < 1.0:
            raise ValueError(f"head_dropout={head_dropout} must be in [0, 1)")
        self.head_dropout = head_dropout

    def _scores(self, model, tokens, mask, key):
        """Raw scores [B]; dropout on the head's input when training (a key is given)."""
        dropout = (self.head_dropout, key) if key is not None and self.head_dropout > 0 else None
        return model(tokens, mask, dropout)

    def flops_per_token(self, cfg, seq_len):
        return 6.0 * _matmul_params(cfg) + _attention_flops_per_token(cfg, seq_len)


class PPMTask(_ScoreTask):
    kind = "pair"

    def _tokenize(self, rec, stats):
        prompt = _encode(self.tokenizer, rec.fields["prompt"])
        before = stats.truncated
        pos = self._fit(prompt + _encode(self.tokenizer, rec.fields["pos"]), rec, stats, "tail")
        neg = self._fit(prompt + _encode(self.tokenizer, rec.fields["neg"]), rec, stats, "tail")
        stats.truncated = min(stats.truncated, before + 1)  # a pair counts once
        scalars = {k: rec.fields[k] for k in ("pos_count", "neg_count")}
        return Example((np.asarray(pos, np.int32), np.asarray(neg, np.int32)), len(prompt), scalars, rec.where)

    def collate(self, rows, length):
        pos_tokens, pos_mask = _pad_rows([r.seqs[0] if r else None for r in rows], length, self.pad_id)
        neg_tokens, neg_mask = _pad_rows([r.seqs[1] if r else None for r in rows], length, self.pad_id)
        count = lambda k: np.asarray([r.scalars[k] if r else 1 for r in rows], np.int32)  # [B]
        return {"pos_tokens": pos_tokens, "pos_mask": pos_mask, "neg_tokens": neg_tokens, "neg_mask": neg_mask,
                "pos_count": count("pos_count"), "neg_count": count("neg_count"),
                "valid": np.asarray([r is not None for r in rows])}

    def __init__(self, *args, bounded: bool = False, **kwargs):
        """bounded: the loss compares the scores the search reads, tanh(raw / model.score_scale) (the paper's
        head, scale 1), instead of the raw scores (the reference)."""
        super().__init__(*args, **kwargs)
        self.bounded = bounded

    def loss_sums(self, model, batch, key=None):
        b = batch["pos_tokens"].shape[0]
        # One forward over [2B, T]: positives then negatives.
        scores = self._scores(model, jnp.concatenate([batch["pos_tokens"], batch["neg_tokens"]]),
                              jnp.concatenate([batch["pos_mask"], batch["neg_mask"]]), key)  # [2B]
        if self.bounded:
            scores = search_score(scores, model.score_scale)
        r_pos, r_neg = scores[:b], scores[b:]
        total, _ = losses.pairwise_preference_sums(r_pos, r_neg, batch["pos_count"], batch["neg_count"],
                                                   batch["valid"])
        valid = batch["valid"].astype(jnp.float32)
        return total, {"accuracy": (jnp.sum(valid * (r_pos > r_neg)), jnp.sum(valid))}

    def normalizer(self, batch):
        return jnp.sum(jnp.where(batch["valid"], losses.pair_weights(batch["pos_count"], batch["neg_count"]), 0.0))


class _SingleScoreTask(_ScoreTask):
    target: ClassVar[str]

    def _tokenize(self, rec, stats):
        prompt = _encode(self.tokenizer, rec.fields["prompt"])
        ids = self._fit(prompt + _encode(self.tokenizer, rec.fields["response"]), rec, stats, "tail")
        return Example((np.asarray(ids, np.int32),), len(prompt), {self.target: rec.fields[self.target]}, rec.where)

    def collate(self, rows, length):
        tokens, mask = _pad_rows([r.seqs[0] if r else None for r in rows], length, self.pad_id)
        target = np.asarray([float(r.scalars[self.target]) if r else 0.0 for r in rows], np.float32)  # [B]
        return {"tokens": tokens, "mask": mask, self.target: target, "valid": np.asarray([r is not None for r in rows])}

    def normalizer(self, batch):
        return jnp.sum(batch["valid"].astype(jnp.float32))


class PQMTask(_SingleScoreTask):
    """Q-value regression: MSE of the bounded score tanh(raw/scale) (what the search reads) against q."""

    kind, target = "pqm", "q"

    def loss_sums(self, model, batch, key=None):
        pred = search_score(self._scores(model, batch["tokens"], batch["mask"], key), model.score_scale)  # [B]
        total, _ = losses.squared_error_sums(pred, batch["q"], batch["valid"])
        valid = batch["valid"].astype(jnp.float32)
        same_sign = (pred > 0) == (batch["q"] > 0)
        return total, {"sign_accuracy": (jnp.sum(valid * same_sign), jnp.sum(valid))}


class ORMTask(_SingleScoreTask):
    """Outcome reward: BCE of sigmoid(raw score) against the trajectory's final-answer correctness."""

    kind, target = "orm", "correct"

    def loss_sums(self, model, batch, key=None):
        logit = self._scores(model, batch["tokens"], batch["mask"], key)  # [B]
        total, _ = losses.binary_cross_entropy_sums(logit, batch["correct"], batch["valid"])
        valid = batch["valid"].astype(jnp.float32)
        hit = (logit > 0) == (batch["correct"] > 0.5)
        return total, {"accuracy": (jnp.sum(valid * hit), jnp.sum(valid))}


TASKS: dict[str, type[Task]] = {"sft": SFTTask, "ppm": PPMTask, "pqm": PQMTask, "orm": ORMTask}
