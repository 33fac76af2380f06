"""The Qwen2 decoder in Flax NNX, with a KV cache for prefill and incremental decode.

Parameters carry `logical_axes` metadata that `rstar_jax.parallel` maps to mesh shardings. Weight
layouts follow JAX convention ([in, out], heads split out) so HF import is a transpose + reshape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rstar_jax import parallel
from rstar_jax.models.attention import attend, attend_with_shared_prefix, rope
from rstar_jax.models.config import ModelConfig

_init = jax.nn.initializers.normal(stddev=0.02)


def _param(rngs: nnx.Rngs, shape, axes, dtype, init=_init) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def _project(x: jax.Array, w: jax.Array) -> jax.Array:
    """Tokens [N, D] times a weight [D, *out] -> [N, *out], as one 2-D matmul.

    The model's projections run on tokens flattened to [B*T, D]: for 3-D einsums XLA:CPU inserts
    layout-copy transposes in the backward pass (15% of an SFT step on the train benchmark).
    """
    return (x @ w.reshape(w.shape[0], -1)).reshape(x.shape[0], *w.shape[1:])


@struct.dataclass
class SharedPrefix:
    """The prompts' keys/values, shared by the n samples of each prompt instead of copied n times."""

    k: tuple[jax.Array, ...]  # L x [B, G, P, Dh]
    v: tuple[jax.Array, ...]  # L x [B, G, P, Dh]
    valid: jax.Array  # [B, P] bool


@struct.dataclass
class KVCache:
    """Per-layer keys/values for a left-padded batch; every row writes the same slot `index`."""

    # Heads-major, the layout attention reads without a transpose per decode step.
    k: tuple[jax.Array, ...]  # L x [B, G, S, Dh]
    v: tuple[jax.Array, ...]  # L x [B, G, S, Dh]
    valid: jax.Array  # [B, S] bool: the slot holds a real (non-pad) token
    index: jax.Array  # [] int32: the next slot to write
    # When set, row i also attends to prefix row i // n (n = rows per prompt), before its own slots.
    prefix: SharedPrefix | None = None

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> KVCache:
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.num_layers))
        return cls(k=zeros(), v=zeros(), valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.valid.shape[1]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)  # HF order: cast, then scale


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, g, dh, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_dtype
        zeros = jax.nn.initializers.zeros
        self.q_proj = _param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), dt)
        self.k_proj = _param(rngs, (d, g, dh), ("embed", "kv_heads", "head_dim"), dt)
        self.v_proj = _param(rngs, (d, g, dh), ("embed", "kv_heads", "head_dim"), dt)
        self.q_bias = _param(rngs, (h, dh), ("q_heads", "head_dim"), dt, zeros)
        self.k_bias = _param(rngs, (g, dh), ("kv_heads", "head_dim"), dt, zeros)
        self.v_bias = _param(rngs, (g, dh), ("kv_heads", "head_dim"), dt, zeros)
        self.o_proj = _param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), dt)
        self.rope_theta = cfg.rope_theta
        self.impl = cfg.attention_impl

    def __call__(self, x, positions, mask, cache_kv=None, index=None, prefix=None):
        """x: [B, T, D]; positions: [B, T]; mask: [B, T, S]; cache_kv: ([B, G, S, Dh], [B, G, S, Dh]);
        prefix: (k, v, valid) of a SharedPrefix layer."""
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)  # [B*T, D]
        q = (_project(tokens, self.q_proj[...]) + self.q_bias[...]).reshape(b, t, *self.q_bias.shape)  # [B, T, H, Dh]
        k = (_project(tokens, self.k_proj[...]) + self.k_bias[...]).reshape(b, t, *self.k_bias.shape)  # [B, T, G, Dh]
        v = (_project(tokens, self.v_proj[...]) + self.v_bias[...]).reshape(b, t, *self.v_bias.shape)  # [B, T, G, Dh]
        q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, G, T, Dh]
        if cache_kv is not None:
            k = jax.lax.dynamic_update_slice(cache_kv[0], k, (0, 0, index, 0))
            v = jax.lax.dynamic_update_slice(cache_kv[1], v, (0, 0, index, 0))
            k = parallel.constrain(k, ("cache_batch", "kv_heads", "cache_seq", "head_dim"))
            v = parallel.constrain(v, ("cache_batch", "kv_heads", "cache_seq", "head_dim"))
        if prefix is None:
            out = attend(q, k, v, mask, self.impl)  # [B, T, H, Dh]
        else:
            out = attend_with_shared_prefix(q, k, v, mask, *prefix)
        out = out.reshape(b * t, -1) @ self.o_proj[...].reshape(-1, d)  # [B*T, H*Dh] @ [H*Dh, D]
        return out.reshape(b, t, d), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, dt = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), dt)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), dt)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), dt)

    def __call__(self, x):
        """x: [B, T, D] -> [B, T, D], as 2-D matmuls over the B*T tokens (see `_project`)."""
        b, t, d = x.shape
        x = x.reshape(b * t, d)
        h = jax.nn.silu(x @ self.gate_proj[...]) * (x @ self.up_proj[...])  # [B*T, F]
        # Constrained in its [B, T, F] view, so the token rows shard exactly as x's batch does.
        h = parallel.constrain(h.reshape(b, t, -1), ("batch", "seq", "mlp")).reshape(b * t, -1)
        return (h @ self.down_proj[...]).reshape(b, t, d)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, mask, cache_kv=None, index=None, prefix=None):
        with jax.named_scope("attention"):  # profiler traces name each block of a layer
            attn_out, kv = self.self_attn(self.input_layernorm(x), positions, mask, cache_kv, index, prefix)
            x = x + attn_out
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x))
        return parallel.constrain(x, ("batch", "seq", "act_embed")), kv


class Qwen2(nnx.Module):
    """Embeddings -> decoder layers -> final RMSNorm; `logits` applies the (tied or untied) LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.jnp_dtype)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.jnp_dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Returns the final-norm hidden states [B, T, D] and the updated cache.

        tokens, positions: [B, T] int32; attention_mask: [B, T] bool (False = padding). Without a cache
        the T tokens attend causally among themselves; with one they are written at slots
        `cache.index ... + T` and attend to every valid earlier slot.
        """
        if cache is None:
            causal = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))
            mask = causal[None] & attention_mask[:, None, :]  # [B, T, T]
            index, valid = None, None
        else:
            index = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))  # [B, S]
            slots = jnp.arange(cache.length)
            query_slots = index + jnp.arange(tokens.shape[1])
            mask = (slots[None, :] <= query_slots[:, None])[None] & valid[:, None, :]  # [B, T, S]
        # Gather the FSDP-sharded embedding dim first, so the lookup needs no full rematerialisation.
        table = parallel.constrain(self.embed[...], ("vocab", "act_embed"))
        x = jnp.take(table, tokens, axis=0)
        x = parallel.constrain(x, ("batch", "seq", "act_embed"))
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                kv_in = None if cache is None else (cache.k[i], cache.v[i])
                prefix = None
                if cache is not None and cache.prefix is not None:
                    prefix = (cache.prefix.k[i], cache.prefix.v[i], cache.prefix.valid)
                x, (k, v) = layer(x, positions, mask, kv_in, index, prefix)
            new_k.append(k)
            new_v.append(v)
        hidden = self.final_norm(x)
        if cache is None:
            return hidden, None
        return hidden, KVCache(k=tuple(new_k), v=tuple(new_v), valid=valid, index=index + tokens.shape[1],
                               prefix=cache.prefix)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [..., D] -> fp32 logits [..., V]."""
        with jax.named_scope("lm_head"):
            if self.config.tie_embeddings:
                out = jnp.einsum("...d,vd->...v", hidden, self.embed[...], preferred_element_type=jnp.float32)
            else:
                out = jnp.einsum("...d,dv->...v", hidden, self.lm_head[...], preferred_element_type=jnp.float32)
        return out


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions of a left-padded batch: 0 at each row's first real token. [B, T] bool -> [B, T] int32."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def resize_embeddings(model: Qwen2, new_vocab_size: int, rngs: nnx.Rngs) -> Qwen2:
    """Grows the vocabulary (e.g. for the rStar step tags); existing rows are untouched.

    New rows start at the mean of the existing ones plus small noise (HF's mean-resizing idea), so the
    new tokens begin with ordinary-looking logits instead of dominating or vanishing.
    """
    cfg = model.config
    extra = new_vocab_size - cfg.vocab_size
    if extra < 0:
        raise ValueError(f"cannot shrink the vocabulary from {cfg.vocab_size} to {new_vocab_size}")
    if extra == 0:
        return model

    def grow(table, axis):
        mean = jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True)
        shape = list(table.shape)
        shape[axis] = extra
        noise = 1e-3 * jax.random.normal(rngs.params(), shape, jnp.float32)
        return jnp.concatenate([table, (mean + noise).astype(table.dtype)], axis=axis)

    model.embed = nnx.Param(grow(model.embed[...], 0), logical_axes=("vocab", "embed"))
    if not cfg.tie_embeddings and hasattr(model, "lm_head"):  # a scoring PPM's backbone has none
        model.lm_head = nnx.Param(grow(model.lm_head[...], 1), logical_axes=("embed", "vocab"))
    model.config = cfg.replace(vocab_size=new_vocab_size)
    return model
