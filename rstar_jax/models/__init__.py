"""Qwen2-family policy and PPM in Flax NNX, with HF checkpoint import/export."""
from rstar_jax.models.config import PRESETS, ModelConfig, from_hf_config, preset
from rstar_jax.models.ppm import PPM, search_score
from rstar_jax.models.qwen2 import KVCache, Qwen2, positions_from_mask, resize_embeddings

__all__ = ["PRESETS", "ModelConfig", "from_hf_config", "preset", "PPM", "search_score", "KVCache", "Qwen2",
           "positions_from_mask", "resize_embeddings"]
