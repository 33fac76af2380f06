"""HF Qwen2 checkpoint directories <-> our model state (safetensors, numpy path, no torch needed).

Import reads one tensor at a time, checks it against the abstract model, and places it with the
mesh's sharding (each host materialises only its own shards). Export writes a directory that
`transformers` loads as `Qwen2ForCausalLM`; a PPM adds `v_head.summary.{weight,bias}`.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from rstar_jax import parallel
from rstar_jax.models.config import ModelConfig, from_hf_config
from rstar_jax.models.ppm import PPM
from rstar_jax.models.qwen2 import Qwen2

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]

_LAYER = r"layers\.(\d+)\."
_HF_LAYER = "model.layers.{0}."


def _t(x, cfg):
  return x.T


def _heads_in(n_heads: str) -> Transform:  # HF [N*Dh, D] -> ours [D, N, Dh]
  return lambda x, cfg: x.T.reshape(cfg.hidden_size, getattr(cfg, n_heads), cfg.head_dim)


def _heads_out(x, cfg):  # ours [D, N, Dh] -> HF [N*Dh, D]
  return x.reshape(x.shape[0], -1).T


def _bias_in(n_heads: str) -> Transform:
  return lambda x, cfg: x.reshape(getattr(cfg, n_heads), cfg.head_dim)


def _flat(x, cfg):
  return x.reshape(-1)


def _o_in(x, cfg):  # HF [D, H*Dh] -> ours [H, Dh, D]
  return x.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


def _o_out(x, cfg):
  return x.reshape(-1, x.shape[-1]).T


def _same(x, cfg):
  return x


# (our path regex, HF key template, HF -> ours, ours -> HF). Our paths are dotted state paths.
_RULES: list[tuple[str, str, Transform, Transform]] = [
    (r"embed", "model.embed_tokens.weight", _same, _same),
    (r"final_norm\.weight", "model.norm.weight", _same, _same),
    (r"lm_head", "lm_head.weight", _t, _t),
    (_LAYER + r"input_layernorm\.weight", _HF_LAYER + "input_layernorm.weight", _same, _same),
    (_LAYER + r"post_attention_layernorm\.weight", _HF_LAYER + "post_attention_layernorm.weight", _same, _same),
    (_LAYER + r"self_attn\.q_proj", _HF_LAYER + "self_attn.q_proj.weight", _heads_in("num_heads"), _heads_out),
    (_LAYER + r"self_attn\.k_proj", _HF_LAYER + "self_attn.k_proj.weight", _heads_in("num_kv_heads"), _heads_out),
    (_LAYER + r"self_attn\.v_proj", _HF_LAYER + "self_attn.v_proj.weight", _heads_in("num_kv_heads"), _heads_out),
    (_LAYER + r"self_attn\.q_bias", _HF_LAYER + "self_attn.q_proj.bias", _bias_in("num_heads"), _flat),
    (_LAYER + r"self_attn\.k_bias", _HF_LAYER + "self_attn.k_proj.bias", _bias_in("num_kv_heads"), _flat),
    (_LAYER + r"self_attn\.v_bias", _HF_LAYER + "self_attn.v_proj.bias", _bias_in("num_kv_heads"), _flat),
    (_LAYER + r"self_attn\.o_proj", _HF_LAYER + "self_attn.o_proj.weight", _o_in, _o_out),
    (_LAYER + r"mlp\.(gate|up|down)_proj", _HF_LAYER + "mlp.{1}_proj.weight", _t, _t),
    # PPM value head: ours weight [D], bias []; HF (trl ValueHead) weight [1, D], bias [1].
    (r"v_head\.weight", "v_head.summary.weight", lambda x, cfg: x.reshape(-1), lambda x, cfg: x.reshape(1, -1)),
    (r"v_head\.bias", "v_head.summary.bias", lambda x, cfg: x.reshape(()), lambda x, cfg: x.reshape(1)),
]


class CheckpointError(ValueError):
  """A checkpoint directory that does not match the model (names the key and the shapes)."""


def _hf_rule(path: str):
  """Our dotted path -> (HF key, from_hf, to_hf)."""
  path = path.removeprefix("backbone.")
  for pattern, template, from_hf, to_hf in _RULES:
    m = re.fullmatch(pattern, path)
    if m:
      return template.format(*m.groups()), from_hf, to_hf
  raise KeyError(f"no HF key for parameter {path!r}")


def _dotted(key_path) -> str:
  return ".".join(str(k.key) for k in key_path)


class SafetensorsReader:
  """Lazy reader over one or more (index-sharded) safetensors files."""

  def __init__(self, hf_dir: str):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.key_to_file = {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
    elif os.path.exists(single):
      with safetensors.safe_open(single, framework="numpy") as f:
        self.key_to_file = {k: single for k in f.keys()}
    else:
      raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    self._open: dict[str, object] = {}

  def keys(self) -> set[str]:
    return set(self.key_to_file)

  def get(self, key: str) -> np.ndarray:
    path = self.key_to_file[key]
    if path not in self._open:
      if not os.path.exists(path):
        raise CheckpointError(f"{path}: listed in the index for {key!r} but missing")
      self._open[path] = safetensors.safe_open(path, framework="numpy")
    return self._open[path].get_tensor(key)


def _place(array: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jnp.asarray(array)
  # Each host builds only the shards its own devices hold.
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def load_state_into(abstract_model: nnx.Module, hf_dir: str, mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
  """Fills an abstract (`nnx.eval_shape`) model from an HF directory; every key must match exactly."""
  cfg: ModelConfig = abstract_model.config
  graphdef, abs_state = nnx.split(abstract_model)
  shardings = parallel.state_shardings(abs_state, mesh) if mesh is not None else None
  pure_abs = nnx.to_pure_dict(abs_state)
  pure_shardings = nnx.to_pure_dict(shardings) if shardings is not None else None
  reader = SafetensorsReader(hf_dir)
  used: set[str] = set()

  def load(key_path, abstract):
    path = _dotted(key_path)
    hf_key, from_hf, _ = _hf_rule(path)
    if hf_key not in reader.keys():
      raise CheckpointError(f"{hf_dir}: missing tensor {hf_key!r} (for parameter {path}, shape {abstract.shape})")
    raw = reader.get(hf_key)
    if not np.issubdtype(raw.dtype, np.floating) and raw.dtype != jnp.bfloat16:
      raise CheckpointError(f"{hf_dir}: tensor {hf_key!r} has dtype {raw.dtype}; expected a float type")
    expected_hf_shape = _hf_rule(path)[2](np.empty(abstract.shape, np.int8), cfg).shape
    if raw.shape != expected_hf_shape:
      raise CheckpointError(f"{hf_dir}: tensor {hf_key!r} has shape {raw.shape}, expected {expected_hf_shape} "
                            f"(parameter {path} {abstract.shape})")
    used.add(hf_key)
    value = np.asarray(from_hf(raw, cfg)).astype(abstract.dtype)
    sharding = None
    if pure_shardings is not None:
      sharding = _lookup(pure_shardings, key_path)
    return _place(value, sharding)

  loaded = jax.tree_util.tree_map_with_path(load, pure_abs)
  unexpected = reader.keys() - used
  if cfg.tie_embeddings:
    unexpected.discard("lm_head.weight")  # some tied checkpoints store the shared matrix twice
  if unexpected:
    raise CheckpointError(f"{hf_dir}: unexpected tensors not used by the model: {sorted(unexpected)[:10]}"
                          f"{' ...' if len(unexpected) > 10 else ''}")
  nnx.replace_by_pure_dict(abs_state, loaded)
  return nnx.merge(graphdef, abs_state)


def _lookup(tree, key_path):
  for k in key_path:
    tree = tree[k.key]
  return tree


def load_hf(hf_dir: str, *, ppm: bool = False, mesh: jax.sharding.Mesh | None = None,
            **config_overrides) -> Qwen2 | PPM:
  """An HF Qwen2 directory -> our policy (`Qwen2`) or, with `ppm=True`, our `PPM`."""
  cfg = from_hf_config(hf_dir, **config_overrides)
  if mesh is not None:
    parallel.check_tensor_parallel(mesh, cfg.num_kv_heads)
  build = (lambda: PPM(cfg, rngs=nnx.Rngs(0))) if ppm else (lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
  return load_state_into(nnx.eval_shape(build), hf_dir, mesh)


def _to_numpy(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_hf(model: Qwen2 | PPM, out_dir: str, tokenizer=None, max_shard_bytes: int = 5 << 30) -> None:
  """Writes `config.json` + safetensors (sharded with an index above `max_shard_bytes`) + tokenizer.

  All processes must call this (gathering is collective); only process 0 writes.
  """
  cfg: ModelConfig = model.config
  tensors: dict[str, np.ndarray] = {}
  for key_path, value in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]:
    hf_key, _, to_hf = _hf_rule(_dotted(key_path))
    tensors[hf_key] = np.ascontiguousarray(to_hf(_to_numpy(value), cfg))
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  shards, current, size = [], {}, 0
  for key in sorted(tensors):
    if current and size + tensors[key].nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[key] = tensors[key]
    size += tensors[key].nbytes
  shards.append(current)
  metadata = {"format": "pt"}
  if len(shards) == 1:
    safetensors.numpy.save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=metadata)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      safetensors.numpy.save_file(shard, os.path.join(out_dir, name), metadata=metadata)
      weight_map.update({k: name for k in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map},
                f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg.to_hf_dict(), f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
