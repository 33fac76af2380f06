"""Offline parity of our Qwen2 / PPM against HF PyTorch, on tiny random checkpoints built here."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402

from rstar_jax.models import KVCache, positions_from_mask  # noqa: E402
from rstar_jax.models.attention import attend  # noqa: E402
from rstar_jax.models.hf_io import load_hf, save_hf  # noqa: E402
from tests.hf_fixtures import make_hf_qwen2  # noqa: E402

CONFIGS = [  # (tied, rope_theta, heads, kv_heads): heads = 2x and 4x kv heads
    (True, 1e4, 4, 2),
    (False, 1e6, 4, 1),
    (False, 1e4, 8, 2),
    (True, 1e6, 8, 2),
]


def _left_padded_batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [12, 7, 3]
    t = max(lengths)
    tokens = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        tokens[i, t - n:] = rng.integers(1, vocab, n)
        mask[i, t - n:] = True
    return tokens, mask


def _hf_logits(hf_model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        as_long = lambda x: torch.tensor(x, dtype=torch.long)
        out = hf_model(input_ids=as_long(tokens), attention_mask=as_long(mask), position_ids=as_long(positions))
    return out.logits.numpy()


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"tied={c[0]}-theta={c[1]:g}-h{c[2]}g{c[3]}")
def pair(request, tmp_path_factory):
    tied, theta, heads, kv = request.param
    hf_dir = str(tmp_path_factory.mktemp("hf"))
    hf_model = make_hf_qwen2(hf_dir, tied=tied, rope_theta=theta, heads=heads, kv_heads=kv)
    return hf_model, load_hf(hf_dir), hf_dir


def test_logits_match_hf_on_left_padded_batch(pair):
    hf_model, model, _ = pair
    tokens, mask = _left_padded_batch(model.config.vocab_size)
    hidden, _ = model(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    ours = np.asarray(model.logits(hidden))
    ref = _hf_logits(hf_model, tokens, mask)
    assert np.abs(ours - ref)[mask].max() <= 1e-4


def test_config_is_read_from_hf(pair):
    hf_model, model, _ = pair
    hf_cfg = hf_model.config
    cfg = model.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_embeddings) == (
        hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, hf_cfg.tie_word_embeddings)
    assert cfg.rope_theta == hf_cfg.rope_parameters["rope_theta"]


def test_cached_decode_equals_full_forward(pair):
    _, model, _ = pair
    tokens, mask = _left_padded_batch(model.config.vocab_size, seed=1)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    full, _ = model(tokens, positions_from_mask(mask), mask)
    full = model.logits(full)
    prefix = 5
    positions = positions_from_mask(mask)
    cache = KVCache.zeros(model.config, tokens.shape[0], 16)
    hidden, cache = model(tokens[:, :prefix], positions[:, :prefix], mask[:, :prefix], cache)
    steps = [model.logits(hidden)]
    for t in range(prefix, tokens.shape[1]):  # one token at a time
        hidden, cache = model(tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(model.logits(hidden))
    cached = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(np.asarray(cached)[np.asarray(mask)], np.asarray(full)[np.asarray(mask)], atol=1e-5)


def test_greedy_continuation_equals_hf_generate(pair):
    hf_model, model, _ = pair
    prompt = np.array([[3, 17, 42, 9, 77, 5]], np.int32)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=16, min_new_tokens=16,
                                do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].numpy()
    tokens = jnp.asarray(prompt)
    mask = jnp.ones_like(tokens, bool)
    cache = KVCache.zeros(model.config, 1, 32)
    hidden, cache = model(tokens, positions_from_mask(mask), mask, cache)
    out = []
    pos = prompt.shape[1]
    for _ in range(16):
        nxt = jnp.argmax(model.logits(hidden[:, -1]), -1).astype(jnp.int32)
        out.append(int(nxt[0]))
        hidden, cache = model(nxt[:, None], jnp.full((1, 1), pos, jnp.int32), jnp.ones((1, 1), bool), cache)
        pos += 1
    assert out == ref.tolist()


def test_export_reloads_in_hf_with_same_logits(pair, tmp_path):
    _, model, _ = pair
    save_hf(model, str(tmp_path))
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens, mask = _left_padded_batch(model.config.vocab_size, seed=2)
    hidden, _ = model(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    ours = np.asarray(model.logits(hidden))
    assert np.abs(ours - _hf_logits(reloaded, tokens, mask))[mask].max() <= 1e-4


def test_dot_product_attention_matches_xla(pair):
    _, _, hf_dir = pair
    xla = load_hf(hf_dir)
    dpa = load_hf(hf_dir, attention_impl="dot_product")
    tokens, mask = _left_padded_batch(xla.config.vocab_size, seed=3)
    args = (jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    a, b = xla.logits(xla(*args)[0]), dpa.logits(dpa(*args)[0])
    np.testing.assert_allclose(np.asarray(a)[mask], np.asarray(b)[mask], atol=1e-5)


def test_cudnn_attention_refuses_fp32():
    q = jnp.zeros((1, 4, 2, 8), jnp.float32)
    kv = jnp.zeros((1, 1, 4, 8), jnp.float32)
    with pytest.raises(ValueError, match="cudnn.*bfloat16"):
        attend(q, kv, kv, jnp.ones((1, 4, 4), bool), impl="cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention needs an NVIDIA GPU (device check)")
def test_cudnn_attention_matches_xla_in_bf16(pair):
    _, _, hf_dir = pair
    xla = load_hf(hf_dir, dtype="bfloat16")
    fused = load_hf(hf_dir, dtype="bfloat16", attention_impl="cudnn")
    tokens, mask = _left_padded_batch(xla.config.vocab_size, seed=4)
    args = (jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))
    a = np.asarray(xla.logits(xla(*args)[0]), np.float32)[mask]
    b = np.asarray(fused.logits(fused(*args)[0]), np.float32)[mask]
    assert np.isfinite(b).all()
    # bf16 activations: the two kernels round differently; compare at bf16 resolution of the logits' scale.
    np.testing.assert_allclose(b, a, atol=0.02 * np.abs(a).max())
