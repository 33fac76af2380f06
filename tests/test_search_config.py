"""SearchConfig refuses settings it cannot search with, naming the field."""
import pytest

from rstar_jax.search.config import SearchConfig


@pytest.mark.parametrize("settings,message", [
    ({"mode": "guess"}, "mode must be one of"),
    ({"rollouts": 0}, "rollouts must be >= 1, got 0"),
    ({"rollouts": 8, "max_rollouts_unsolved": 4}, r"max_rollouts_unsolved \(4\) must be 0 or >= rollouts \(8\)"),
    ({"mode": "terminal", "runs": 2}, "runs=2: independent searches per problem are inference trajectories"),
    ({"mode": "ppm", "runs": 4}, "extracts one tree per problem"),
    ({"capacity": 3, "num_candidates": 4}, "capacity 3 cannot hold"),
    ({"max_context_tokens": 0}, "max_context_tokens must be >= 1, got 0"),
    ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
    ({"c": -3.0}, "c must be >= 0, got -3.0"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_p": 5.0}, r"top_p must be in \(0, 1\], got 5.0"),
    ({"exec_timeout_s": 0.0}, "exec_timeout_s must be positive, got 0.0"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**settings)


def test_inference_may_run_several_searches_per_problem():
    assert SearchConfig(mode="inference", runs=4).runs == 4
