"""AdamW with decoupled weight decay, a warmup + linear / cosine / constant schedule, and clipping."""
from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("linear", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """rStar's policy SFT: lr 7e-6, linear decay, weight decay 0.1 (reference), AdamW."""

    learning_rate: float = 7e-6
    schedule: str = "linear"
    warmup_steps: int = 0
    # The schedule ends at learning_rate * end_lr_fraction (0: linear/cosine decay to zero).
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # Global-norm clipping before the Adam moments (0 disables).
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be positive")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.end_lr_fraction <= 1.0:
            raise ValueError(f"end_lr_fraction={self.end_lr_fraction} must be in [0, 1]")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then the configured decay over the remaining steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_fraction
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_fraction)
    else:
        decay = optax.constant_schedule(peak)
    if cfg.warmup_steps == 0:
        return decay
    # Warmup reaches the peak at step `warmup_steps` (HF's convention: step 0 trains at lr 0 * ...).
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _decay_mask(params):
    # As HF Trainer does: no decay on biases (by name: ours are [heads, head_dim]) and norm scales (rank 1).
    # The value head's weight is a vector here but a Linear weight [1, D] in HF, so it decays like the reference's.
    def decays(path, p):
        names = [k.key for k in path if hasattr(k, "key")]  # dict keys (nnx adds a `.value` attribute)
        if str(names[-1]).endswith("bias"):
            return False
        return p.ndim >= 2 or names[-2:] == ["v_head", "weight"]
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), schedule
