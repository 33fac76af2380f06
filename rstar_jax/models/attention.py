"""Rotary embeddings and grouped-query attention, behind one function with selectable kernels."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Split-half rotary embedding (HF `rotate_half`), computed in fp32.

    x: [B, T, N, Dh]; positions: [B, T] int.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [Dh/2]
    # Elementwise in fp32: a bf16 angle would round position 257 to 256.
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _xla_attention(q, k, v, mask, scale):
    b, t, h, dh = q.shape
    g, s = k.shape[1], k.shape[2]
    r = h // g  # query heads per KV head
    # Both products as canonical batched matmuls over [B, G]: XLA:CPU runs other dimension orders of the
    # same einsum several times slower (one-token decode: 15 ms vs 1.5 ms per layer on the decode benchmark).
    q = q.reshape(b, t, g, r, dh).transpose(0, 2, 3, 1, 4).reshape(b, g, r * t, dh)  # [B, G, R*T, Dh]
    logits = jnp.einsum("bgqd,bgsd->bgqs", q, k, preferred_element_type=jnp.float32) * scale
    # An additive bias, not a select: XLA:CPU fuses a select's mask computation into every logit (4x slower).
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]  # [B, 1, 1, T, S]
    logits = logits.reshape(b, g, r, t, s) + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, g, r * t, s)
    out = jnp.einsum("bgqs,bgsd->bgqd", probs, v)  # [B, G, R*T, Dh]
    return out.reshape(b, g, r, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def _chunked_xla_attention(q, k, v, mask, scale, chunk):
    """`_xla_attention` over blocks of `chunk` queries, so logits never exceed [B, G, R*chunk, S]."""
    b, t, h, dh = q.shape
    pad = -t % chunk
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    blocks = (q.reshape(b, -1, chunk, h, dh).swapaxes(0, 1), mask.reshape(b, -1, chunk, mask.shape[-1]).swapaxes(0, 1))
    out = jax.lax.map(lambda qm: _xla_attention(qm[0], k, v, qm[1], scale), blocks)  # [T/chunk, B, chunk, H, Dh]
    return out.swapaxes(0, 1).reshape(b, t + pad, h, dh)[:, :t]


def query_block(batch: int, heads: int, keys: int, budget_bytes: int = 8 << 20) -> int:
    """Queries per block of the "xla" path on CPU: the most (a power of two in [64, 512]) whose fp32
    logits [batch, heads, block, keys] fit `budget_bytes`. Larger blocks faulted in fresh pages on
    every call (XLA:CPU's temporaries come from the OS each time: a 16 x 512-token prefill of the
    miniature took 470 ms at 512 queries a block, 252 ms at 64); below 64, the loop's overhead wins.
    Accelerators reuse their memory pool, so they keep blocks of 512 (memory linear in T, few steps)."""
    if jax.default_backend() != "cpu":
        return 512
    block = 512
    while block > 64 and batch * heads * block * keys * 4 > budget_bytes:
        block //= 2
    return block


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "xla",
           query_chunk: int | None = None) -> jax.Array:
    """Grouped-query attention.

    q: [B, T, H, Dh]; k, v: [B, G, S, Dh] (heads-major, the KV-cache layout) with H a multiple of G;
    mask: [B, T, S] bool (True = may attend). Returns [B, T, H, Dh]. "xla" handles queries in blocks
    of `query_chunk` (default: `query_block`) once T exceeds it (memory linear in T, not T*S).
    "dot_product" goes through `jax.nn.dot_product_attention`'s default path (XLA in jax 0.10);
    "cudnn" through its cuDNN fused kernel (NVIDIA GPUs, bf16/fp16 only).
    """
    scale = q.shape[-1] ** -0.5
    if impl == "xla":
        query_chunk = query_chunk or query_block(q.shape[0], q.shape[2], k.shape[2])
        if q.shape[1] > query_chunk:
            return _chunked_xla_attention(q, k, v, mask, scale, query_chunk)
        return _xla_attention(q, k, v, mask, scale)
    if impl in ("dot_product", "cudnn"):
        if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 activations, got {q.dtype}; "
                             "use dtype='bfloat16' (or a bf16 compute dtype when training)")
        # A query that may attend nowhere (left padding) attends everywhere, as the "xla" path's finite
        # bias makes it do: a fully masked row could come out of a fused kernel as NaN and spread.
        mask = mask | ~mask.any(axis=-1, keepdims=True)
        return jax.nn.dot_product_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask[:, None], scale=scale,
                                            implementation="cudnn" if impl == "cudnn" else None)
    raise ValueError(f"unknown attention implementation {impl!r}")


def attend_with_shared_prefix(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, prefix_k: jax.Array,
                              prefix_v: jax.Array, prefix_valid: jax.Array) -> jax.Array:
    """Attention for n samples that continue one prompt: the prompt's keys are read once, not n times.

    q: [B*n, T, H, Dh], rows b*n .. b*n+n-1 continuing prompt b; k, v: [B*n, G, S, Dh]
    the rows' own slots with mask [R, T, S]; prefix_k, prefix_v: [B, G, P, Dh] the prompts' slots, all
    before any own slot, valid where prefix_valid [B, P]. One softmax over prefix and own slots together;
    r = H // G query heads share a KV head.
    """
    rows, t, h, dh = q.shape
    b, g, p = prefix_k.shape[:3]
    n, r, s = rows // b, h // g, k.shape[2]
    scale = dh ** -0.5
    neg = jnp.finfo(jnp.float32).min
    # Prefix logits with all n samples' queries of a prompt batched together: [B, G, n*r*T, P].
    q_pre = q.reshape(b, n, t, g, r, dh).transpose(0, 3, 1, 4, 2, 5).reshape(b, g, n * r * t, dh)
    l_pre = jnp.einsum("bgqd,bgpd->bgqp", q_pre, prefix_k, preferred_element_type=jnp.float32) * scale
    l_pre = l_pre + jnp.where(prefix_valid, 0.0, neg)[:, None, None]
    # Own-slot logits: [B*n, G, r*T, S].
    q_own = q.reshape(rows, t, g, r, dh).transpose(0, 2, 3, 1, 4).reshape(rows, g, r * t, dh)
    l_own = jnp.einsum("bgqd,bgsd->bgqs", q_own, k, preferred_element_type=jnp.float32) * scale
    l_own = (l_own.reshape(rows, g, r, t, s) + jnp.where(mask, 0.0, neg)[:, None, None]).reshape(rows, g, r * t, s)
    # Joint softmax: a common max per query, then both parts' exponentials share one denominator.
    m_pre = jnp.max(l_pre, axis=-1).reshape(b, g, n, r * t).transpose(0, 2, 1, 3).reshape(rows, g, r * t)
    m = jnp.maximum(m_pre, jnp.max(l_own, axis=-1))  # [B*n, G, r*T]
    m_by_prompt = m.reshape(b, n, g, r * t).transpose(0, 2, 1, 3).reshape(b, g, n * r * t)
    e_pre = jnp.exp(l_pre - m_by_prompt[..., None])
    e_own = jnp.exp(l_own - m[..., None])
    o_pre = jnp.einsum("bgqp,bgpd->bgqd", e_pre.astype(v.dtype), prefix_v, preferred_element_type=jnp.float32)
    o_own = jnp.einsum("bgqs,bgsd->bgqd", e_own.astype(v.dtype), v, preferred_element_type=jnp.float32)
    d_pre = jnp.sum(e_pre, axis=-1).reshape(b, g, n, r * t).transpose(0, 2, 1, 3).reshape(rows, g, r * t)
    o_pre = o_pre.reshape(b, g, n, r * t, dh).transpose(0, 2, 1, 3, 4).reshape(rows, g, r * t, dh)
    out = (o_pre + o_own) / (d_pre + jnp.sum(e_own, axis=-1))[..., None]  # [B*n, G, r*T, Dh]
    return out.reshape(rows, g, r, t, dh).transpose(0, 3, 1, 2, 4).reshape(rows, t, h, dh).astype(q.dtype)
