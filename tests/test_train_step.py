"""The jitted train step: exact masked loss, sharded == unsharded, accumulation and remat are exact,
and SFT on the tiny model memorises a response that greedy decoding then reproduces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rstar_jax.models import positions_from_mask
from rstar_jax.train.optim import OptimConfig
from tests.train_fixtures import CFG, CharTokenizer, make_trainer, pair_records, sft_records


def _params(state):
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in
            jax.tree_util.tree_flatten_with_path(state.params)[0]}


def _gradient(state, grad_norm):
    """The first step's own gradient (after the scan over microbatches), read back from Adam's first moment:
    mu = (1 - b1) * g * min(1, max_grad_norm / |g|) after one step, whatever the learning rate."""
    optim = OptimConfig()
    unclip = max(float(grad_norm) / optim.max_grad_norm, 1.0)
    return {key.split(".mu", 1)[1]: np.asarray(jax.device_get(x)) / (1 - optim.b1) * unclip for key, x in
            ((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0])
            if ".mu[" in key}


_BASELINE = {}


def _two_steps(**kw):
    """(trainer, step-0 metrics, step-0 gradient, initial params, params after two steps).

    The schedule warms up from lr 0 at step 0 (the fixture's warmup_steps=2), so step 0 moves no parameter:
    its gradient is compared, and parameters only after step 1 (lr 1.5e-3). The unsharded default is
    computed once per session."""
    if not kw and "result" in _BASELINE:
        return _BASELINE["result"]
    trainer, it = make_trainer(steps=3, **kw)
    state = trainer.init_state()
    initial = _params(state)  # a host copy: the step donates `state`
    state, metrics = trainer.train_step(state, trainer.place_batch(next(it)[0]))
    metrics = jax.device_get(metrics)
    grads = _gradient(state, metrics["grad_norm"])
    state, _ = trainer.train_step(state, trainer.place_batch(next(it)[0]))
    result = trainer, metrics, grads, initial, _params(state)
    if not kw:
        _BASELINE["result"] = result
    return result


# Measured against the unsharded run (8 CPU devices): gradients (largest entry 1.3; `_gradient` is jax.grad's
# within 2.4e-7) agree within 4.2e-7 for every mesh, microbatching and loss chunking. Parameters after step 1
# (almost every one moved by ~1.5e-3) agree within 1.5e-8 where the step-0 gradient exceeds GRAD_ATOL (99% of
# them), but within only 3.6e-5 where it is ~1e-7: Adam's m / sqrt(v) turns rounding of a near-zero gradient into
# a step of up to +-lr, of either sign on another machine. So parameters are compared where the gradient stands
# clear of that (a bound on the update's difference there: lr * 2e-7 / 7e-6 = 4.5e-5), and every gradient is.
GRAD_ATOL, PARAM_ATOL = 1e-5, 1e-4


def _assert_same_training(run, baseline):
    """`run` computed the baseline's loss, gradient and update: its step is not just the same no-op."""
    _, m, g, _, p = run
    _, m1, g1, initial, p1 = baseline
    assert max(np.abs(v).max() for v in g1.values()) > 1e4 * GRAD_ATOL
    assert max(np.abs(p1[k] - initial[k]).max() for k in p1) > 10 * PARAM_ATOL
    np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert g.keys() == g1.keys()
    for k in g1:
        np.testing.assert_allclose(g[k], g1[k], rtol=0, atol=GRAD_ATOL, err_msg=k)
    clear = {k: np.abs(g1[k]) > GRAD_ATOL for k in p1}
    assert sum(int(c.sum()) for c in clear.values()) > 0.95 * sum(c.size for c in clear.values())
    for k in p1:
        np.testing.assert_allclose(p[k][clear[k]], p1[k][clear[k]], rtol=0, atol=PARAM_ATOL, err_msg=k)


def test_loss_is_the_hand_computed_masked_mean_over_two_examples():
    # Two examples of different lengths in one right-padded batch: the loss must be the mean NLL over
    # both responses' tokens (and eos), from per-example unpadded forwards, with prompts excluded.
    records = sft_records(2)
    trainer, metrics, *_ = _two_steps(records=records, batch_size=2)
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
    baseline = _two_steps()
    run = _two_steps(mesh_shape=mesh_shape)
    trainer = run[0]
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
    _assert_same_training(run, baseline)


def test_gradient_accumulation_remat_and_a_chunked_lm_loss_are_exact():
    baseline = _two_steps()
    _assert_same_training(_two_steps(microbatches=4, remat=True), baseline)
    # 16 or 32 positions: padded chunks.
    _assert_same_training(_two_steps(task_kw={"loss_chunk": 5}, mesh_shape=(1, 2, 2)), baseline)


def test_bf16_compute_keeps_fp32_master_params():
    _, m, _, _, p = _two_steps(compute_dtype="bfloat16")
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
