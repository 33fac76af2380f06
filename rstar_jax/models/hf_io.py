"""HF Qwen2 checkpoint directories <-> our model state (safetensors, numpy path, no torch needed).

Import first checks every tensor's presence, shape and dtype against the abstract model from the
safetensors headers alone, so a bad directory fails with one error listing every problem before any
data is read. Then each parameter is read block by block: on a mesh, each device's callback reads
only the slice of the HF tensor that its shard needs, so a host reads only what its devices hold.
Export writes a directory that `transformers` loads as `Qwen2ForCausalLM`; a PPM adds
`v_head.summary.{weight,bias}` (which HF ignores as unexpected keys). On import the value head may also
sit in its own `value_head.safetensors` next to the backbone, as LLaMA-Factory-style reward-model
training saves it.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from rstar_jax import parallel
from rstar_jax.errors import InputError
from rstar_jax.models.config import ModelConfig, from_hf_config, read_json_config
from rstar_jax.models.ppm import DEFAULT_SCORE_SCALE, PPM, SCORE_SCALE_KEY, ValueHead
from rstar_jax.models.qwen2 import Qwen2
from rstar_jax.tokenizer import has_tokenizer_files

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# A value head saved apart from the backbone (LLaMA-Factory's reward models): safetensors read, pickle refused.
VALUE_HEAD_FILE, VALUE_HEAD_PICKLE = "value_head.safetensors", "value_head.bin"
# Float dtypes a parameter may be stored in (cast to the model dtype on load). FP8 and integer
# tensors are quantised formats that need scales we do not read, so they are refused.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Buffers some older exports saved; recomputed by the model, so safe to skip.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# A layout says how an HF tensor is built from ours: one group of our axes per HF axis, flattened
# row-major into it (an empty group is an HF axis of size 1). E.g. q_proj ours [D, H, Dh] ->
# HF [H*Dh, D] is ((1, 2), (0,)). Both directions and the sliced reads derive from it.
Layout = tuple[tuple[int, ...], ...]
_SAME1: Layout = ((0,),)
_SAME2: Layout = ((0,), (1,))
_TRANSPOSE: Layout = ((1,), (0,))  # torch Linear [out, in] vs ours [in, out]

_LAYER = r"layers\.(\d+)\."
_HF_LAYER = "model.layers.{0}."

# (our dotted state path regex, HF key template filled with the regex groups, layout)
_RULES: list[tuple[str, str, Layout]] = [
    (r"embed", "model.embed_tokens.weight", _SAME2),
    (r"final_norm\.weight", "model.norm.weight", _SAME1),
    (r"lm_head", "lm_head.weight", _TRANSPOSE),
    (_LAYER + r"(input_layernorm|post_attention_layernorm)\.weight", _HF_LAYER + "{1}.weight", _SAME1),
    (_LAYER + r"self_attn\.([qkv])_proj", _HF_LAYER + "self_attn.{1}_proj.weight", ((1, 2), (0,))),
    (_LAYER + r"self_attn\.([qkv])_bias", _HF_LAYER + "self_attn.{1}_proj.bias", ((0, 1),)),
    (_LAYER + r"self_attn\.o_proj", _HF_LAYER + "self_attn.o_proj.weight", ((2,), (0, 1))),
    (_LAYER + r"mlp\.(gate|up|down)_proj", _HF_LAYER + "mlp.{1}_proj.weight", _TRANSPOSE),
    # PPM value head: ours weight [D], bias []; HF (trl ValueHead `summary` Linear) weight [1, D], bias [1].
    (r"v_head\.weight", "v_head.summary.weight", ((), (0,))),
    (r"v_head\.bias", "v_head.summary.bias", ((),)),
]


class CheckpointError(InputError):
    """A checkpoint directory that does not match the model (names the keys and the shapes)."""


def _hf_rule(path: str) -> tuple[str, Layout]:
    """Our dotted path -> (HF key, layout)."""
    path = path.removeprefix("backbone.")
    for pattern, template, layout in _RULES:
        m = re.fullmatch(pattern, path)
        if m:
            return template.format(*m.groups()), layout
    raise KeyError(f"no HF key for parameter {path!r}")


def _check_layout(layout: Layout, ndim: int, path: str) -> None:
    # Guards against a model change that the rule table did not follow.
    if sorted(a for group in layout for a in group) != list(range(ndim)):
        raise KeyError(f"HF layout {layout} does not fit parameter {path} of rank {ndim}")


def hf_shape(layout: Layout, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[a] for a in group) for group in layout)


def to_hf(x: np.ndarray, layout: Layout) -> np.ndarray:
    # Contiguous, because safetensors.numpy.save_file writes a strided view's raw buffer unpermuted.
    return np.ascontiguousarray(x.transpose([a for group in layout for a in group]).reshape(hf_shape(layout, x.shape)))


def _dotted(key_path) -> str:
    return ".".join(str(k.key) for k in key_path)


class SafetensorsReader:
    """Header-first access to one safetensors file or an index-sharded set (HF's file precedence)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        single, index = os.path.join(hf_dir, SINGLE_FILE), os.path.join(hf_dir, INDEX_FILE)
        if os.path.exists(single):  # transformers prefers the single file too, so check_hf compares like with like
            if os.path.exists(index):
                log.warning("%s: both %s and %s exist; reading %s as transformers does", hf_dir, SINGLE_FILE,
                            INDEX_FILE, SINGLE_FILE)
            key_to_file = None
            files = [single]
        elif os.path.exists(index):
            with open(index) as f:
                key_to_file = {k: os.path.join(hf_dir, v) for k, v in json.load(f)["weight_map"].items()}
            files = sorted(set(key_to_file.values()))
            missing = [os.path.basename(p) for p in files if not os.path.exists(p)]
            if missing:
                raise CheckpointError(f"{hf_dir}: {INDEX_FILE} lists files that are missing: {missing}")
        else:
            others = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.bin")))
            hint = f" (found {others}: convert PyTorch .bin weights to safetensors first)" if others else ""
            raise CheckpointError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self._handles = {p: self._open(p) for p in files}
        self._slices = {}
        for path, handle in self._handles.items():
            for key in handle.keys():
                if key_to_file is None or key_to_file.get(key) == path:
                    self._slices[key] = handle.get_slice(key)
        if key_to_file is not None:
            absent = sorted(k for k in key_to_file if k not in self._slices)
            if absent:
                raise CheckpointError(f"{hf_dir}: {INDEX_FILE} maps {absent[:5]} to files that do not contain them")
        head_file = os.path.join(hf_dir, VALUE_HEAD_FILE)
        if os.path.exists(head_file):
            handle = self._handles[head_file] = self._open(head_file)
            twice = sorted(set(handle.keys()) & set(self._slices))
            if twice:
                raise CheckpointError(f"{hf_dir}: {twice[:5]} stored both in {VALUE_HEAD_FILE} and the model weights")
            self._slices.update({key: handle.get_slice(key) for key in handle.keys()})

    @staticmethod
    def _open(path: str):
        try:
            return safetensors.safe_open(path, framework="numpy")
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e

    def keys(self) -> set[str]:
        return set(self._slices)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slices[key].get_shape())

    def dtype(self, key: str) -> str:
        return self._slices[key].get_dtype()

    def read(self, key: str) -> np.ndarray:
        return self._slices[key][tuple(slice(None) for _ in self.shape(key))]

    def read_block(self, key: str, layout: Layout, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        """`ours[index]` where ours has `shape` and the HF tensor `key` is `to_hf(ours, layout)`.

        Reads only the HF rows/columns that cover `index`: a split axis group (e.g. heads x head_dim)
        is read as the range of its outer axis, and any slice of its inner axes is applied afterwards.
        """
        bounds = []
        for s, n in zip(index, shape):
            start, stop, step = s.indices(n)
            if step != 1:
                raise ValueError(f"strided index {s} is not supported")
            bounds.append((start, stop))
        hf_index, block_shape, order = [], [], []
        residual = [slice(None)] * len(shape)
        for group in layout:
            if not group:  # an HF axis of size 1 with no counterpart in ours
                hf_index.append(slice(None))
                continue
            outer, inner = group[0], group[1:]
            inner_size = math.prod(shape[a] for a in inner)
            start, stop = bounds[outer]
            hf_index.append(slice(start * inner_size, stop * inner_size))
            block_shape += [stop - start] + [shape[a] for a in inner]
            order += group
            for a in inner:
                residual[a] = slice(*bounds[a])
        raw = self._slices[key][tuple(hf_index)]
        block = raw.reshape(block_shape).transpose(np.argsort(order).astype(int))
        return np.asarray(block[tuple(residual)])


@dataclasses.dataclass
class _Plan:
    """Where each parameter comes from: an HF key, or a freshly initialised value."""

    keys: dict[str, tuple[str, Layout]]  # our dotted path -> (HF key, layout)
    fresh: dict[str, np.ndarray]  # our dotted path -> initial value


def _fresh_value_head(hidden_size: int) -> dict[str, np.ndarray]:
    head = ValueHead(hidden_size, nnx.Rngs(0))
    return {f"v_head.{k}": np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(head)).items()}


def _plan(pure_abs, reader: SafetensorsReader, cfg: ModelConfig, init_missing_value_head: bool,
          skip: frozenset[str] = frozenset()) -> _Plan:
    """Checks every tensor against the abstract model from headers only; raises listing all problems.
    `skip`: HF keys the model leaves out on purpose (not unexpected)."""
    problems, hints = [], []
    keys, missing = _match_params(pure_abs, reader, problems)
    fresh = _value_head_source(missing, init_missing_value_head, cfg, reader.hf_dir, problems, hints)
    _check_unexpected(reader, {k for k, _ in keys.values()} | skip, cfg, problems, hints)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(f"{reader.hf_dir}: checkpoint does not match the model ({len(problems)} problems):\n  - "
                              + "\n  - ".join(shown) + "".join(f"\nhint: {h}" for h in hints))
    return _Plan(keys=keys, fresh=fresh)


def _match_params(pure_abs, reader: SafetensorsReader, problems: list[str]):
    """Finds each parameter's HF tensor and checks its shape and dtype; returns (keys, missing)."""
    keys, missing = {}, {}
    for key_path, abstract in jax.tree_util.tree_flatten_with_path(pure_abs)[0]:
        path = _dotted(key_path)
        hf_key, layout = _hf_rule(path)
        _check_layout(layout, len(abstract.shape), path)
        expected = hf_shape(layout, abstract.shape)
        where = f"parameter {path} {tuple(abstract.shape)} {abstract.dtype}"
        if hf_key not in reader.keys():
            missing[path] = f"missing tensor {hf_key!r}: model expects shape {expected} ({where})"
            continue
        keys[path] = (hf_key, layout)
        shape, dtype = reader.shape(hf_key), reader.dtype(hf_key)
        if shape != expected:
            problems.append(f"shape mismatch for {hf_key!r}: checkpoint has {shape}, model expects {expected} "
                            f"({where})")
        if dtype not in _FLOAT_DTYPES:
            problems.append(f"dtype mismatch for {hf_key!r}: checkpoint has {dtype} {shape}, model expects a float "
                            f"tensor ({'/'.join(_FLOAT_DTYPES)}) of shape {expected} ({where})")
    return keys, missing


def _value_head_source(missing: dict[str, str], init_missing_value_head: bool, cfg: ModelConfig, hf_dir: str,
                       problems: list[str], hints: list[str]) -> dict[str, np.ndarray]:
    """Reports missing tensors; a wholly missing value head is initialised fresh only when asked to."""
    head = [p for p in missing if p.startswith("v_head.")]
    whole_head = len(head) == 2
    if whole_head and os.path.exists(os.path.join(hf_dir, VALUE_HEAD_PICKLE)):
        # Never start fresh over a trained head that is merely in a format read without torch.
        problems.append(f"the value head is in {VALUE_HEAD_PICKLE} (a PyTorch pickle, not read here): convert it "
                        f"next to it with python -c \"import torch, safetensors.torch as st; st.save_file(torch.load("
                        f"'{VALUE_HEAD_PICKLE}'), '{VALUE_HEAD_FILE}')\"")
        problems += [msg for p, msg in missing.items() if p not in head]
        return {}
    if init_missing_value_head and whole_head:
        log.info("%s: no value head stored; initialised a fresh one (init_missing_value_head=True)", hf_dir)
        problems += [msg for p, msg in missing.items() if p not in head]
        return _fresh_value_head(cfg.hidden_size)
    problems += list(missing.values())
    if whole_head:
        hints.append("no value head stored: a policy checkpoint, not a PPM (a PPM starts from one with load_hf(..., "
                     "init_missing_value_head=True), as experiments.train_rm does)")
    elif head:
        hints.append("the value head is only partly stored; a stored and a fresh half are never mixed")
    return {}


def _check_unexpected(reader: SafetensorsReader, used: set[str], cfg: ModelConfig, problems: list[str],
                      hints: list[str]) -> None:
    unexpected = reader.keys() - used
    skipped = {k for k in unexpected if k.endswith(_IGNORED_SUFFIXES)}
    if skipped:
        log.info("%s: skipping %d non-parameter buffers such as %s", reader.hf_dir, len(skipped), min(skipped))
    unexpected -= skipped
    if cfg.tie_embeddings and "lm_head.weight" in unexpected:
        unexpected.discard("lm_head.weight")
        if not problems:  # reads two tensors, so only once the rest is known to be sound
            problems += _check_tied_head(reader, cfg)
    for key in sorted(unexpected):
        problems.append(f"unexpected tensor {key!r} {reader.shape(key)}: not used by the model")
    if any(k.startswith("v_head.") for k in unexpected):
        hints.append("the checkpoint has a value head: load it with ppm=True")
    if any(k.startswith(("layers.", "embed_tokens.")) for k in unexpected):
        hints.append("keys lack the 'model.' prefix of Qwen2ForCausalLM (a bare Qwen2Model export?)")


def _check_tied_head(reader: SafetensorsReader, cfg: ModelConfig) -> list[str]:
    """A tied config may still store `lm_head.weight`: fine if it is the embedding, else HF unties them."""
    embed_key = "model.embed_tokens.weight"
    head, embed = reader.shape("lm_head.weight"), reader.shape(embed_key)
    if head != embed:
        return [f"shape mismatch for 'lm_head.weight': checkpoint has {head}, tied embedding {embed_key!r} is {embed}"]
    if not np.array_equal(reader.read("lm_head.weight"), reader.read(embed_key)):
        # transformers then loads the two separately (it warns and does not tie); we would silently differ.
        return ["'lm_head.weight' differs from 'model.embed_tokens.weight' although tie_word_embeddings=true "
                "(transformers then unties them): load with tie_embeddings=False"]
    log.info("%s: tied checkpoint also stores lm_head.weight (equal to the embedding); skipping it", reader.hf_dir)
    return []


def _lookup(tree, key_path):
    for k in key_path:
        tree = tree[k.key]
    return tree


def load_state_into(abstract_model: nnx.Module, hf_dir: str, mesh: jax.sharding.Mesh | None = None, *,
                    init_missing_value_head: bool = False, skip: frozenset[str] = frozenset()) -> nnx.Module:
    """Fills an abstract (`nnx.eval_shape`) model from an HF directory; every key must match exactly.

    With `mesh`, parameters get `parallel.state_shardings` and each device's shard is read on its own.
    """
    cfg: ModelConfig = abstract_model.config
    graphdef, abs_state = nnx.split(abstract_model)
    pure_abs = nnx.to_pure_dict(abs_state)
    pure_shardings = nnx.to_pure_dict(parallel.state_shardings(abs_state, mesh)) if mesh is not None else None
    reader = SafetensorsReader(hf_dir)
    plan = _plan(pure_abs, reader, cfg, init_missing_value_head, skip)

    def load(key_path, abstract):
        path = _dotted(key_path)
        if path in plan.fresh:
            value = plan.fresh[path]
            block = lambda index: value[index]
        else:
            hf_key, layout = plan.keys[path]
            block = lambda index: reader.read_block(hf_key, layout, abstract.shape, index).astype(abstract.dtype)
        if pure_shardings is None:
            return jnp.asarray(block(tuple(slice(None) for _ in abstract.shape)))
        return jax.make_array_from_callback(abstract.shape, _lookup(pure_shardings, key_path), block)

    loaded = jax.tree_util.tree_map_with_path(load, pure_abs)
    nnx.replace_by_pure_dict(abs_state, loaded)
    return nnx.merge(graphdef, abs_state)


def check_hf_dir(hf_dir: str) -> ModelConfig:
    """What loading `hf_dir` would find wrong first, found without loading it: a Qwen2 `config.json`, readable
    safetensors weights (headers only) and tokenizer files. Returns the config; a CheckpointError names the
    problem."""
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such directory")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise CheckpointError(f"{hf_dir}: no config.json (not an HF model directory)")
    cfg = from_hf_config(hf_dir)
    SafetensorsReader(hf_dir)
    if not has_tokenizer_files(hf_dir):
        raise CheckpointError(f"{hf_dir}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    return cfg


def load_hf(hf_dir: str, *, ppm: bool = False, mesh: jax.sharding.Mesh | None = None,
            init_missing_value_head: bool = False, lm_head: bool = True, **config_overrides) -> Qwen2 | PPM:
    """An HF Qwen2 directory -> our policy (`Qwen2`) or, with `ppm=True`, our `PPM`.

    `init_missing_value_head=True` (PPM only) starts the value head fresh when the directory has none,
    as round 1 does when it builds the PPM from a policy checkpoint. `lm_head=False` (PPM only) leaves an
    untied LM head out, for scoring, which never reads it (the model then has no `logits`, and an export of
    it no LM head). `config_overrides` replace `ModelConfig` fields, e.g. `dtype="float32"` or
    `attention_impl="dot_product"`.
    """
    if (init_missing_value_head or not lm_head) and not ppm:
        raise ValueError("init_missing_value_head=True and lm_head=False only apply with ppm=True")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise CheckpointError(f"{hf_dir}: no config.json (not an HF model directory)")
    raw = read_json_config(os.path.join(hf_dir, "config.json"))
    cfg = from_hf_config(raw, **config_overrides)
    if mesh is not None:
        parallel.check_tensor_parallel(mesh, cfg.num_kv_heads)
    scale = raw.get(SCORE_SCALE_KEY, DEFAULT_SCORE_SCALE)  # a policy's: the default
    build = (lambda: PPM(cfg, rngs=nnx.Rngs(0), score_scale=scale)) if ppm else (lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    abstract, skip = nnx.eval_shape(build), frozenset()
    if not lm_head and not cfg.tie_embeddings:
        del abstract.backbone.lm_head
        skip = frozenset({"lm_head.weight"})
    return load_state_into(abstract, hf_dir, mesh, init_missing_value_head=init_missing_value_head, skip=skip)


def _to_numpy(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _replace_dir(staging: str, out_dir: str) -> None:
    """Move the finished `staging` directory to `out_dir`, replacing an earlier export as a whole: a reader
    sees the old export or the new one, never a mix or a half-written one."""
    if os.path.isdir(out_dir):
        old = f"{out_dir}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
        os.rename(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out_dir)


def _shard(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        if current and size + tensors[key].nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += tensors[key].nbytes
    return shards + [current]


def save_hf(model: Qwen2 | PPM, out_dir: str, tokenizer=None, max_shard_bytes: int = 5 << 30) -> None:
    """Writes `config.json` + safetensors (sharded with an index above `max_shard_bytes`) + tokenizer,
    into `out_dir.saving` first, which then replaces `out_dir` whole (an interrupted export leaves no part).

    All processes must call this (gathering is collective); only process 0 writes.
    """
    cfg: ModelConfig = model.config
    tensors: dict[str, np.ndarray] = {}
    for key_path, value in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]:
        hf_key, layout = _hf_rule(_dotted(key_path))
        tensors[hf_key] = to_hf(_to_numpy(value), layout)
    if jax.process_index() != 0:
        return
    out_dir = os.path.normpath(out_dir)
    staging = f"{out_dir}.saving"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    shards = _shard(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        safetensors.numpy.save_file(shards[0], os.path.join(staging, SINGLE_FILE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file(shard, os.path.join(staging, name), metadata=metadata)
            weight_map.update({k: name for k in shard})
        with open(os.path.join(staging, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map},
                      f, indent=2)
    hf_config = cfg.to_hf_dict()
    if isinstance(model, PPM):
        hf_config[SCORE_SCALE_KEY] = model.score_scale
    if tokenizer is not None:  # HF generate() stops at the config's eos id, as Qwen2.5-Math's config.json sets it
        hf_config.update({f"{t}_token_id": getattr(tokenizer, f"{t}_token_id", None) for t in ("bos", "eos", "pad")})
    with open(os.path.join(staging, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    _replace_dir(staging, out_dir)
