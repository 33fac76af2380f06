"""Qwen2-family model configuration, presets, and import from an HF `config.json`."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from rstar_jax.errors import InputError

ATTENTION_IMPLS = ("xla", "dot_product", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Qwen2 decoder (policy backbone and PPM backbone alike)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    max_position_embeddings: int = 4096
    # Parameter dtype; activations follow it, while norms, softmax, RoPE and logits stay fp32.
    dtype: str = "float32"
    # "xla": einsum attention; "dot_product": jax.nn.dot_product_attention's default (XLA) path;
    # "cudnn": its cuDNN fused kernel (NVIDIA GPUs, bf16). Decode over a shared prompt prefix (the
    # sampler's) always uses its own two-part softmax.
    attention_impl: str = "xla"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for split-half RoPE")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}; expected 'float32' or 'bfloat16'")

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, h, g, dh = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * dh + 2 * d * g * dh + h * dh + 2 * g * dh + h * dh * d
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `Qwen2Config` dict (what `config.json` holds)."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "use_sliding_window": False,
            "rope_scaling": None,
            "attention_dropout": 0.0,
            "dtype": self.dtype,
        }


def _qwen(layers, d, h, g, f, v, tied, theta, max_pos=32768) -> ModelConfig:
    return ModelConfig(vocab_size=v, hidden_size=d, num_layers=layers, num_heads=h, num_kv_heads=g,
                       head_dim=d // h, intermediate_size=f, rope_theta=theta, tie_embeddings=tied,
                       max_position_embeddings=max_pos, dtype="bfloat16")


PRESETS: dict[str, ModelConfig] = {
    # Tests and the embedded CPU miniature (~1M parameters).
    "tiny": ModelConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                        head_dim=32, intermediate_size=384, rope_theta=1e4, max_position_embeddings=1024),
    "qwen2.5-0.5b": _qwen(24, 896, 14, 2, 4864, 151936, True, 1e6),
    "qwen2.5-1.5b": _qwen(28, 1536, 12, 2, 8960, 151936, True, 1e6),
    "qwen2.5-3b": _qwen(36, 2048, 16, 2, 11008, 151936, True, 1e6),
    "qwen2.5-7b": _qwen(28, 3584, 28, 4, 18944, 152064, False, 1e6),
    "qwen2.5-math-1.5b": _qwen(28, 1536, 12, 2, 8960, 151936, True, 1e4, max_pos=4096),
    "qwen2.5-math-7b": _qwen(28, 3584, 28, 4, 18944, 152064, False, 1e4, max_pos=4096),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def read_json_config(path: str) -> dict:
    """A JSON object from a config file; an InputError names the file when it is not one."""
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def from_hf_config(path_or_dict: str | os.PathLike | dict, **overrides) -> ModelConfig:
    """Reads an HF Qwen2 `config.json` (a file, its directory, or the parsed dict)."""
    if isinstance(path_or_dict, dict):
        cfg, where = path_or_dict, "config dict"
    else:
        path = os.fspath(path_or_dict)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        cfg, where = read_json_config(path), path
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type != "qwen2" or any(a not in ("Qwen2ForCausalLM", "Qwen2Model") for a in archs):
        raise InputError(f"{where}: unsupported architecture model_type={model_type!r} architectures={archs}; "
                         "only Qwen2 (Qwen2ForCausalLM) is supported")
    legacy_scaling = cfg.get("rope_scaling") or {}
    if legacy_scaling.get("rope_type", legacy_scaling.get("type", "default")) != "default":
        raise InputError(f"{where}: unsupported rope_scaling={legacy_scaling!r}; only plain RoPE is supported")
    if cfg.get("use_sliding_window"):
        raise InputError(f"{where}: use_sliding_window=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise InputError(f"{where}: unsupported hidden_act={cfg['hidden_act']!r}")
    rope = cfg.get("rope_parameters") or {}  # transformers 5 moved rope_theta (and scaling) here
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"{where}: unsupported rope_parameters={rope!r}; only plain RoPE is supported")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise InputError(f"{where}: missing required Qwen2 config fields {missing}")
    heads = cfg["num_attention_heads"]
    torch_dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    # Defaults are HF Qwen2Config's, so a config.json that omits a field means what it means to HF.
    fields = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate_size=cfg["intermediate_size"],
        # transformers 5 reads rope_parameters first; so do we, or logits would differ from HF's.
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        dtype="bfloat16" if torch_dtype == "bfloat16" else "float32",
    )
    fields.update(overrides)
    return ModelConfig(**fields)
