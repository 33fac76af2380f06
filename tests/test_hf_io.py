"""HF directory import/export: exact round trips, sharded and bf16 files, PPM heads, loading onto a
mesh, and bad input that must fail loudly (naming the key and both shapes) instead of loading partly.

Checkpoints are written by our own exporter from a random tiny model (no torch needed); the tests
against `transformers` skip without torch.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from rstar_jax import parallel
from rstar_jax.errors import InputError
from rstar_jax.models import PPM, ModelConfig, Qwen2, positions_from_mask
from rstar_jax.models import hf_io
from rstar_jax.models.hf_io import CheckpointError, load_hf, save_hf

CFG = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=48, rope_theta=1e4, tie_embeddings=False, max_position_embeddings=128)
TOKENS = np.array([[0, 0, 5, 17, 42, 9], [3, 8, 1, 77, 60, 2]], np.int32)
MASK = TOKENS != 0


def _random(build, seed):
    """Random values everywhere (biases and norms included) so a mis-mapped tensor cannot hide.

    Filled from numpy into the abstract model: much faster than eager per-parameter JAX init.
    """
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)
    pure = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _policy(cfg=CFG, seed=0):
    return _random(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)), seed)


def _ppm(cfg=CFG, seed=1):
    return _random(lambda: PPM(cfg, rngs=nnx.Rngs(0)), seed)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_same_params(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(_params(a))[0]
    flat_b = jax.tree_util.tree_flatten_with_path(_params(b))[0]
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=str(path))


def _logits(model):
    mask = jnp.asarray(MASK)
    hidden, _ = model(jnp.asarray(TOKENS), positions_from_mask(mask), mask)
    return np.asarray(model.logits(hidden))


def _scores(ppm):
    return np.asarray(ppm(jnp.asarray(TOKENS), jnp.asarray(MASK)))


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    model = _policy()
    out = str(tmp_path_factory.mktemp("policy"))
    save_hf(model, out)
    return model, out


@pytest.fixture(scope="module")
def ppm(tmp_path_factory):
    model = _ppm()
    out = str(tmp_path_factory.mktemp("ppm"))
    save_hf(model, out)
    return model, out


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    """A copy of the checkpoint `src` in `dst` with its tensors and/or config changed."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    if edit_tensors is not None:
        tensors = safetensors.numpy.load_file(path)
        edit_tensors(tensors)
        safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    if edit_config is not None:
        with open(os.path.join(dst, "config.json")) as f:
            config = json.load(f)
        edit_config(config)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(config, f)
    return str(dst)


# --- good input ---------------------------------------------------------------------------------

def test_round_trip_is_exact(policy):
    model, hf_dir = policy
    loaded = load_hf(hf_dir)
    assert loaded.config == CFG
    _assert_same_params(model, loaded)


@pytest.mark.parametrize("layout,shape", [
    (hf_io._TRANSPOSE, (6, 10)),
    (((1, 2), (0,)), (6, 4, 3)),  # q/k/v projections
    (((2,), (0, 1)), (4, 3, 6)),  # o projection
    (((0, 1),), (4, 3)),  # q/k/v biases
    (((), (0,)), (6,)),  # value head weight
    (((),), ()),  # value head bias
])
def test_block_reads_cover_exactly_the_requested_slice(tmp_path, layout, shape):
    ours = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"t": hf_io.to_hf(ours, layout)}, str(path))
    reader = hf_io.SafetensorsReader(str(tmp_path))
    requests = []
    real = reader._slices["t"]

    class Recording:
        def __getitem__(self, index):
            out = real[index]
            requests.append(out.size)
            return out

    reader._slices["t"] = Recording()
    rng = np.random.default_rng(1)
    for _ in range(10):
        bounds = [sorted(rng.choice(n + 1, 2, replace=False)) for n in shape]
        index = tuple(slice(int(a), int(b)) for a, b in bounds)
        block = reader.read_block("t", layout, shape, index)
        np.testing.assert_array_equal(block, ours[index])
        # Only the outer axis of a split group widens the read; the rest is read exactly.
        widened = int(np.prod([
            (b - a) if i not in {g for group in layout for g in group[1:]} else shape[i]
            for i, (a, b) in enumerate(bounds)]))
        assert requests[-1] == widened


def test_sharded_export_loads(policy, tmp_path):
    model, _ = policy
    save_hf(model, str(tmp_path), max_shard_bytes=20_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) >= 2 and all((tmp_path / name).exists() for name in files)
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_params(model, load_hf(str(tmp_path)))


def test_reexport_replaces_old_shards(policy, tmp_path):
    model, _ = policy
    save_hf(_policy(seed=5), str(tmp_path), max_shard_bytes=20_000)
    save_hf(model, str(tmp_path))  # single file now: the old index must not shadow it
    assert sorted(p for p in os.listdir(tmp_path) if "safetensors" in p) == ["model.safetensors"]
    _assert_same_params(model, load_hf(str(tmp_path)))


def test_interrupted_reexport_leaves_the_earlier_export_whole(policy, tmp_path, monkeypatch):
    model, _ = policy
    out = tmp_path / "hf"
    save_hf(model, str(out), max_shard_bytes=20_000)
    before = sorted(os.listdir(out))
    real_save, calls = safetensors.numpy.save_file, []

    def failing_save(tensors, path, metadata=None):  # the second shard's write dies (disk full, preemption)
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(tensors, path, metadata=metadata)
    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="No space"):
        save_hf(_policy(seed=5), str(out), max_shard_bytes=20_000)
    assert sorted(os.listdir(out)) == before
    _assert_same_params(model, load_hf(str(out)))
    monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
    save_hf(model, str(out))  # the next export clears the half-written staging directory and replaces it
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_bf16_round_trip(tmp_path):
    model = _policy(CFG.replace(dtype="bfloat16"))
    save_hf(model, str(tmp_path))
    assert safetensors.safe_open(str(tmp_path / "model.safetensors"), "numpy").get_slice(
        "model.embed_tokens.weight").get_dtype() == "BF16"
    loaded = load_hf(str(tmp_path))
    assert loaded.config.dtype == "bfloat16" and loaded.embed[...].dtype == jnp.bfloat16
    _assert_same_params(model, loaded)


def test_tied_checkpoint_may_store_the_shared_matrix_twice(tmp_path):
    model = _policy(CFG.replace(tie_embeddings=True))
    save_hf(model, str(tmp_path / "src"))
    copy = lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy())
    _assert_same_params(model, load_hf(_rewrite(tmp_path / "src", tmp_path / "dup", copy)))
    # transformers unties a differing lm_head; silently dropping it would give other logits than HF.
    differ = lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] + 1)
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' differs.*tie_embeddings=False"):
        load_hf(_rewrite(tmp_path / "src", tmp_path / "differ", differ))
    untied = load_hf(str(tmp_path / "differ"), tie_embeddings=False)
    np.testing.assert_array_equal(np.asarray(untied.lm_head[...]), np.asarray(model.embed[...]).T + 1)


def test_stale_rotary_buffers_are_skipped(policy, tmp_path):
    model, hf_dir = policy
    add = lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(4, np.float32))
    _assert_same_params(model, load_hf(_rewrite(hf_dir, tmp_path / "d", add)))


# --- PPM ----------------------------------------------------------------------------------------

def test_ppm_export_reload_gives_same_scores(ppm):
    model, hf_dir = ppm
    tensors = safetensors.numpy.load_file(os.path.join(hf_dir, "model.safetensors"))
    assert tensors["v_head.summary.weight"].shape == (1, CFG.hidden_size)
    assert tensors["v_head.summary.bias"].shape == (1,)
    loaded = load_hf(hf_dir, ppm=True)
    _assert_same_params(model, loaded)
    np.testing.assert_array_equal(_scores(loaded), _scores(model))


def test_ppm_for_scoring_leaves_the_untied_lm_head_out(ppm):
    model, hf_dir = ppm  # CFG is untied
    scoring = load_hf(hf_dir, ppm=True, lm_head=False)
    assert not hasattr(scoring.backbone, "lm_head") and "lm_head" not in str(_params(scoring).keys())
    np.testing.assert_array_equal(_scores(scoring), _scores(model))
    with pytest.raises(ValueError, match="only apply with ppm=True"):
        load_hf(hf_dir, lm_head=False)


def test_ppm_checkpoint_as_policy_is_refused_with_a_hint(ppm):
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'v_head.summary.weight' \(1, 32\)(.|\n)*ppm=True"):
        load_hf(ppm[1])


def test_ppm_from_policy_checkpoint_needs_the_explicit_option(policy):
    model, hf_dir = policy
    with pytest.raises(CheckpointError, match=r"missing tensor 'v_head.summary.weight'(.|\n)*init_missing_value_head"):
        load_hf(hf_dir, ppm=True)
    with pytest.raises(ValueError, match="ppm=True"):
        load_hf(hf_dir, init_missing_value_head=True)
    fresh = load_hf(hf_dir, ppm=True, init_missing_value_head=True)
    _assert_same_params(model, fresh.backbone)
    assert np.abs(_scores(fresh)).max() < 1e-3  # the reference init scores ~0 before training


def _split_value_head(hf_dir, dst):
    """A copy of a PPM checkpoint with its value head moved to its own file, as LLaMA-Factory saves it."""
    tensors = safetensors.numpy.load_file(os.path.join(hf_dir, "model.safetensors"))
    head = {k: tensors.pop(k) for k in ("v_head.summary.weight", "v_head.summary.bias")}
    dst = _rewrite(hf_dir, dst, lambda t: [t.pop(k) for k in head])
    safetensors.numpy.save_file(head, os.path.join(dst, "value_head.safetensors"), metadata={"format": "pt"})
    return dst, head


def test_value_head_in_its_own_file_loads(ppm, tmp_path):
    model, hf_dir = ppm
    split, head = _split_value_head(hf_dir, tmp_path / "split")
    loaded = load_hf(split, ppm=True)
    _assert_same_params(model, loaded)
    np.testing.assert_array_equal(_scores(loaded), _scores(model))
    # Re-exporting into the directory writes the head with the weights and removes the separate file.
    save_hf(loaded, split)
    assert not os.path.exists(os.path.join(split, "value_head.safetensors"))
    np.testing.assert_array_equal(_scores(load_hf(split, ppm=True)), _scores(model))
    both = _rewrite(hf_dir, tmp_path / "both")
    safetensors.numpy.save_file(head, os.path.join(both, "value_head.safetensors"))
    with pytest.raises(CheckpointError, match=r"v_head.summary.(.|\n)*both in value_head.safetensors"):
        load_hf(both, ppm=True)


def test_value_head_pickle_is_never_replaced_by_a_fresh_head(ppm, tmp_path):
    split, _ = _split_value_head(ppm[1], tmp_path / "split")
    os.rename(os.path.join(split, "value_head.safetensors"), os.path.join(split, "value_head.bin"))
    for fresh in (False, True):
        with pytest.raises(CheckpointError, match=r"value head is in value_head.bin(.|\n)*value_head.safetensors"):
            load_hf(split, ppm=True, init_missing_value_head=fresh)


def test_partial_value_head_is_refused(ppm, tmp_path):
    drop = lambda t: t.pop("v_head.summary.bias")
    with pytest.raises(CheckpointError, match=r"missing tensor 'v_head.summary.bias'(.|\n)*only partly stored"):
        load_hf(_rewrite(ppm[1], tmp_path / "d", drop), ppm=True, init_missing_value_head=True)


def test_ppm_export_loads_in_transformers_with_same_lm_logits(ppm):
    torch = pytest.importorskip("torch")
    import transformers
    model, hf_dir = ppm
    hf_model, info = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"]
    assert set(info["unexpected_keys"]) <= {"v_head.summary.weight", "v_head.summary.bias"}
    positions = np.maximum(np.cumsum(MASK, -1) - 1, 0)
    with torch.no_grad():
        ref = hf_model.eval()(input_ids=torch.tensor(TOKENS, dtype=torch.long),
                              attention_mask=torch.tensor(MASK, dtype=torch.long),
                              position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    assert np.abs(_logits(model.backbone) - ref)[MASK].max() <= 1e-4


# --- mesh ---------------------------------------------------------------------------------------

def _mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes them on CPU)")
    return parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))


def _assert_shardings(model, mesh):
    expected = nnx.to_pure_dict(parallel.state_shardings(nnx.state(model, nnx.Param), mesh))
    actual = jax.tree.map(lambda x: x.sharding, _params(model))
    for (path, want), (_, got) in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                                      jax.tree_util.tree_flatten_with_path(actual)[0]):
        assert got == want, path
    return expected


def test_load_onto_mesh_shards_params_and_keeps_the_forward(policy):
    model, hf_dir = policy
    mesh = _mesh()
    sharded = load_hf(hf_dir, mesh=mesh)
    specs = _assert_shardings(sharded, mesh)
    assert specs["embed"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # the test is not vacuous
    assert len(sharded.embed[...].addressable_shards[0].data.ravel()) == CFG.vocab_size * CFG.hidden_size // 4
    _assert_same_params(model, sharded)
    with jax.set_mesh(mesh):
        ours = _logits(sharded)
    np.testing.assert_allclose(ours, _logits(load_hf(hf_dir)), atol=1e-5)


def test_ppm_loads_onto_mesh(ppm):
    model, hf_dir = ppm
    mesh = _mesh()
    sharded = load_hf(hf_dir, ppm=True, mesh=mesh)
    _assert_shardings(sharded, mesh)
    with jax.set_mesh(mesh):
        scores = _scores(sharded)
    np.testing.assert_allclose(scores, _scores(model), atol=1e-5)


def test_tensor_parallel_beyond_kv_heads_is_refused(policy):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=1, tensor=4))
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        load_hf(policy[1], mesh=mesh)


# --- bad input ----------------------------------------------------------------------------------

def test_missing_tensor_names_key_and_shapes(policy, tmp_path):
    drop = lambda t: t.pop("model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(CheckpointError) as e:
        load_hf(_rewrite(policy[1], tmp_path / "d", drop))
    msg = str(e.value)
    assert "missing tensor 'model.layers.1.self_attn.k_proj.weight'" in msg
    assert "(16, 32)" in msg and "(32, 2, 8)" in msg  # HF shape and ours


def test_unexpected_tensor_is_refused(policy, tmp_path):
    add = lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.bias", np.zeros(32, np.float32))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.self_attn.o_proj.bias' \(32,\)"):
        load_hf(_rewrite(policy[1], tmp_path / "d", add))


def test_bare_qwen2model_keys_get_a_hint(policy, tmp_path):
    def strip(t):
        for key in [k for k in t if k.startswith("model.")]:
            t[key.removeprefix("model.")] = t.pop(key)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.embed_tokens.weight'(.|\n)*'model.' prefix"):
        load_hf(_rewrite(policy[1], tmp_path / "d", strip))


def test_extra_layers_in_checkpoint_are_refused(policy, tmp_path):
    fewer = lambda c: c.__setitem__("num_hidden_layers", 1)
    with pytest.raises(CheckpointError, match=r"\(12 problems\)(.|\n)*unexpected tensor 'model.layers.1."):
        load_hf(_rewrite(policy[1], tmp_path / "d", edit_config=fewer))


def test_shape_mismatch_names_key_and_both_shapes(policy, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight"] = np.zeros((24, 32), np.float32)
        t.pop("model.norm.weight")  # every problem is reported at once, not just the first
    with pytest.raises(CheckpointError) as e:
        load_hf(_rewrite(policy[1], tmp_path / "d", edit))
    msg = str(e.value)
    assert "(2 problems)" in msg
    assert "shape mismatch for 'model.layers.0.self_attn.q_proj.weight': checkpoint has (24, 32), " \
           "model expects (32, 32)" in msg and "(32, 4, 8)" in msg
    assert "missing tensor 'model.norm.weight'" in msg


def test_int_tensor_is_a_dtype_mismatch(policy, tmp_path):
    to_int = lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].astype(np.int32))
    with pytest.raises(CheckpointError, match=r"dtype mismatch for 'model.norm.weight': checkpoint has I32 \(32,\)"):
        load_hf(_rewrite(policy[1], tmp_path / "d", to_int))


def test_fp16_tensors_are_cast(policy, tmp_path):
    model, hf_dir = policy
    half = lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].astype(np.float16))
    loaded = load_hf(_rewrite(hf_dir, tmp_path / "d", half))
    assert loaded.final_norm.weight[...].dtype == jnp.float32
    np.testing.assert_allclose(loaded.final_norm.weight[...], model.final_norm.weight[...], rtol=1e-3)


def test_unsupported_architecture(policy, tmp_path):
    llama = lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="model_type='llama'"):
        load_hf(_rewrite(policy[1], tmp_path / "d", edit_config=llama))


@pytest.mark.parametrize("edit", [
    lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
    lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}),  # transformers 4 spelling
], ids=["rope_parameters", "legacy_rope_scaling"])
def test_rope_scaling_is_refused(policy, tmp_path, edit):
    with pytest.raises(ValueError, match="linear"):
        load_hf(_rewrite(policy[1], tmp_path / "d", edit_config=edit))


def test_missing_weights_or_config(policy, tmp_path):
    os.makedirs(tmp_path / "d")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(str(tmp_path / "d"))
    shutil.copy(os.path.join(policy[1], "config.json"), tmp_path / "d")
    with pytest.raises(CheckpointError, match=r"no model.safetensors or model.safetensors.index.json$"):
        load_hf(str(tmp_path / "d"))
    (tmp_path / "d" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*convert"):
        load_hf(str(tmp_path / "d"))


def test_sharded_index_with_a_missing_file(policy, tmp_path):
    save_hf(policy[0], str(tmp_path), max_shard_bytes=20_000)
    os.remove(tmp_path / "model-00002-of-{:05d}.safetensors".format(len(
        [p for p in os.listdir(tmp_path) if p.startswith("model-")])))
    with pytest.raises(CheckpointError, match=r"lists files that are missing: \['model-00002-of-"):
        load_hf(str(tmp_path))


def test_corrupt_safetensors_file(policy, tmp_path):
    shutil.copytree(policy[1], tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_hf(str(tmp_path / "d"))


def test_check_hf_dir_finds_what_a_load_would_refuse_without_loading(policy, tmp_path):
    d = tmp_path / "d"
    with pytest.raises(CheckpointError, match="no such directory"):
        hf_io.check_hf_dir(str(d))
    shutil.copytree(policy[1], d)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        hf_io.check_hf_dir(str(d))
    (d / "tokenizer.json").write_text("{}")  # present is all it asks: the tokenizer loads with the model
    assert hf_io.check_hf_dir(str(d)).hidden_size == policy[0].config.hidden_size  # the config it read
    config = (d / "config.json").read_text()
    (d / "config.json").write_text("{")
    with pytest.raises(InputError, match=r"d/config.json: not valid JSON"):
        hf_io.check_hf_dir(str(d))
    (d / "config.json").write_text(config)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf_io.check_hf_dir(str(d))
