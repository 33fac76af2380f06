"""Models with their tokenizer from an HF directory (safetensors + config + tokenizer), ready for search."""
from __future__ import annotations

import os

from flax import nnx

from rstar_jax import tokenizer as tk
from rstar_jax.models.hf_io import load_hf


def load_policy(hf_dir: str | os.PathLike, mesh=None):
    """(tokenizer, Qwen2); the embedding grows to cover the step tags when the tokenizer gained them."""
    tokenizer = tk.load_tokenizer(hf_dir)
    model = load_hf(hf_dir, mesh=mesh)
    tk.sync_model_vocab(model, tokenizer, nnx.Rngs(0))
    return tokenizer, model


def load_reward_model(hf_dir: str | os.PathLike, mesh=None):
    """(tokenizer, PPM) for scoring: a PPM, PQM or ORM directory (the backbone plus `v_head.summary.*`);
    an untied LM head, which a score never reads, is not loaded."""
    tokenizer = tk.load_tokenizer(hf_dir)
    model = load_hf(hf_dir, ppm=True, mesh=mesh, lm_head=False)
    tk.sync_model_vocab(model, tokenizer, nnx.Rngs(0))
    return tokenizer, model
