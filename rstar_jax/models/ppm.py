"""The process preference model: the policy backbone plus a scalar value head on the last real token."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rstar_jax.models.config import ModelConfig
from rstar_jax.models.qwen2 import Qwen2, positions_from_mask

# The reference serves tanh(raw / 5): raw scores train unbounded, search sees [-1, 1]. The paper's head is
# tanh(raw) in [-1, 1], trained and served alike (scale 1). An export records its scale (config.json).
DEFAULT_SCORE_SCALE = 5.0
SCORE_SCALE_KEY = "rstar_score_scale"

# The value head replaces the policy's LM head, so an untied head the PPM inherits is never read. It is kept
# (an export stays a complete Qwen2ForCausalLM checkpoint) but not trained: no fp32 copy, gradient or AdamW state.
UNUSED_BY_SCORE = nnx.PathContains("lm_head")


class ValueHead(nnx.Module):
    """Linear(hidden -> 1) with bias, in fp32 (the reference's `v_head.summary`)."""

    def __init__(self, hidden_size: int, rngs: nnx.Rngs):
        # Reference init: weight ~ N(5e-7, 1e-6), bias 1e-6, so an untrained head scores ~0.
        w = 5e-7 + 1e-6 * jax.random.normal(rngs.params(), (hidden_size,), jnp.float32)
        self.weight = nnx.Param(w, logical_axes=("norm",))
        self.bias = nnx.Param(jnp.full((), 1e-6, jnp.float32), logical_axes=())

    def __call__(self, hidden: jax.Array, dropout: tuple[float, jax.Array] | None = None) -> jax.Array:
        """hidden: [..., D] -> [...] fp32. dropout: (rate, key) on the hidden state, in training only."""
        hidden = hidden.astype(jnp.float32)
        if dropout is not None and dropout[0] > 0:
            rate, key = dropout
            keep = jax.random.bernoulli(key, 1.0 - rate, hidden.shape)
            hidden = jnp.where(keep, hidden / (1.0 - rate), 0.0)
        return hidden @ self.weight[...] + self.bias[...]


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of each row's last non-pad token, for left or right padding. [B, T] -> [B]."""
    t = attention_mask.shape[-1]
    return t - 1 - jnp.argmax(attention_mask[:, ::-1], axis=-1)


class PPM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, backbone: Qwen2 | None = None,
                 score_scale: float = DEFAULT_SCORE_SCALE):
        self.backbone = backbone if backbone is not None else Qwen2(cfg, rngs=rngs)
        self.v_head = ValueHead(cfg.hidden_size, rngs)
        self.score_scale = float(score_scale)  # the search reads tanh(raw / score_scale)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array,
                 head_dropout: tuple[float, jax.Array] | None = None) -> jax.Array:
        """Raw score of each sequence at its last real token. tokens, attention_mask: [B, T] -> [B] fp32.

        head_dropout: (rate, key) of dropout on the value head's input (training; the reference's 0.1).
        """
        positions = positions_from_mask(attention_mask)
        hidden, _ = self.backbone(tokens, positions, attention_mask)  # [B, T, D]
        last = jnp.take_along_axis(hidden, last_token_index(attention_mask)[:, None, None], axis=1)[:, 0]
        return self.v_head(last, head_dropout)


def search_score(raw: jax.Array, scale: float = DEFAULT_SCORE_SCALE) -> jax.Array:
    """The bounded score MCTS uses: tanh(raw / scale) in [-1, 1]."""
    return jnp.tanh(raw / scale)
