"""Training metrics: the MFU peak of known accelerators and the console line's ETA."""
import pytest

from rstar_jax.train import metrics


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("TPU v5 lite", "bfloat16", 197e12),  # v5e, not v5p
    ("TPU v5", "bfloat16", 459e12),
    ("NVIDIA H100 80GB HBM3", "float32", None),  # measured instead
    ("cpu", "bfloat16", None),
])
def test_spec_peaks_of_known_accelerators(kind, dtype, peak):
    assert metrics.spec_peak_flops(kind, dtype) == peak


def test_eta_counts_the_steps_the_elapsed_time_covers(monkeypatch):
    clock, lines = iter([0.0, 100.0, 110.0, 120.0]), []
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    writer = metrics.MetricsWriter(None, total_steps=100, print_fn=lambda line, flush: lines.append(line))
    writer.progress(10, {})  # resumed at step 10: the clock starts here
    writer.progress(20, {})  # 10 steps in 10 s: 80 left
    assert lines[0].endswith("eta ?") and lines[1].endswith("eta 01:20"), lines
