"""Mesh, logical-axis rules and sharded execution of the Qwen2 decoder on 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from rstar_jax import parallel
from rstar_jax.models.config import preset
from rstar_jax.models.qwen2 import KVCache, Qwen2, positions_from_mask

CFG = preset("tiny")  # D=128, H=4, G=2, Dh=32, F=384, V=512
B, T = 8, 16


def _mesh(data, fsdp, tensor):
    return parallel.make_mesh(parallel.MeshConfig(data, fsdp, tensor))


@pytest.fixture(scope="module")
def model_parts():
    graphdef, state = nnx.split(Qwen2(CFG, rngs=nnx.Rngs(0)))
    return graphdef, state


@pytest.fixture(scope="module")
def batch():
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size)  # [B, T]
    mask = jnp.ones((B, T), bool).at[:3, :5].set(False)  # [B, T]: three left-padded rows
    return tokens, mask


def _forward(graphdef, state, tokens, mask):
    """Logits [B, T, V] of a full causal forward."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model(tokens, positions_from_mask(mask), mask)
    return model.logits(hidden)


# ---------------------------------------------------------------------------------------------- mesh


@pytest.mark.parametrize("config, shape", [
    (parallel.MeshConfig(), (8, 1, 1)),
    (parallel.MeshConfig(-1, 2, 2), (2, 2, 2)),
    (parallel.MeshConfig(2, -1, 1), (2, 4, 1)),
    (parallel.MeshConfig(1, 4, -1), (1, 4, 2)),
    (parallel.MeshConfig(2, 2, 2), (2, 2, 2)),
])
def test_mesh_config_resolves_fill_axis(config, shape):
    assert config.shape(8) == shape


@pytest.mark.parametrize("config, message", [
    (parallel.MeshConfig(-1, -1, 1), "at most one axis may be -1"),
    (parallel.MeshConfig(3, -1, 1), "does not divide the 8 available devices"),
    (parallel.MeshConfig(2, 2, 1), "uses 4 devices but 8 are available"),
    (parallel.MeshConfig(0, -1, 1), "positive or -1"),
    (parallel.MeshConfig(-2, 1, 1), "positive or -1"),
])
def test_mesh_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        config.shape(8)


def test_make_mesh_axes():
    mesh = _mesh(2, -1, 2)
    assert mesh.axis_names == parallel.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(kind == AxisType.Auto for kind in mesh.axis_types)
    subset = parallel.make_mesh(parallel.MeshConfig(2, 2, 1), devices=jax.devices()[:4])
    assert subset.devices.shape == (2, 2, 1)


# -------------------------------------------------------------------------------------------- rules


@pytest.mark.parametrize("logical, spec", [
    (("batch", "seq", "act_embed"), P(("data", "fsdp"), None, None)),
    (("embed", "q_heads", "head_dim"), P("fsdp", "tensor", None)),
    (("vocab", "embed"), P("tensor", "fsdp")),
    (("vocab", "mlp"), P("tensor", None)),  # a mesh axis shards at most one dimension
    ((None, "mlp"), P(None, "tensor")),
])
def test_logical_to_spec(logical, spec):
    assert parallel.logical_to_spec(logical) == spec


def test_logical_to_spec_unknown_name():
    with pytest.raises(KeyError, match="'heads' has no sharding rule"):
        parallel.logical_to_spec(("batch", "heads"))


@pytest.mark.parametrize("mesh_shape, shape, logical, spec", [
    ((2, 4, 1), (2, 16), ("batch", "seq"), P("data", None)),  # keeps the axes that divide
    ((2, 4, 1), (8, 16), ("batch", "seq"), P(("data", "fsdp"), None)),
    ((2, 4, 1), (3, 16), ("batch", "seq"), P(None, None)),
    ((2, 1, 4), (6, 128), ("vocab", "embed"), P(None, "fsdp")),  # 6 rows over 4: replicated
])
def test_sharding_for_fits_shape(mesh_shape, shape, logical, spec):
    sharding = parallel.sharding_for(shape, logical, _mesh(*mesh_shape))
    assert sharding.spec == spec


def test_sharding_for_mesh_without_rule_axes():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    assert parallel.sharding_for((8, 128), ("batch", "embed"), mesh).spec == P("data", None)


# ------------------------------------------------------------------------------------ param shardings

EXPECTED_SPECS = {  # parameter path suffix -> spec on any (data, fsdp, tensor) mesh
    ("embed",): P("tensor", "fsdp"),
    ("self_attn", "q_proj"): P("fsdp", "tensor", None),
    ("self_attn", "k_proj"): P("fsdp", "tensor", None),
    ("self_attn", "v_proj"): P("fsdp", "tensor", None),
    ("self_attn", "q_bias"): P("tensor", None),
    ("self_attn", "k_bias"): P("tensor", None),
    ("self_attn", "v_bias"): P("tensor", None),
    ("self_attn", "o_proj"): P("tensor", None, "fsdp"),
    ("mlp", "gate_proj"): P("fsdp", "tensor"),
    ("mlp", "up_proj"): P("fsdp", "tensor"),
    ("mlp", "down_proj"): P("tensor", "fsdp"),
    ("input_layernorm", "weight"): P(None),
    ("post_attention_layernorm", "weight"): P(None),
    ("final_norm", "weight"): P(None),
}


def _spec_for_path(path):
    keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))  # drops `.value`
    matches = [spec for suffix, spec in EXPECTED_SPECS.items() if keys[-len(suffix):] == suffix]
    return matches[0] if matches else None


def test_params_carry_expected_shardings(model_parts):
    _, state = model_parts
    mesh = _mesh(2, 2, 2)
    placed = jax.device_put(state, parallel.state_shardings(state, mesh))
    leaves = jax.tree_util.tree_leaves_with_path(placed)
    assert len(leaves) == 2 + 12 * CFG.num_layers  # embed, final norm, 12 per layer
    for path, leaf in leaves:
        expected = _spec_for_path(path)
        assert expected is not None, f"no expected spec for {jax.tree_util.keystr(path)}"
        assert leaf.sharding.mesh == mesh and leaf.sharding.spec == expected, (path, leaf.sharding.spec)
    q_proj = placed["layers"][0]["self_attn"]["q_proj"][...]  # [D, H, Dh] = [128, 4, 32]
    assert q_proj.addressable_shards[0].data.shape == (64, 2, 32)
    embed = placed["embed"][...]  # [V, D] = [512, 128]
    assert embed.addressable_shards[0].data.shape == (256, 64)


def test_state_shardings_of_abstract_state():
    abstract = nnx.state(nnx.eval_shape(lambda: Qwen2(CFG, rngs=nnx.Rngs(0))))
    shardings = parallel.state_shardings(abstract, _mesh(1, 4, 2))
    assert shardings["layers"][1]["mlp"]["down_proj"].spec == P("tensor", "fsdp")


# ---------------------------------------------------------------------------------------- constrain


def test_constrain_without_mesh_is_identity():
    x = jnp.ones((8, 4, 384))
    assert parallel.constrain(x, ("batch", "seq", "mlp")) is x


def test_constrain_under_mesh():
    x = jnp.ones((8, 4, 384))  # [B, T, F]
    mesh = _mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        traced = jax.jit(lambda x: parallel.constrain(x * 2, ("batch", "seq", "mlp")))(x)
        eager = parallel.constrain(x, ("batch", "seq", "mlp"))
    for out in (traced, eager):
        assert out.sharding.shard_shape(out.shape) == (2, 4, 192)
    with pytest.raises(ValueError, match="do not match"):
        parallel.constrain(x, ("batch", "seq"))


def test_constrain_inside_shard_map_skips_manual_axes():
    x = jnp.ones((8, 4, 384))
    with jax.set_mesh(_mesh(2, 2, 2)):
        body = lambda x: parallel.constrain(x * 2, ("batch", "seq", "mlp"))
        f = jax.shard_map(body, in_specs=P("data"), out_specs=P("data"), axis_names={"data"})
        out = jax.jit(f)(x)
    np.testing.assert_array_equal(out, 2 * x)


# --------------------------------------------------------------------------------- sharded execution


@pytest.fixture(scope="module")
def reference_logits(model_parts, batch):
    graphdef, state = model_parts
    logits = jax.jit(_forward, static_argnums=0)(graphdef, state, *batch)  # [B, T, V], one device
    assert float(jnp.std(logits)) > 0.1  # large enough for atol=1e-5 to be a real comparison
    return logits


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_forward_matches_unsharded(model_parts, batch, reference_logits, mesh_shape):
    graphdef, state = model_parts
    mesh = _mesh(*mesh_shape)
    parallel.check_tensor_parallel(mesh, CFG.num_kv_heads)
    placed = jax.device_put(state, parallel.state_shardings(state, mesh))
    with jax.set_mesh(mesh):
        logits = jax.jit(_forward, static_argnums=0)(graphdef, placed, *batch)
    data, fsdp, tensor = mesh_shape
    assert logits.sharding.shard_shape(logits.shape)[0] == B // (data * fsdp)  # batch really split
    np.testing.assert_allclose(logits, reference_logits, atol=1e-5, rtol=0)


def _prefill_and_decode(graphdef, state, tokens, mask, steps):
    """Prefill a cache of T + steps slots, then greedy-decode `steps` tokens.

    Returns the last-position logits of the prefill and of each decode step [steps + 1, B, V], the
    decoded tokens [steps, B] and the final cache.
    """
    model = nnx.merge(graphdef, state)
    batch_size, length = tokens.shape
    cache = KVCache.zeros(model.config, batch_size, length + steps)
    positions = positions_from_mask(mask)  # [B, T]
    hidden, cache = model(tokens, positions, mask, cache)
    first = model.logits(hidden[:, -1])  # [B, V]

    def step(carry, _):
        cache, logits, position = carry
        token = jnp.argmax(logits, axis=-1)[:, None]  # [B, 1]
        hidden, cache = model(token, position, jnp.ones_like(token, bool), cache)
        new_logits = model.logits(hidden[:, -1])
        return (cache, new_logits, position + 1), (new_logits, token[:, 0])

    init = (cache, first, positions[:, -1:] + 1)
    (cache, _, _), (logits, decoded) = jax.lax.scan(step, init, None, length=steps)
    return jnp.concatenate([first[None], logits]), decoded, cache


def test_kv_cache_prefill_and_decode_sharded(model_parts, batch):
    graphdef, state = model_parts
    tokens, mask = batch
    tokens, mask = tokens[:4], mask[:4]  # B=4 over data x fsdp = 4
    run = jax.jit(_prefill_and_decode, static_argnums=(0, 4))
    want_logits, want_tokens, _ = run(graphdef, state, tokens, mask, 3)
    mesh = _mesh(2, 2, 2)
    placed = jax.device_put(state, parallel.state_shardings(state, mesh))
    with jax.set_mesh(mesh):
        logits, decoded, cache = run(graphdef, placed, tokens, mask, 3)
    k0 = cache.k[0]  # [B, G, S, Dh] = [4, 2, 19, 32]
    assert k0.sharding.shard_shape(k0.shape) == (1, 1, T + 3, CFG.head_dim)  # batch and kv heads split
    np.testing.assert_array_equal(decoded, want_tokens)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)


def test_tensor_parallel_beyond_kv_heads_is_a_clear_error():
    parallel.check_tensor_parallel(_mesh(4, 1, 2), CFG.num_kv_heads)  # 2-way over 2 kv heads: fine
    with pytest.raises(ValueError, match=r"tensor parallel size 4 must divide num_kv_heads=2 \(at most 2-way"):
        parallel.check_tensor_parallel(_mesh(2, 1, 4), CFG.num_kv_heads)
    with pytest.raises(ValueError, match="tensor parallel size 8"):
        parallel.check_tensor_parallel(_mesh(1, 1, 8), CFG.num_kv_heads)


# ------------------------------------------------------------------------------------ multi-host bits


@pytest.mark.parametrize("num_items, count", [(10, 3), (3, 4), (8, 2), (0, 2), (7, 1)])
def test_host_shard_partitions_items(num_items, count):
    items = [f"problem-{i}" for i in range(num_items)]
    parts = [parallel.host_shard(items, i, count) for i in range(count)]
    flat = [x for part in parts for x in part]
    assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))  # cover, no overlap
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert parallel.host_shard(items) == items  # one process owns everything


def test_host_shard_rejects_bad_index():
    with pytest.raises(ValueError, match="process_index=2"):
        parallel.host_shard([1, 2, 3], 2, 2)


_CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                 "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES",
                 "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
_SRUN = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, multiprocess", [
    ({}, False),
    ({**_SRUN, "SLURM_NTASKS": "2"}, True),
    ({**_SRUN, "SLURM_NTASKS": "1"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, False),  # inside salloc/sbatch but not under srun
    ({"TPU_WORKER_HOSTNAMES": "h0,h1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "h0"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476"}, True),
])
def test_cluster_detection(env, multiprocess):
    assert parallel._cluster_env_is_multiprocess(env) == multiprocess


@pytest.mark.parametrize("env, devices", [
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "8"}, list(range(8))),  # one task per node
    ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "4"}, [0, 1, 2, 3]),
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_GPUS_ON_NODE": "8"}, None),  # one task per GPU: JAX's default
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x2)"}, None),  # no GPUs announced
    ({}, None),
])
def test_a_slurm_task_per_node_gets_all_of_its_gpus(env, devices):
    assert parallel._slurm_node_devices(env) == devices


def test_initialize_distributed_single_process_is_noop(monkeypatch):
    for var in _CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed("127.0.0.1:1234", 1, 0) is False
    assert parallel.initialize_distributed(None, 1, 0) is False
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("args, message", [
    (("127.0.0.1:1234", 2, None), "also needs num_processes and process_id"),
    (("127.0.0.1:1234", 2, 2), r"process_id=2 must be in \[0, num_processes=2\)"),
    ((None, 2, 0), "num_processes=2 needs a coordinator_address"),
])
def test_initialize_distributed_bad_arguments(monkeypatch, args, message):
    for var in _CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=message):
        parallel.initialize_distributed(*args)
