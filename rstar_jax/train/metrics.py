"""Training metrics: the peak FLOP/s for MFU, TensorBoard event files, a console progress line."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp


# Dense bf16 peak FLOP/s per device from the vendors' spec sheets, by a prefix of `device.device_kind`
# (longest first: "TPU v5 lite" before "TPU v5").
_BF16_PEAKS = (("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100", 989e12), ("NVIDIA H200", 989e12),
               ("NVIDIA H800", 989e12), ("NVIDIA A100", 312e12), ("NVIDIA L4", 121e12),
               ("TPU v6 lite", 918e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12))


def spec_peak_flops(device_kind: str, dtype: str) -> float | None:
    """The spec sheet's peak of a known accelerator in bf16, else None (measure instead: CPUs, fp32)."""
    if dtype != "bfloat16":
        return None
    return next((peak for prefix, peak in _BF16_PEAKS if device_kind.startswith(prefix)), None)


def measure_peak_flops(dtype: str = "float32", size: int = 2048, reps: int = 3) -> float:
    """FLOP/s of one jitted square matmul on the default device: the MFU denominator where no spec
    sheet applies (CPU). On accelerators it is a lower bound of the spec peak, so MFU reads high-ish."""
    a = jnp.ones((size, size), jnp.dtype(dtype))
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsWriter:
    """Scalars to TensorBoard (tensorboardX: no TensorFlow needed) on process 0, and a console line."""

    def __init__(self, logdir: str | None, total_steps: int, print_fn=print):
        self.total_steps = total_steps
        self.print_fn = print_fn
        self._logdir = logdir if jax.process_index() == 0 else None
        self._writer = None
        self._start = time.perf_counter()
        self._start_step: int | None = None

    def write(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if self._writer is None and self._logdir:
            # Opened at the first step written: a resumed run's steps replace what the killed run logged after
            # its checkpoint (TensorBoard drops earlier events from purge_step on), instead of doubling them.
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(self._logdir, purge_step=step)
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def progress(self, step: int, scalars: dict[str, float]) -> None:
        """`step 12/100 (12%) loss 1.234 lr 7.0e-06 ... eta 01:23`: ETA from the steps done this run."""
        if jax.process_index() != 0:
            return
        now = time.perf_counter()
        if self._start_step is None:  # the clock starts at this run's first line
            self._start_step, self._start = step, now
        done = step - self._start_step  # the steps the elapsed time covers
        elapsed = now - self._start
        eta = elapsed / done * (self.total_steps - step) if done else float("nan")
        parts = [f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)"]
        for name, value in scalars.items():
            parts.append(f"{name} {value:.3g}" if abs(value) < 1e4 else f"{name} {value:.4g}")
        parts.append(f"eta {format_duration(eta) if eta == eta else '?'}")
        self.print_fn(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
