"""The decoder: KV-cache decode with a prompt prefix shared by n samples equals the plain full forward; its
profiler scopes."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rstar_jax.models import KVCache, Qwen2, positions_from_mask, preset
from rstar_jax.models.qwen2 import SharedPrefix


def test_shared_prefix_decode_equals_full_forward():
    cfg = preset("tiny").replace(vocab_size=64, num_layers=2)
    model = Qwen2(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    lengths, n, steps, width = [8, 5], 3, 4, 8
    prompts = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), bool)
    for i, length in enumerate(lengths):
        prompts[i, width - length:] = rng.integers(1, 64, length)
        mask[i, width - length:] = True
    continuations = rng.integers(1, 64, (2 * n, steps)).astype(np.int32)  # row b*n+j continues prompt b

    # Shared prefix: prefill each prompt once, then every row decodes its own tokens one at a time.
    _, prompt_cache = model(jnp.asarray(prompts), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask),
                            KVCache.zeros(cfg, 2, width))
    prefix = SharedPrefix(k=prompt_cache.k, v=prompt_cache.v, valid=prompt_cache.valid)
    cache = KVCache.zeros(cfg, 2 * n, steps).replace(prefix=prefix)
    got = []
    for t in range(steps):
        positions = np.repeat(np.array(lengths), n)[:, None] + t
        hidden, cache = model(jnp.asarray(continuations[:, t:t + 1]), jnp.asarray(positions, jnp.int32),
                              jnp.ones((2 * n, 1), bool), cache)
        got.append(model.logits(hidden)[:, 0])
    got = np.stack(got, axis=1)  # [B*n, steps, V]

    # Reference: each row's prompt + continuation through the plain forward, no cache.
    full = np.concatenate([np.repeat(prompts, n, axis=0), continuations], axis=1)
    full_mask = np.concatenate([np.repeat(mask, n, axis=0), np.ones_like(continuations, bool)], axis=1)
    hidden, _ = model(jnp.asarray(full), positions_from_mask(jnp.asarray(full_mask)), jnp.asarray(full_mask))
    want = np.asarray(model.logits(hidden))[:, width:]
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_query_chunked_attention_equals_whole():
    import jax

    from rstar_jax.models.attention import attend
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, 37, 4, 16))  # T=37: not a multiple of the chunk
    k = jax.random.normal(keys[1], (2, 2, 37, 16))
    v = jax.random.normal(keys[2], (2, 2, 37, 16))
    mask = jnp.tril(jnp.ones((37, 37), bool))[None] & jax.random.bernoulli(keys[3], 0.9, (2, 1, 37))
    whole = attend(q, k, v, mask, query_chunk=64)
    chunked = attend(q, k, v, mask, query_chunk=8)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_query_blocks_bound_the_logits_memory(monkeypatch):
    import jax

    from rstar_jax.models.attention import query_block
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert query_block(batch=2, heads=4, keys=512) == 512  # 8 MiB of fp32 logits
    assert query_block(batch=16, heads=4, keys=512) == 64  # a 16-prompt prefill: 8 MiB at 64 queries
    assert query_block(batch=64, heads=28, keys=4096) == 64  # never below 64: the loop would cost more
    for batch in (1, 2, 8, 32):
        block = query_block(batch=batch, heads=4, keys=1024)
        assert 64 <= block <= 512 and (block == 64 or batch * 4 * block * 1024 * 4 <= 8 << 20)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert query_block(batch=64, heads=28, keys=4096) == 512  # accelerators pool their memory


def test_profiler_scopes_name_each_block_of_a_layer():
    """Traces of a step show every layer's attention and MLP, and the LM head, by name."""
    model = Qwen2(preset("tiny").replace(num_layers=2), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((1, 8), jnp.int32)
    forward = jax.jit(lambda t: model.logits(model(t, jnp.arange(8)[None], jnp.ones((1, 8), bool))[0]))
    text = forward.lower(tokens).as_text(debug_info=True)
    for scope in ("layer_0/attention", "layer_0/mlp", "layer_1/attention", "layer_1/mlp", "lm_head"):
        assert scope in text, scope
