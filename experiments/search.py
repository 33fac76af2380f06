"""The search stage alone: problems and a policy (+ PPM) in, tree records and extracted training data out.

  python -m experiments.search --problems=pool.jsonl --policy=/ckpt/policy --out=runs/r1/trees --rollouts=8
  python -m experiments.search --problems=pool.jsonl --policy=/ckpt/policy --ppm=/ckpt/ppm --mode=ppm --out=r3

Writes `OUT/trees.jsonl` (one record per finished search; `trees.process_<i>.jsonl` per host when
several processes run) and, in the data-generation modes, `OUT/extracted/` (sft, pairs, pqm, orm, ...
JSONL and stats.json). Re-running the same command skips the searches already written, so an
interrupted run resumes where it stopped, with any number of processes (the searches in every
`trees*.jsonl` count); different search settings on the same OUT are refused.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import time

from absl import app, flags

from experiments import multihost, search_flags
from experiments.usage import check_usage, run
from rstar_jax.errors import InputError

FLAGS = flags.FLAGS


def define_flags() -> None:
    search_flags.define()
    for module in (search_flags, multihost):  # absl's --help lists the main module's flags only
        flags.adopt_module_key_flags(module)
    flags.DEFINE_string("problems", None, "problems: a JSONL/JSON file, tfds:<benchmark>, or pool:<preset>:<files> "
                        "(a training pool, e.g. pool:numinamath:/data/numina/*.jsonl)")
    flags.DEFINE_integer("limit", 0, "search only the first N problems (0 = all)", lower_bound=0)
    flags.DEFINE_string("policy", None, "policy: HF directory (safetensors + config + tokenizer)")
    flags.DEFINE_string("ppm", None, "reward model: HF directory with the value head (modes ppm, inference)")
    flags.DEFINE_string("out", None, "output directory")
    flags.DEFINE_bool("extract", True, "extract SFT data and preference pairs after the search (terminal, ppm modes)")
    flags.DEFINE_float("progress_every_s", 30.0, "seconds between progress lines")


def load_problem_set(spec: str, limit: int = 0, *, data_dir: str | None = None, manual_dir: str | None = None,
                     flag: str = "problems") -> list[dict]:
    """The problems of `spec` (--problems): a JSONL/JSON file; `tfds:<benchmark>`; or `pool:<preset>:<files>`,
    a training pool of a file, folder or glob mapped by a `POOL_PRESETS` entry (`pool:numinamath:/data/*.jsonl`).
    The TFDS ones are built once into `data_dir` (a pool's name is a digest of its preset and files); a benchmark's
    source file comes from `manual_dir`, else its public copy (`search_flags.tfds_dirs()`: the flags).
    Bad or empty input raises an InputError that starts with `--{flag}={spec}`."""
    from rstar_jax.data import load_benchmark, load_problems
    from rstar_jax.data.problem_pool import POOL_PRESETS, open_problem_pool, pool_manifest

    def load():
        if spec.startswith("tfds:"):
            return load_benchmark(spec[len("tfds:"):], data_dir=data_dir, manual_dir=manual_dir)
        if spec.startswith("pool:"):
            preset, _, files = spec[len("pool:"):].partition(":")
            if preset not in POOL_PRESETS or not files:
                raise InputError(f"expected pool:<preset>:<files> with a preset of {', '.join(POOL_PRESETS)}")
            digest = hashlib.sha256(json.dumps([preset, pool_manifest(files)]).encode()).hexdigest()[:12]
            source = open_problem_pool(files, name=f"{preset}_{digest}", preset=preset, data_dir=data_dir)
            return source[:limit or len(source)]
        return load_problems(spec)

    try:
        try:
            problems = load()
        except FileExistsError:  # another host built the same set into the shared data dir first: read that
            problems = load()
    except (OSError, ValueError) as e:
        raise InputError(f"--{flag}={spec}: {e}") from e
    if not problems:
        raise InputError(f"--{flag}={spec}: no problems in it")
    return problems[:limit] if limit else problems


def load_scorer(hf_dir: str, max_tokens: int, mesh=None, cache_mib: float = search_flags.DEFAULT_SCORE_CACHE_MIB):
    from rstar_jax.models.pretrained import load_reward_model
    from rstar_jax.sampling import default_concurrent_calls
    from rstar_jax.search.scoring import Scorer
    tokenizer, ppm = load_reward_model(hf_dir, mesh=mesh)
    return Scorer(ppm, lambda text: tokenizer.encode(text, add_special_tokens=False),
                  pad_id=tokenizer.pad_token_id or 0, max_tokens=max_tokens,
                  concurrent_calls=default_concurrent_calls(mesh), cache_mib=cache_mib)


def local_mesh(shape: tuple[int, int, int] = (1, 1, 1)):
    """A mesh over this host's devices for search (None for one device: plain single-device arrays)."""
    import jax
    import numpy as np

    from rstar_jax import parallel
    if tuple(shape) == (1, 1, 1):
        return None
    devices = jax.local_devices()
    if -1 not in shape:  # a fixed mesh smaller than the host uses its first devices
        devices = devices[:int(np.prod(shape))]
    return parallel.make_mesh(parallel.MeshConfig(*shape), devices=devices)


def still_to_search(config, problems: list[dict], out_dir: str, name: str
                    ) -> tuple[list[dict], set[tuple[str, int]]]:
    """The problems with a search not yet in any `trees*.jsonl` of `out_dir` (written by any process of any
    earlier run, whatever their number), and the (problem id, seed) pairs already there. `name`: this
    process's file (settings saved with it). Every process must read before any writes (a barrier after)."""
    from rstar_jax.search.driver import read_all_finished
    finished = read_all_finished(os.path.join(out_dir, name), config,
                                 sorted(glob.glob(os.path.join(out_dir, "trees*.jsonl"))))
    seeds = range(config.seed, config.seed + config.runs)
    return [p for p in problems if any((p["id"], s) not in finished for s in seeds)], finished


def run_search(config, problems: list[dict], policy_dir: str, ppm_dir: str | None, out_dir: str, *,
               extract_config=None, progress=print, progress_every_s: float = 30.0,
               mesh_shape: tuple[int, int, int] = (1, 1, 1), profile: tuple[int, int] = (-1, 3),
               score_cache_mib: float = search_flags.DEFAULT_SCORE_CACHE_MIB,
               policy_cache_mib: float = search_flags.DEFAULT_POLICY_CACHE_MIB) -> dict:
    """Search this host's share of the `problems` not yet searched (`still_to_search`) into `out_dir` (policy
    and PPM on a mesh of this host's devices of `mesh_shape`), then (process 0) extract the training data.
    `profile`: (first iteration, iterations) of a profiler trace into out_dir/profile (-1: none);
    `score_cache_mib`, `policy_cache_mib`: the PPM's and the policy's `ContextStore`s."""
    import jax

    from experiments.stages import barrier
    from rstar_jax import parallel
    from rstar_jax.models.pretrained import load_policy
    from rstar_jax.search.driver import SearchDriver
    from rstar_jax.search.extract import extract_files, write_extracted
    from rstar_jax.verify.grader import Grader
    from rstar_jax.verify.sandbox import Sandbox
    os.makedirs(out_dir, exist_ok=True)
    name = "trees.jsonl" if jax.process_count() == 1 else f"trees.process_{jax.process_index()}.jsonl"
    # The split is over what no earlier run (at any process count) searched: each search in one file only.
    todo, finished = still_to_search(config, problems, out_dir, name)
    barrier("search resume read")  # every process sees the same files before any appends to its own
    if finished:
        progress(f"resuming: {len(problems) - len(todo)}/{len(problems)} problems already searched in {out_dir}")
    mesh = local_mesh(mesh_shape)
    tokenizer, model = load_policy(policy_dir, mesh=mesh)
    scorer = (load_scorer(ppm_dir, config.max_context_tokens, mesh, score_cache_mib)
              if ppm_dir and config.uses_ppm else None)
    with Sandbox(timeout_s=config.exec_timeout_s) as sandbox, Grader() as grader:
        driver = SearchDriver(config, model, tokenizer, sandbox=sandbox, grader=grader, scorer=scorer, mesh=mesh,
                              progress=progress, progress_every_s=progress_every_s,
                              profile_dir=os.path.join(out_dir, "profile"), profile_start=profile[0],
                              profile_iterations=profile[1], policy_cache_mib=policy_cache_mib)
        stats = driver.run(parallel.host_shard(todo), os.path.join(out_dir, name), finished)
    barrier("search finished")
    if extract_config is not None and config.mode != "inference" and jax.process_index() == 0:
        extracted = extract_files(sorted(glob.glob(os.path.join(out_dir, "trees*.jsonl"))), extract_config)
        write_extracted(extracted, os.path.join(out_dir, "extracted"))
        stats["extracted"] = {k: len(getattr(extracted, k)) for k in ("sft", "pairs", "pqm", "orm")}
        stats["coverage"] = extracted.stats.get("solved_fraction")
    return stats


def main(argv):
    check_usage(argv, "problems", "policy", "out")
    try:
        config = search_flags.search_config()
        extract_config = search_flags.extract_config() if FLAGS.extract else None
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if config.uses_ppm and not FLAGS.ppm:
        raise app.UsageError(f"--mode={config.mode} needs --ppm (a reward model directory)")
    search_flags.check_model_dirs("policy", "ppm")
    multihost.initialize()
    start = time.perf_counter()
    problems = load_problem_set(FLAGS.problems, FLAGS.limit, **search_flags.tfds_dirs())
    stats = run_search(config, problems, FLAGS.policy, FLAGS.ppm, FLAGS.out,
                       extract_config=extract_config,
                       progress_every_s=FLAGS.progress_every_s, mesh_shape=search_flags.search_mesh_shape(),
                       profile=search_flags.search_profile(), **search_flags.cache_budgets())
    print(json.dumps({**stats, "total_s": round(time.perf_counter() - start, 1)}, default=str))


if __name__ == "__main__":
    define_flags()
    run(main)
