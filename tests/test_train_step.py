"""The jitted train step: exact masked loss, sharded == unsharded, accumulation and remat are exact,
and SFT on the tiny model memorises a response that greedy decoding then reproduces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rstar_jax.models import positions_from_mask
from tests.train_fixtures import CFG, CharTokenizer, make_trainer, pair_records, sft_records


def _params(state):
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in
            jax.tree_util.tree_flatten_with_path(state.params)[0]}


_BASELINE = {}


def _one_step(**kw):
    """(trainer, metrics, params) after one step; the unsharded default is computed once per session."""
    if not kw and "result" in _BASELINE:
        return _BASELINE["result"]
    trainer, it = make_trainer(steps=3, **kw)
    state = trainer.init_state()
    local, _ = next(it)
    state, metrics = trainer.train_step(state, trainer.place_batch(local))
    result = trainer, jax.device_get(metrics), _params(state)
    if not kw:
        _BASELINE["result"] = result
    return result


def test_loss_is_the_hand_computed_masked_mean_over_two_examples():
    # Two examples of different lengths in one right-padded batch: the loss must be the mean NLL over
    # both responses' tokens (and eos), from per-example unpadded forwards, with prompts excluded.
    records = sft_records(2)
    trainer, metrics, _ = _one_step(records=records, batch_size=2)
    model = trainer.model(trainer.init_state())
    tok = CharTokenizer()
    nll = []
    for r in records:
        prompt = tok.encode(r.fields["prompt"])
        ids = prompt + tok.encode(r.fields["response"]) + [tok.eos_token_id]
        x = jnp.asarray([ids])
        mask = jnp.ones_like(x, bool)
        hidden, _ = model(x, positions_from_mask(mask), mask)
        logp = np.asarray(jax.nn.log_softmax(model.logits(hidden)[0], axis=-1))  # [T, V]
        nll += [-logp[t - 1, ids[t]] for t in range(len(prompt), len(ids))]
    np.testing.assert_allclose(metrics["loss"], np.mean(nll), rtol=2e-5)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_step_equals_unsharded(mesh_shape):
    _, m1, p1 = _one_step()
    trainer, m8, p8 = _one_step(mesh_shape=mesh_shape)
    spec = trainer.param_shardings["layers"][0]["mlp"]["up_proj"].spec
    assert spec == jax.sharding.PartitionSpec("fsdp" if mesh_shape[1] > 1 else None, "tensor")
    # Adam's moments are sharded like their parameters.
    state = trainer.init_state()
    leaves = lambda tree: [(jax.tree_util.keystr(p), x.sharding.spec) for p, x in
                           jax.tree_util.tree_flatten_with_path(tree)[0]]
    specs = dict(leaves(state.params))
    moments = [(key.split(f".{m}", 1)[1], spec) for m in ("mu", "nu") for key, spec in leaves(state.opt_state)
               if f".{m}[" in key]
    assert len(moments) == 2 * len(specs) and all(spec == specs[path] for path, spec in moments)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for k in p1:
        np.testing.assert_allclose(p8[k], p1[k], atol=2e-6, err_msg=k)


def test_gradient_accumulation_remat_and_a_chunked_lm_loss_are_exact():
    _, m1, p1 = _one_step()
    _, m2, p2 = _one_step(microbatches=4, remat=True)
    _, m3, p3 = _one_step(task_kw={"loss_chunk": 5}, mesh_shape=(1, 2, 2))  # 16 or 32 positions: padded chunks
    for m, p in ((m2, p2), (m3, p3)):
        np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-5)
        for k in p1:
            np.testing.assert_allclose(p[k], p1[k], atol=2e-6, err_msg=k)


def test_bf16_compute_keeps_fp32_master_params():
    trainer, m, p = _one_step(compute_dtype="bfloat16")
    assert np.isfinite(m["loss"]) and all(v.dtype == np.float32 for v in p.values())


def test_value_head_dropout_is_a_function_of_seed_and_step():
    # The step's dropout key is fold_in(seed, step): two runs (or a resumed one) repeat it exactly.
    def params_after_two_steps(rate, seed=0, microbatches=1):
        trainer, it = make_trainer("ppm", records=pair_records(), steps=2, seed=seed, microbatches=microbatches,
                                   task_kw={"head_dropout": rate})
        state = trainer.init_state()
        for _ in range(2):
            state, _ = trainer.train_step(state, trainer.place_batch(next(it)[0]))
        return _params(state)["['v_head']['weight'].value"]

    with_dropout = params_after_two_steps(0.5)
    np.testing.assert_array_equal(params_after_two_steps(0.5), with_dropout)
    assert not np.allclose(params_after_two_steps(0.0), with_dropout, atol=1e-6)
    assert not np.allclose(params_after_two_steps(0.5, microbatches=2), with_dropout, atol=1e-6)


EMBED = "['backbone']['embed'].value"


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (1, 2, 2)])
def test_untied_ppm_leaves_its_inherited_lm_head_untrained_and_out_of_the_state(mesh_shape):
    # The value head replaces the LM head: an untied one is never read, so it gets no fp32 copy, gradient
    # or AdamW state (2.2 GB of each for Qwen2.5-Math-7B), and the export keeps it exactly as loaded.
    trainer, it = make_trainer("ppm", records=pair_records(), steps=2, cfg=CFG.replace(tie_embeddings=False),
                               mesh_shape=mesh_shape)  # AdamW's decay would shrink even a zero-gradient head
    state = trainer.init_state()
    loaded = _params(state)  # a host copy: the step donates `state`
    head = np.asarray(trainer.model(state).backbone.lm_head[...])
    for _ in range(2):
        state, metrics = trainer.train_step(state, trainer.place_batch(next(it)[0]))
    keys = lambda tree: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert not [k for k in keys(state.params) + keys(state.opt_state) if "lm_head" in k]
    assert any("embed" in k for k in keys(state.opt_state))
    np.testing.assert_array_equal(np.asarray(trainer.model(state).backbone.lm_head[...]), head)
    trained = _params(state)
    assert np.isfinite(metrics["loss"]) and not np.allclose(trained[EMBED], loaded[EMBED])


def _greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        x = jnp.asarray([ids])
        mask = jnp.ones_like(x, bool)
        hidden, _ = model(x, positions_from_mask(mask), mask)
        ids.append(int(jnp.argmax(model.logits(hidden)[0, -1])))
    return ids[len(prompt):]


def test_sft_memorises_a_response():
    trainer, it = make_trainer(steps=80, lr=3e-3)
    state = trainer.init_state()
    losses = []
    for _ in range(trainer.total_steps):
        local, _ = next(it)
        state, metrics = trainer.train_step(state, trainer.place_batch(local))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.05 < losses[0] / 10, losses[::10]
    tok = CharTokenizer()
    model = trainer.model(state)
    for r in sft_records()[:3]:
        want = tok.encode(r.fields["response"]) + [tok.eos_token_id]
        assert _greedy(model, tok.encode(r.fields["prompt"]), len(want)) == want
