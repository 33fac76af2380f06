"""Shared pieces of the training tests: a character tokenizer, records, a tiny-model trainer."""
from __future__ import annotations

import json

from flax import nnx

from rstar_jax import parallel
from rstar_jax.models import PPM, Qwen2, preset
from rstar_jax.train.batching import BatchConfig, BatchIterator
from rstar_jax.train.optim import OptimConfig
from rstar_jax.train.records import Record
from rstar_jax.train.tasks import TASKS
from rstar_jax.train.trainer import Trainer, TrainConfig

CFG = preset("tiny")  # V=512


class CharTokenizer:
    """One id per character (2 + code point mod 500); 0 = pad, 1 = eos. Enough for the library's tasks."""

    pad_token_id, eos_token_id = 0, 1

    def encode(self, text, add_special_tokens=False):
        return [2 + ord(c) % 500 for c in text]


def sft_records(n: int = 8) -> list[Record]:
    return [Record({"id": f"s{i}", "prompt": f"q{i}=", "response": f"{i * 37 % 100}!"}, f"mem.jsonl:{i + 1}")
            for i in range(n)]


def pair_records(n: int = 8) -> list[Record]:
    return [Record({"id": f"p{i}", "prompt": f"q{i}=", "pos": f"{i * 37 % 100}!", "neg": f"{i * 41 % 100}?",
                    "pos_count": 1 + i % 2, "neg_count": 2}, f"mem.jsonl:{i + 1}") for i in range(n)]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def make_trainer(task_name="sft", *, mesh_shape=(1, 1, 1), devices=None, records=None, batch_size=8,
                 microbatches=1, steps=10, lr=3e-3, seed=0, max_len=32, buckets=(16, 32), task_kw=None, cfg=CFG,
                 **train_kw):
    """(trainer, iterator) on the tiny model (or `cfg`) over `records` (default: 8 SFT records)."""
    import jax
    task = TASKS[task_name](CharTokenizer(), max_len, **(task_kw or {}))
    examples, _ = task.tokenize(records if records is not None else sft_records())
    data_cfg = BatchConfig(batch_size=batch_size, microbatches=microbatches, seed=seed, length_buckets=buckets)
    iterator = BatchIterator(examples, task, data_cfg)
    n = mesh_shape[0] * mesh_shape[1] * mesh_shape[2]
    mesh = parallel.make_mesh(parallel.MeshConfig(*mesh_shape), devices=devices or jax.devices()[:n])
    model = (PPM if task.is_reward_model else Qwen2)(cfg, rngs=nnx.Rngs(seed))
    trainer = Trainer(task, model, OptimConfig(learning_rate=lr, warmup_steps=2),
                      TrainConfig(max_steps=steps, seed=seed, **train_kw), mesh, steps)
    return trainer, iterator
