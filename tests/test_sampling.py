"""The batched step sampler: greedy parity with HF, stop handling, fan-out, bounded compilations."""
import numpy as np
import pytest
from flax import nnx

from rstar_jax.models import Qwen2, preset
from rstar_jax.sampling import CPU_CONCURRENT_CALLS, Sampler, SamplingConfig

# A random tiny model repeats one token greedily; seeded sampling gives varied but reproducible text.
SEEDED = SamplingConfig(max_new_tokens=24, temperature=1.0)


@pytest.fixture(scope="module")
def tiny_model():
    return Qwen2(preset("tiny").replace(vocab_size=64, num_layers=2), rngs=nnx.Rngs(0))


def _decode_fn(table):
    return lambda ids: "".join(table.get(i, "x") for i in ids)


def _prompts(seed, lengths, vocab=64):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


def test_greedy_equals_hf_generate(tmp_path):
    torch = pytest.importorskip("torch")
    from rstar_jax.models.hf_io import load_hf
    from tests.hf_fixtures import make_hf_qwen2
    hf_model = make_hf_qwen2(str(tmp_path), tied=False, rope_theta=1e6, heads=4, kv_heads=2)
    sampler = Sampler(load_hf(str(tmp_path)), _decode_fn({}), prompt_buckets=(16, 32))
    prompts = _prompts(0, [5, 11, 2, 20], vocab=160)
    samples = sampler.generate(prompts, n=2, config=SamplingConfig(max_new_tokens=16, temperature=0.0))
    for prompt, pair in zip(prompts, samples):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                    pad_token_id=0)[0, len(prompt):].tolist()
        assert pair[0].token_ids == ref and pair[1].token_ids == ref
        assert pair[0].finish_reason == "length"


def test_stop_string_split_across_tokens(tiny_model):
    prompt = _prompts(1, [9])
    plain = Sampler(tiny_model, _decode_fn({})).generate(prompt, config=SEEDED)[0][0].token_ids
    # Pick two consecutive generated tokens and make them spell the stop tag between them.
    i = next(i for i in range(3, len(plain) - 1) if plain[i] != plain[i + 1])
    a, b = plain[i], plain[i + 1]
    table = {a: "<end_of", b: "_step>"}
    expected_len = next(k for k in range(2, len(plain) + 1) if plain[k - 2:k] == [a, b])
    # Text-only stop: found on the host, the sample is cut right after the tag.
    text_only = Sampler(tiny_model, _decode_fn(table), stop_strings=["<end_of_step>"])
    s = text_only.generate(prompt, config=SEEDED)[0][0]
    assert s.finish_reason == "stop" and s.stop == "<end_of_step>"
    assert s.token_ids == plain[:expected_len] and s.text.endswith("<end_of_step>")
    assert len(s.logprobs) == expected_len
    # Token-sequence stop as well: the device loop ends the row there, same result.
    on_device = Sampler(tiny_model, _decode_fn(table), stop_strings=["<end_of_step>"], stop_sequences=[[a, b]])
    s2 = on_device.generate(prompt, config=SEEDED)[0][0]
    assert s2.token_ids == s.token_ids and s2.finish_reason == "stop"
    assert on_device.last_timing["steps"] == expected_len


def test_stop_token_and_eos_end_rows_early(tiny_model):
    prompt = _prompts(2, [7])
    plain = Sampler(tiny_model, _decode_fn({})).generate(prompt, config=SEEDED)[0][0].token_ids
    tag = plain[4]
    first = plain.index(tag)
    sampler = Sampler(tiny_model, _decode_fn({tag: "<end_of_code>"}), stop_strings=["<end_of_code>"],
                      stop_token_ids=[tag])
    s = sampler.generate(prompt, config=SEEDED)[0][0]
    assert s.token_ids == plain[:first + 1] and s.finish_reason == "stop"
    eos = Sampler(tiny_model, _decode_fn({}), eos_token_ids=[tag]).generate(prompt, config=SEEDED)[0][0]
    assert eos.token_ids == plain[:first + 1] and eos.finish_reason == "eos"


def test_fan_out_equals_separate_prefills(tiny_model):
    prompts = _prompts(3, [4, 13, 9])
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95)
    sampler = Sampler(tiny_model, _decode_fn({}), prompt_buckets=(16,))
    together = sampler.generate(prompts, n=3, config=cfg, seed=7)
    for i, p in enumerate(prompts):
        alone = sampler.generate([p], n=3, config=cfg, seed=7, prompt_ids=[i])[0]
        for a, b in zip(together[i], alone):
            assert a.token_ids == b.token_ids
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    # Different samples of one prompt, and different seeds, draw different continuations.
    assert len({tuple(s.token_ids) for s in together[1]}) > 1
    other = sampler.generate(prompts, n=3, config=cfg, seed=8)
    assert [s.token_ids for s in other[1]] != [s.token_ids for s in together[1]]


def test_cpu_decode_options_change_speed_not_samples(tiny_model, monkeypatch):
    import jax

    from rstar_jax.sampling import CPU_DECODE_COMPILER_OPTIONS, decode_compiler_options
    prompts = _prompts(2, [5, 11])
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0)
    ours = Sampler(tiny_model, _decode_fn({}), prompt_buckets=(16,)).generate(prompts, n=2, config=cfg, seed=3)
    xla = Sampler(tiny_model, _decode_fn({}), prompt_buckets=(16,), xla_defaults=True).generate(
        prompts, n=2, config=cfg, seed=3)
    assert [[s.token_ids for s in per] for per in ours] == [[s.token_ids for s in per] for per in xla]
    assert decode_compiler_options() == CPU_DECODE_COMPILER_OPTIONS and decode_compiler_options(True) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert decode_compiler_options() is None  # CPU options only


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_model):
    prompts = _prompts(4, [6, 3])
    sampler = Sampler(tiny_model, _decode_fn({}))
    greedy = sampler.generate(prompts, config=SamplingConfig(max_new_tokens=10, temperature=0.0))
    for cfg in (SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=1),
                SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=1e-6)):
        got = sampler.generate(prompts, config=cfg, seed=3)
        assert [s[0].token_ids for s in got] == [s[0].token_ids for s in greedy]


def test_invalid_vocab_rows_are_never_sampled(tiny_model):
    sampler = Sampler(tiny_model, _decode_fn({}), valid_vocab_size=10)
    out = sampler.generate(_prompts(5, [5, 8]), n=4, config=SamplingConfig(max_new_tokens=16), seed=1)
    assert all(t < 10 for per_prompt in out for s in per_prompt for t in s.token_ids)


def test_compilations_bounded_by_buckets(tiny_model):
    buckets = (16, 32, 64, 128)
    sampler = Sampler(tiny_model, _decode_fn({}), prompt_buckets=buckets)
    lengths = np.random.default_rng(6).integers(1, 129, 50)
    for i, n in enumerate(lengths):
        sampler.generate(_prompts(i, [int(n)]), n=2, config=SamplingConfig(max_new_tokens=4), seed=i)
    assert sampler._prefill._cache_size() <= len(buckets)
    assert sampler._decode._cache_size() <= len(buckets)


def test_prompt_longer_than_largest_bucket_is_refused(tiny_model):
    sampler = Sampler(tiny_model, _decode_fn({}), prompt_buckets=(8,))
    with pytest.raises(ValueError, match="prompt length of 9 exceeds the largest bucket 8"):
        sampler.generate(_prompts(0, [9]))


def test_sharded_sampler_matches_single_device(tiny_model):
    import jax

    from rstar_jax import parallel
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, state = nnx.split(tiny_model)
    sharded = nnx.merge(graphdef, jax.device_put(state, parallel.state_shardings(state, mesh)))
    prompts = _prompts(7, [5, 9, 3])
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    single = Sampler(tiny_model, _decode_fn({})).generate(prompts, n=2, config=cfg, seed=4)
    mesh_sampler = Sampler(sharded, _decode_fn({}), mesh=mesh, batch_multiple=4)
    assert mesh_sampler.concurrent_calls == 1  # one program over the mesh's devices, not threads
    on_mesh = mesh_sampler.generate(prompts, n=2, config=cfg, seed=4)
    assert [[s.token_ids for s in per] for per in on_mesh] == [[s.token_ids for s in per] for per in single]


def test_inverse_cdf_sampling_matches_softmax_frequencies():
    import jax
    import jax.numpy as jnp

    from rstar_jax.sampling import _sample_rows
    # 600 tokens (three blocks of 256, the last padded); mass on a few, some masked with -inf.
    logits = np.full((600,), -np.inf, np.float32)
    support = np.array([0, 5, 255, 256, 300, 511, 599])
    logits[support] = np.log([0.05, 0.3, 0.1, 0.15, 0.2, 0.1, 0.1])
    rows = 20000
    keys = jax.random.split(jax.random.key(0), rows)
    tokens = np.asarray(_sample_rows(keys, jnp.broadcast_to(jnp.asarray(logits), (rows, 600))))
    assert set(np.unique(tokens)) <= set(support.tolist())  # masked tokens are never drawn
    freq = np.array([(tokens == t).mean() for t in support])
    want = np.exp(logits[support])
    sigma = np.sqrt(want * (1 - want) / rows)
    assert np.all(np.abs(freq - want) < 4 * sigma), (freq, want)


def test_bad_sampling_input_is_refused(tiny_model):
    for bad, message in [(dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                         (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=message):
            SamplingConfig(**bad)
    sampler = Sampler(tiny_model, _decode_fn({}))
    with pytest.raises(ValueError, match="n must be >= 1"):
        sampler.generate(_prompts(0, [3]), n=0)
    with pytest.raises(ValueError, match=r"prompt 1 has token ids outside \[0, 64\)"):
        sampler.generate([[1, 2], [5, 64]])
    with pytest.raises(ValueError, match="prompt_ids"):
        sampler.generate(_prompts(0, [3]), prompt_ids=[2**33])


def test_doubling_decode_segments_match_one_segment(tiny_model):
    prompts = _prompts(8, [6, 11, 2])
    cfg = SamplingConfig(max_new_tokens=21, temperature=1.0)
    # One call's shapes (concurrent groups would compile the growth once per group shape).
    whole = Sampler(tiny_model, _decode_fn({}), first_segment=64, concurrent_calls=1).generate(
        prompts, n=2, config=cfg, seed=5)
    segmented = Sampler(tiny_model, _decode_fn({}), first_segment=4, concurrent_calls=1)  # 4 -> 8 -> 16 -> 21 slots
    segmented._grow.clear_cache()  # jit's cache is per function, shared with earlier tests' samplers
    got = segmented.generate(prompts, n=2, config=cfg, seed=5)
    assert [[s.token_ids for s in per] for per in got] == [[s.token_ids for s in per] for per in whole]
    assert all(len(s.token_ids) == 21 for per in got for s in per)
    assert segmented._grow._cache_size() == 3


def test_batch_padding_rows_never_hold_the_loop(tiny_model):
    # 3 prompts x 2 samples pad to 4 x 2 rows; when every real row stops, the loop must end there, not
    # run the filler rows to max_new_tokens (which made evaluation calls ~15x slower).
    prompts = _prompts(5, [6, 8, 5])
    cfg = SamplingConfig(max_new_tokens=64, temperature=1.0)
    plain = Sampler(tiny_model, _decode_fn({})).generate(prompts, n=2, config=cfg)
    stops = sorted({per[j].token_ids[3] for per in plain for j in range(2)})
    sampler = Sampler(tiny_model, _decode_fn({}), stop_token_ids=stops, concurrent_calls=1)
    samples = sampler.generate(prompts, n=2, config=cfg)
    lengths = [len(s.token_ids) for per in samples for s in per]
    assert all(s.finish_reason == "stop" for per in samples for s in per)
    assert sampler.last_timing["batch_rows"] == 8 and sampler.last_timing["steps"] == max(lengths) <= 4


def test_concurrent_groups_give_the_same_samples_in_prompt_order(tiny_model):
    # Prompts of mixed lengths in no order: split by length into groups decoded in parallel threads.
    prompts = _prompts(9, [12, 3, 40, 7, 25, 3, 18])
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0)
    one = Sampler(tiny_model, _decode_fn({}), prompt_buckets=(64,), concurrent_calls=1)
    two = Sampler(tiny_model, _decode_fn({}), prompt_buckets=(64,), concurrent_calls=2)
    assert two.concurrent_calls == 2 and Sampler(tiny_model, _decode_fn({})).concurrent_calls == CPU_CONCURRENT_CALLS
    got, want = (s.generate(prompts, n=3, config=cfg, seed=2, prompt_ids=range(10, 17)) for s in (two, one))
    assert [[s.token_ids for s in per] for per in got] == [[s.token_ids for s in per] for per in want]
    assert two.last_timing["groups"] == 2 and two.last_timing["batch_rows"] == (4 + 4) * 3
    with pytest.raises(ValueError, match="concurrent_calls"):
        Sampler(tiny_model, _decode_fn({}), concurrent_calls=0)
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        two.generate([[1], [2], []])


def test_prompts_extending_stored_contexts_prefill_only_their_new_tokens(tiny_model):
    """A store of the prompts' keys/values (MCTS: a leaf's context extends its parent's): the same samples as
    whole prefills, while each stored child holds only its own tokens' keys/values."""
    plain = Sampler(tiny_model, _decode_fn({}))
    stored = Sampler(tiny_model, _decode_fn({}), cache_mib=1)
    root, step_a, step_b, step_a1 = _prompts(11, [40, 7, 12, 5])
    a, b = root + step_a, root + step_b
    a1 = a + step_a1
    merged = a[:-1] + [(a[-1] % 63) + 1] + step_a1  # a merge across the boundary changed the parent's last token
    calls = [([root], ["r"], [None]),  # nothing stored: computed whole, then stored
             ([a, b, root], ["ra", "rb", "r"], ["r", "r", None]),  # children of r; r itself again (another seed)
             ([a1, [5], merged, b], ["ra1", "x", "ram", "rb"], ["ra", None, "ra", "r"])]
    for prompts, texts, parents in calls:
        want = plain.generate(prompts, n=3, config=SEEDED, seed=1)
        got = stored.generate(prompts, n=3, config=SEEDED, seed=1, texts=texts, parents=parents)
        for w, g in zip(want, got):
            assert [s.token_ids for s in g] == [s.token_ids for s in w]
            np.testing.assert_allclose([s.logprobs for s in g], [s.logprobs for s in w], atol=1e-5)
    store = stored.store
    assert (store.hits, store.misses) == (6, 2)  # misses: r at first, then x; ram found ra but did not extend it
    entries = store._entries
    assert set(entries) == {"r", "ra", "rb", "ra1", "x", "ram"}
    assert entries["ra1"].parent is entries["ra"] and entries["ra"].parent is entries["r"]
    assert [entries[t].kv.shape[3] for t in ("r", "ra", "rb", "ra1", "x", "ram")] == [40, 7, 12, 5, 1, len(merged)]
    # Without texts the store is not used; a store too small for anything gives the same samples too.
    assert stored.generate([a1], n=2, config=SEEDED, seed=1)[0][0].token_ids == want[0][0].token_ids
    assert store.hits == 6
    small = Sampler(tiny_model, _decode_fn({}), cache_mib=1e-4)
    got = small.generate([a1, b], n=3, config=SEEDED, seed=1, texts=["ra1", "rb"], parents=["ra", "r"])
    assert [s.token_ids for s in got[0]] == [s.token_ids for s in want[0]] and len(small.store) == 0
    with pytest.raises(ValueError, match="texts and parents must name each of the 2 prompts"):
        stored.generate([a, b], texts=["ra"])


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 2, 1.0), (1.0, 0, 0.65), (1.0, 0, 0.71),
                                                       (0.7, 5, 0.9), (1.3, 0, 0.5), (1.0, 17, 0.95)])
def test_top_k_and_top_p_keep_the_tokens_hf_keeps(temperature, top_k, top_p):
    """The filters' kept sets against HF's warpers (temperature, then top-k, then top-p), on a hand-made row
    ([.4, .3, .2, .1]: top-k 2 and top-p .65 keep 2 tokens, top-p .71 keeps 3) and on random rows."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from rstar_jax.sampling import _filter_logits
    rng = np.random.default_rng(0)
    hand = np.full((1, 64), -30.0, np.float32)
    hand[0, :4] = np.log([0.4, 0.3, 0.2, 0.1])
    logits = np.concatenate([hand, rng.normal(0, 3, (15, 64)).astype(np.float32)])  # [16, 64]
    ours = np.isfinite(np.asarray(_filter_logits(
        logits, SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p))))
    scores = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits))
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    np.testing.assert_array_equal(ours, np.isfinite(scores.numpy()))
    if temperature == 1.0 and (top_k, top_p) in ((2, 1.0), (0, 0.65), (0, 0.71)):
        assert ours[0].sum() == (3 if top_p == 0.71 else 2)
    assert ours.sum(axis=1).min() >= 1
