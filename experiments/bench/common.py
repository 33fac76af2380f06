"""What the model benchmarks share: the model they run, the device they run on, peak memory."""
from __future__ import annotations

import os
import threading

# JAX and PyTorch share the GPU in one process: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# The default benchmark model: ~48M parameters, Qwen2-shaped (GQA 4:1, tied embeddings), fp32. Small
# enough for a 2-core CPU; on an accelerator `--preset` picks a real size.
BENCH_CONFIG = dict(vocab_size=50000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                    intermediate_size=1408, rope_theta=1e6, max_position_embeddings=1024)


def model_config(preset: str = "", dtype: str = "float32", attention_impl: str = "xla"):
    """The benchmark's `ModelConfig`: BENCH_CONFIG, or a named preset's shapes (random weights)."""
    from rstar_jax.models import ModelConfig
    from rstar_jax.models.config import preset as named_preset
    base = named_preset(preset) if preset else ModelConfig(**BENCH_CONFIG)
    return base.replace(dtype=dtype, attention_impl=attention_impl)


def on_gpu() -> bool:
    import jax
    return jax.default_backend() == "gpu"


def torch_device() -> str:
    """Where the PyTorch side runs: the GPU when JAX has one too, so the two compare on one chip."""
    import torch
    return "cuda" if on_gpu() and torch.cuda.is_available() else "cpu"


def peak_matmul_size() -> int:
    """Side of the square matmul that measures the peak: 8192 fills an accelerator, 2048 a CPU core."""
    return 8192 if on_gpu() else 2048


class PeakMemory:
    """Peak memory above the starting point while the block runs. On a GPU, the allocator's own peak
    counter of `framework` ("jax": peak since the process started, so the bound is loose when an
    earlier block peaked higher; "torch": reset here); on a CPU, this process's resident set sampled
    every 5 ms."""

    def __init__(self, framework: str):
        self.framework = framework

    def __enter__(self):
        self.gpu = on_gpu()
        if self.gpu and self.framework == "jax":
            import jax
            self._device = jax.devices()[0]
            self.base = self._device.memory_stats().get("bytes_in_use", 0)
            return self
        if self.gpu:
            import torch
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        if self.gpu and self.framework == "jax":
            self.peak = self._device.memory_stats().get("peak_bytes_in_use", 0)
            return
        if self.gpu:
            import torch
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / 2**20
