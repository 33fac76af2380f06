"""Problem sets and data records.

Problems (`{"id", "question", "answer", ...}`) from JSONL / JSON files (`problem_files`), the
evaluation benchmarks as TFDS builders (`benchmarks`), and training problem pools (`problem_pool`).
"""
from rstar_jax.data.benchmarks import BENCHMARKS, load_benchmark
from rstar_jax.data.problem import FieldError, canonical_answer
from rstar_jax.data.problem_files import LoadStats, ProblemFormatError, iter_problems, load_problems
from rstar_jax.data.problem_pool import POOL_PRESETS, ProblemPoolConfig, open_problem_pool
from rstar_jax.data.tfds_problems import ProblemSource

__all__ = [
    "BENCHMARKS",
    "FieldError",
    "LoadStats",
    "POOL_PRESETS",
    "ProblemFormatError",
    "ProblemPoolConfig",
    "ProblemSource",
    "canonical_answer",
    "iter_problems",
    "load_benchmark",
    "load_problems",
    "open_problem_pool",
]
