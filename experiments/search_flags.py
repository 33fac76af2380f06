"""The search and extraction settings as absl flags, shared by `experiments.search` and `experiments.round`.

Each flag mirrors one field of `SearchConfig` / `ExtractConfig` (same name, same default), so a flagfile
line `--rollouts=16` means the same thing in every stage.
"""
from __future__ import annotations

import dataclasses

from absl import flags

from experiments import multihost
from rstar_jax.search.config import MODES, SearchConfig
from rstar_jax.search.extract import ExtractConfig

# Enough for the miniature's 256 trees of a search without dropping any; a 7B model's contexts take ~57 KB a token.
DEFAULT_SCORE_CACHE_MIB = 4096
DEFAULT_POLICY_CACHE_MIB = 4096

_HELP = {
    "mode": "terminal (terminal-guided, rounds 1-2) | ppm (PPM-augmented, rounds 3-4) | inference (PPM-guided)",
    "rollouts": "MCTS rollouts (iterations) per problem",
    "max_rollouts_unsolved": "rollouts for a problem still without a correct answer (0 = --rollouts)",
    "num_candidates": "candidate steps sampled per expansion (n)",
    "max_depth": "depth limit: deeper steps are terminal (-1)",
    "max_step_tokens": "token limit of one generated step",
    "max_context_tokens": "a leaf whose prompt reaches this many tokens is not expanded",
    "temperature": "sampling temperature of the policy",
    "top_p": "nucleus sampling threshold",
    "top_k": "top-k sampling (0 = off)",
    "c": "UCT exploration constant",
    "unvisited": "UCT score of an unvisited child: zero (reference) | inf (paper)",
    "propagate_failures": "back up a failed step's -1 along its path (paper) instead of on the node (reference)",
    "answer_first": "keep only the first answer candidate of an expansion (reference)",
    "dedupe": "drop duplicate candidate steps",
    "runs": "independent searches per problem with seeds seed..seed+runs-1 (inference trajectories)",
    "seed": "sampling seed",
    "exec_timeout_s": "sandbox wall-clock limit per program, seconds",
    "batch_size": "trees searched in lock-step (memory/throughput only; results do not depend on it)",
    "capacity": "nodes per tree (0 = enough for every rollout to reach max_depth)",
    "sft_per_problem": "extraction: top correct trajectories per problem for policy SFT",
    "pairs_per_side": "extraction: positives and negatives per step for PPM pairs",
    "min_margin": "extraction: minimum Q margin of a preference pair",
    "min_edit_distance": "extraction: minimum character edit distance of a preference pair (0 = off)",
    "exec_error_is_negative": "extraction: a failed-execution step counts as leading to a wrong answer",
    "final_step_pairs": "extraction: compare whole trajectories for the final answer step",
    "rejection_per_problem": "extraction: cap of the rejection-sampled SFT set per problem",
}


def _define(config_cls, skip=()) -> None:
    for field in dataclasses.fields(config_cls):
        if field.name in skip:
            continue
        default, help_text = field.default, _HELP[field.name]
        if field.name == "mode":
            flags.DEFINE_enum("mode", default, MODES, help_text)
        elif field.name == "unvisited":
            flags.DEFINE_enum("unvisited", default, ["zero", "inf"], help_text)
        elif isinstance(default, bool):
            flags.DEFINE_bool(field.name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(field.name, default, help_text)
        elif isinstance(default, float):
            flags.DEFINE_float(field.name, default, help_text)
        else:
            raise TypeError(f"no flag type for {config_cls.__name__}.{field.name}")


def define() -> None:
    """Called by the programs' main only, so modules importing each other never define a flag twice."""
    _define(SearchConfig, skip=("prompt_prefix",))  # read from --prompt_prefix_file
    flags.DEFINE_string("prompt_prefix_file", None, "text file the policy sees before every prompt: a bootstrap "
                        "model's instruction and worked examples in the step format (e.g. "
                        "experiments/configs/paper/bootstrap_prefix.txt); trees and training data keep the plain "
                        "prompt")
    _define(ExtractConfig, skip=("seed",))  # extraction shares --seed
    flags.DEFINE_string("tfds_data_dir", None, "where tfds:<benchmark> and pool:<preset>:<files> problem sets are "
                        "built (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    flags.DEFINE_string("tfds_manual_dir", None, "local copies of the benchmarks' source files "
                        "(<dir>/<benchmark>/test.jsonl, e.g. Qwen2.5-Math's evaluation/data); default: download "
                        "the public copy")
    flags.DEFINE_list("search_mesh", ["1", "1", "1"], "data,fsdp,tensor mesh of this host's devices for the policy "
                      "and PPM in search and evaluation (-1: the rest; without -1 the first devices); each host searches its own "
                      "share of the problems")
    flags.register_validator("search_mesh", multihost.MESH_CHECK[0],
                             message=f"--search_mesh must be {multihost.MESH_CHECK[1]}")
    flags.DEFINE_integer("search_profile_start", -1, "write a jax.profiler trace of search iterations from this one "
                         "(into <search output>/profile; phases annotated: select, generate, execute, grade, score, "
                         "backup); -1: off")
    flags.DEFINE_integer("search_profile_iterations", 3, "search iterations in the profiler trace")
    flags.DEFINE_float("score_cache_mib", DEFAULT_SCORE_CACHE_MIB, "host memory (MiB, each host) for the PPM's "
                       "keys/values of tree nodes, so a child's score runs only its new step; the least recently "
                       "used are dropped past it (0: off, each child runs with its prompt and path)", lower_bound=0)
    flags.DEFINE_float("policy_cache_mib", DEFAULT_POLICY_CACHE_MIB, "host memory (MiB, each host) for the policy's "
                       "keys/values of expanded tree nodes, so expanding a child prefills only its new step; the "
                       "least recently used are dropped past it (0: off, each expansion prefills prompt and path)",
                       lower_bound=0)


def tfds_dirs() -> dict[str, str | None]:
    """Where `tfds:` and `pool:` problem sets are built and read from (keyword arguments of `load_benchmark`)."""
    return {"data_dir": flags.FLAGS.tfds_data_dir, "manual_dir": flags.FLAGS.tfds_manual_dir}


def search_profile() -> tuple[int, int]:
    return flags.FLAGS.search_profile_start, flags.FLAGS.search_profile_iterations


def cache_budgets() -> dict[str, float]:
    """The host key/value stores of search and evaluation, as keyword arguments of `run_search`/`evaluate`."""
    return {"score_cache_mib": flags.FLAGS.score_cache_mib, "policy_cache_mib": flags.FLAGS.policy_cache_mib}


def check_model_dirs(*names: str) -> None:
    """The model directories of the flags `names` (those given) hold what loading them needs, checked before
    anything is written; an InputError names the flag and the problem."""
    from rstar_jax.errors import InputError
    from rstar_jax.models.hf_io import check_hf_dir
    for name in names:
        if flags.FLAGS[name].value:
            try:
                check_hf_dir(flags.FLAGS[name].value)
            except InputError as e:
                raise InputError(f"--{name}: {e}") from None


def search_mesh_shape() -> tuple[int, int, int]:
    return tuple(int(v) for v in flags.FLAGS.search_mesh)  # checked when the flags were parsed


def search_config(**overrides) -> SearchConfig:
    """SearchConfig from the flags; a bad value raises ValueError naming the flag."""
    values = {f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(SearchConfig)
              if f.name != "prompt_prefix"}
    if flags.FLAGS.prompt_prefix_file:
        try:
            with open(flags.FLAGS.prompt_prefix_file, encoding="utf-8") as f:
                values["prompt_prefix"] = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompt_prefix_file={flags.FLAGS.prompt_prefix_file}: {e}") from None
    try:
        return SearchConfig(**{**values, **overrides})
    except ValueError as e:  # its messages start with the field's name, which is the flag's
        raise ValueError(f"--{e}") from None


def extract_config() -> ExtractConfig:
    """ExtractConfig from the flags; a bad value raises ValueError naming the flag."""
    try:
        return ExtractConfig(**{f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(ExtractConfig)})
    except ValueError as e:
        raise ValueError(f"--{e}") from None
