"""Evaluate a policy (and a reward model) on a problem set: greedy, majority vote, best-of-N, step beam
search and PPM-guided MCTS at several N, with bootstrap intervals, tokens and wall time.

  python -m experiments.evaluate --problems=tfds:math500 --policy=runs/r4/policy/hf \
      --reward_model=runs/r4/ppm/hf --methods=greedy,majority,best_of_n,mcts --ns=1,4,16,64 --out=eval/r4

Writes into --out: `summary.json` (schema in the README, section Evaluation), `report.md`, `scaling.png`
(accuracy vs N per method) and the raw results it resumes from: `methods/<method>.json` per finished
method and `mcts/trees.jsonl` (one inference search per problem and seed; an interrupted run continues
where it stopped). The MCTS settings are the search flags (`--rollouts`, `--num_candidates`, ...; the mode
is always `inference`, with max(--ns) independent searches per problem); sampling settings
(`--temperature`, `--top_p`, `--max_step_tokens`, `--max_context_tokens`, `--exec_timeout_s`) apply to every
method. Smaller N reuse the first N samples / searches of the largest, so every N is measured on the same
draws; their wall time is the largest run's, apportioned by generated tokens.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence

from absl import app, flags

from experiments import multihost, search_flags
from experiments.stages import write_json_atomic
from experiments.usage import check_usage, positive_ints, run
from rstar_jax.errors import InputError

METHODS = ("greedy", "majority", "best_of_n", "beam", "mcts")
NEEDS_REWARD_MODEL = ("best_of_n", "beam", "mcts")
SELECTIONS = ("top_score", "majority_of_top_k", "weighted_vote")
FLAGS = flags.FLAGS


def define_flags() -> None:
    search_flags.define()
    for module in (search_flags, multihost):  # absl's --help lists the main module's flags only
        flags.adopt_module_key_flags(module)
    flags.DEFINE_string("problems", None, "problem set: JSONL/JSON file, tfds:<benchmark>, or "
                        "pool:<preset>:<files>")
    flags.DEFINE_string("set_name", None, "name of the set in the report (default: from --problems)")
    flags.register_validator("set_name", lambda v: v is None or bool(v.strip()),
                             "--set_name must not be empty (leave it out for the default)")
    flags.DEFINE_integer("limit", 0, "evaluate the first N problems (0 = all)", lower_bound=0)
    flags.DEFINE_string("policy", None, "policy: HF directory")
    flags.DEFINE_string("reward_model", None, "PPM / ORM HF directory (best_of_n, beam, mcts)")
    flags.DEFINE_list("methods", ["greedy", "majority", "mcts"], f"any of {', '.join(METHODS)}")
    flags.register_validator("methods", bool, "--methods must name at least one method")
    flags.DEFINE_list("ns", ["1", "2", "4", "8"], "N values: samples (majority, best_of_n), searches (mcts)")
    flags.register_validator("ns", positive_ints, "--ns must be positive integers, e.g. 1,4,8")
    flags.DEFINE_list("selections", list(SELECTIONS), "MCTS answer selections over the N searches")
    # Bounded here, so that a bad value stops the run before any generation, not after it.
    flags.DEFINE_integer("vote_top_k", 4, "k of majority_of_top_k", lower_bound=1)
    flags.DEFINE_integer("beam_width", 8, "step beam search width (samples per entry: --num_candidates)",
                         lower_bound=1)
    flags.DEFINE_integer("bootstrap", 1000, "bootstrap resamples of the 95% interval", lower_bound=1)
    flags.DEFINE_string("out", None, "output directory")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What to evaluate; everything that changes a result is in `digest`."""

    methods: tuple[str, ...] = ("greedy",)
    ns: tuple[int, ...] = (1,)
    selections: tuple[str, ...] = SELECTIONS
    vote_top_k: int = 4
    beam_width: int = 8
    bootstrap: int = 1000

    def __post_init__(self):
        # Checked here, before anything runs: the settings are first used after generation and search.
        if not self.methods:
            raise ValueError(f"no methods; expected any of {METHODS}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; expected any of {METHODS}")
        if not self.ns or any(n < 1 for n in self.ns):
            raise ValueError(f"ns must be positive integers, got {self.ns}")
        bad = [s for s in self.selections if s not in SELECTIONS]
        if bad:
            raise ValueError(f"unknown selection(s) {bad}; expected any of {SELECTIONS}")
        small = [f"{name}={getattr(self, name)}" for name in ("vote_top_k", "beam_width", "bootstrap")
                 if getattr(self, name) < 1]
        if small:
            raise ValueError(f"{', '.join(small)} must be >= 1")


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_mcts_models(out_dir: str, policy_dir: str, reward_dir: str) -> None:
    """The MCTS trees resume by search settings only, so pin the models they were searched with
    (`mcts/models.json`): other models on the same `out_dir` are refused, before anything is loaded."""
    models = {"policy": policy_dir, "reward_model": reward_dir}
    marker = os.path.join(out_dir, "mcts", "models.json")
    if os.path.exists(marker) and os.path.exists(os.path.join(out_dir, "mcts", "trees.jsonl")):
        with open(marker) as f:
            saved = json.load(f)
        if saved != models:
            raise ValueError(f"{out_dir}/mcts/trees.jsonl holds searches by policy {saved['policy']} with reward "
                             f"model {saved['reward_model']}, not {policy_dir} with {reward_dir}; "
                             f"use another --out (or remove that directory)")
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    write_json_atomic(marker, models)


CHUNK_PROBLEMS = 64  # problems a method runs on at a time: the unit of progress lines and of resuming


def _cached(path: str, digest: str, problems: Sequence[dict], compute: Callable[[Sequence[dict]], list],
            progress) -> dict:
    """A method's raw results {"pools": per problem, "wall_s"}: from `path` when written with the same settings,
    else computed `CHUNK_PROBLEMS` problems at a time (`compute(chunk)` -> their pools; every problem draws from
    its own streams, so chunks change nothing), each chunk appended to `<path>.partial.jsonl` (a rerun after a
    kill keeps them), then saved whole."""
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("digest") == digest:
            progress(f"evaluate: reusing {path}")
            return saved
    partial = path + ".partial.jsonl"
    pools, wall_s = _read_partial(partial, digest)
    if pools:
        progress(f"evaluate: resuming {os.path.basename(path)}: {len(pools)}/{len(problems)} problems done")
    else:
        with open(partial, "w") as f:
            f.write(json.dumps({"digest": digest}) + "\n")
    todo = [p for p in problems if p["id"] not in pools]
    start, done = time.perf_counter(), len(problems) - len(todo)
    for i in range(0, len(todo), CHUNK_PROBLEMS):
        chunk = todo[i:i + CHUNK_PROBLEMS]
        t = time.perf_counter()
        chunk_pools = compute(chunk)
        line = {"ids": [p["id"] for p in chunk], "pools": chunk_pools, "wall_s": time.perf_counter() - t}
        with open(partial, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        pools.update(zip(line["ids"], chunk_pools))
        wall_s += line["wall_s"]
        done += len(chunk)
        rate = (i + len(chunk)) / (time.perf_counter() - start)
        if done < len(problems):
            progress(f"evaluate: {os.path.basename(path)}: {done}/{len(problems)} problems, {rate:.2f} problems/s, "
                     f"ETA {(len(problems) - done) / rate:.0f}s")
    result = {"pools": [pools[p["id"]] for p in problems], "digest": digest, "wall_s": wall_s}
    write_json_atomic(path, result)
    os.remove(partial)
    return result


def _read_partial(path: str, digest: str) -> tuple[dict, float]:
    """The pools by problem id and their seconds in a partial file of these settings (a torn last line, the
    write a kill cut short, is dropped); ({}, 0) when there is none."""
    pools, wall_s = {}, 0.0
    if not os.path.exists(path):
        return pools, wall_s
    with open(path) as f:
        lines = f.read().split("\n")[:-1]  # the text after the last newline is a torn write
    if not lines or json.loads(lines[0]).get("digest") != digest:
        return {}, 0.0
    for line in lines[1:]:
        row = json.loads(line)
        pools.update(zip(row["ids"], row["pools"]))
        wall_s += row["wall_s"]
    return pools, wall_s


def evaluate(problems: Sequence[dict], *, set_name: str, policy_dir: str, reward_dir: str | None, out_dir: str,
             spec: EvalSpec, search_config, mesh_shape: tuple[int, int, int] = (1, 1, 1),
             progress: Callable[[str], None] = print,
             score_cache_mib: float = search_flags.DEFAULT_SCORE_CACHE_MIB,
             policy_cache_mib: float = search_flags.DEFAULT_POLICY_CACHE_MIB) -> dict:
    """Runs every method of `spec` and writes summary.json, report.md and scaling.png into out_dir (the
    models on a mesh of this host's devices of `mesh_shape`; the reward model's and the step-level policy's
    (MCTS, beam search) `ContextStore`s of `score_cache_mib` and `policy_cache_mib`)."""
    from experiments.search import load_scorer, local_mesh
    from rstar_jax.eval import report, selection
    from rstar_jax.models.pretrained import load_policy
    from rstar_jax.sampling import Sampler
    from rstar_jax.search import baselines
    from rstar_jax.search.driver import SearchDriver
    from rstar_jax.search.tree_record import read_tree_records
    from rstar_jax.verify.grader import Grader
    from rstar_jax.verify.sandbox import Sandbox

    if not problems:
        raise InputError(f"{set_name}: no problems to evaluate")
    missing = [m for m in spec.methods if m in NEEDS_REWARD_MODEL and not reward_dir]
    if missing:
        raise ValueError(f"method(s) {missing} need a reward model (--reward_model)")
    os.makedirs(os.path.join(out_dir, "methods"), exist_ok=True)
    if "mcts" in spec.methods:
        _check_mcts_models(out_dir, policy_dir, reward_dir)
    cfg = search_config
    base = baselines.BaselineConfig(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                    max_step_tokens=cfg.max_step_tokens, max_context_tokens=cfg.max_context_tokens,
                                    exec_timeout_s=cfg.exec_timeout_s, seed=cfg.seed, beam_width=spec.beam_width,
                                    samples_per_beam=cfg.num_candidates, max_depth=cfg.max_depth,
                                    prompt_prefix=cfg.prompt_prefix)
    ids = [p["id"] for p in problems]
    difficulties = [p.get("difficulty", p.get("level")) for p in problems]  # MATH-500 has levels 1-5
    max_n = max(spec.ns)
    mesh = local_mesh(mesh_shape)
    tokenizer, model = load_policy(policy_dir, mesh=mesh)
    scorer = load_scorer(reward_dir, cfg.max_context_tokens, mesh, score_cache_mib) if reward_dir else None
    rows = []

    def add(method: str, n: int, chosen: Sequence[dict | None], tokens: float, wall_s: float, **extra) -> None:
        """extra: fields only some methods have (`reward_auc` where the reward model chooses)."""
        rows.append(report.make_row(set_name, method, n, [selection.is_correct(t) for t in chosen], difficulties,
                                    tokens, wall_s, bootstrap=spec.bootstrap, seed=cfg.seed) | extra)
        progress(f"evaluate: {set_name} {method} N={n}: {100 * rows[-1]['accuracy']:.1f}%")

    def digest(method: str, **extra) -> str:
        return _digest(method, ids, policy_dir, reward_dir, dataclasses.asdict(base), extra)

    with Sandbox(timeout_s=cfg.exec_timeout_s) as sandbox, Grader() as grader:
        block = baselines.block_sampler(model, tokenizer, mesh=mesh)
        if "greedy" in spec.methods:
            raw = _cached(os.path.join(out_dir, "methods", "greedy.json"), digest("greedy"), problems, lambda chunk:
                          baselines.greedy(block, tokenizer, chunk, sandbox=sandbox, grader=grader, config=base),
                          progress)
            add("greedy", 1, [pool[0] for pool in raw["pools"]], sum(p[0]["num_tokens"] for p in raw["pools"]),
                raw["wall_s"])

        wants = [m for m in ("majority", "best_of_n") if m in spec.methods]
        if wants:  # one pool of max(N) samples for both, scored when best-of-N needs it
            use_scorer = "best_of_n" in wants
            raw = _cached(os.path.join(out_dir, "methods", "samples.json"), digest("samples", n=max_n,
                                                                                   scored=use_scorer), problems,
                          lambda chunk: baselines.sample_solutions(block, tokenizer, chunk, max_n, sandbox=sandbox,
                                                                   grader=grader, scorer=scorer if use_scorer else None,
                                                                   config=base), progress)
            total = max(sum(t["num_tokens"] for pool in raw["pools"] for t in pool), 1)
            for n in spec.ns:
                pools = [pool[:n] for pool in raw["pools"]]
                tokens = sum(t["num_tokens"] for pool in pools for t in pool)
                if "majority" in wants:
                    add("majority", n, baselines.majority_vote(pools, grader=grader), tokens,
                        raw["wall_s"] * tokens / total)
                if "best_of_n" in wants:
                    add("best_of_n", n, baselines.best_of_n(pools), tokens, raw["wall_s"] * tokens / total,
                        reward_auc=report.ranking_auc(pools))

        if "beam" in spec.methods:
            step_sampler = Sampler.for_steps(model, tokenizer, mesh=mesh, cache_mib=policy_cache_mib)
            raw = _cached(os.path.join(out_dir, "methods", "beam.json"), digest("beam"), problems, lambda chunk:
                          baselines.step_beam_search(step_sampler, tokenizer, chunk, scorer=scorer, sandbox=sandbox,
                                                     grader=grader, config=base), progress)
            # Tokens of the finished trajectories (pruned branches are not counted).
            add("beam", spec.beam_width, [pool[0] if pool else None for pool in raw["pools"]],
                sum(t["num_tokens"] for pool in raw["pools"] for t in pool), raw["wall_s"])

        if "mcts" in spec.methods:
            mcts_cfg = dataclasses.replace(cfg, mode="inference", runs=max_n)
            trees = os.path.join(out_dir, "mcts", "trees.jsonl")
            os.makedirs(os.path.dirname(trees), exist_ok=True)
            start = time.perf_counter()
            driver = SearchDriver(mcts_cfg, model, tokenizer, sandbox=sandbox, grader=grader, scorer=scorer,
                                  mesh=mesh, progress=progress, policy_cache_mib=policy_cache_mib)
            driver.run(list(problems), trees)
            wall = time.perf_counter() - start  # this invocation's share when it resumed
            runs = report.run_answers(read_tree_records(trees))
            pools_all = [runs.get(pid, []) for pid in ids]
            total = max(sum(t["num_tokens"] for pool in pools_all for t in pool), 1)
            for n in spec.ns:
                pools = [pool[:n] for pool in pools_all]
                tokens = sum(t["num_tokens"] for pool in pools for t in pool)
                auc = report.ranking_auc(pools)  # the same answers for every selection rule
                for rule in spec.selections:
                    params = {"k": spec.vote_top_k} if rule == "majority_of_top_k" else {}
                    add(f"mcts/{rule}", n, selection.select(pools, rule, grader=grader, **params), tokens,
                        wall * tokens / total, reward_auc=auc)

    summary = {"schema": report.SCHEMA, "set": set_name, "policy": policy_dir, "reward_model": reward_dir,
               "search_config": dataclasses.asdict(cfg), "spec": dataclasses.asdict(spec), "problem_ids": ids,
               "rows": rows}
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    table = report.markdown_table(rows)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(f"# {set_name}: {len(problems)} problems\n\npolicy `{policy_dir}`, reward model `{reward_dir}`\n\n"
                f"{table}\n")
    if len(spec.ns) > 1:
        from rstar_jax.eval import plots
        plots.scaling_curve(rows, os.path.join(out_dir, "scaling.png"), title=set_name)
    progress(table)
    return summary


def main(argv):
    check_usage(argv, "problems", "policy", "out")
    try:
        spec = EvalSpec(methods=tuple(FLAGS.methods), ns=tuple(int(n) for n in FLAGS.ns),
                        selections=tuple(FLAGS.selections), vote_top_k=FLAGS.vote_top_k,
                        beam_width=FLAGS.beam_width, bootstrap=FLAGS.bootstrap)
    except ValueError as exc:
        raise app.UsageError(f"--methods/--ns/--selections: {exc}") from None
    try:
        search_config = search_flags.search_config(mode="inference")
    except ValueError as exc:
        raise app.UsageError(str(exc)) from None
    if any(m in NEEDS_REWARD_MODEL for m in spec.methods) and not FLAGS.reward_model:
        raise app.UsageError(f"--methods={','.join(spec.methods)} needs --reward_model (a PPM or ORM directory)")
    search_flags.check_model_dirs("policy", "reward_model")
    import jax
    multihost.initialize()
    if jax.process_count() > 1:  # every process would evaluate every problem into the same files
        raise app.UsageError(f"experiments.evaluate runs as one process (its devices: --search_mesh); this job has "
                             f"{jax.process_count()}: start it without a multi-process launcher")
    from experiments.search import load_problem_set
    problems = load_problem_set(FLAGS.problems, FLAGS.limit, **search_flags.tfds_dirs())
    set_name = FLAGS.set_name or os.path.splitext(os.path.basename(FLAGS.problems.split(":")[-1]))[0]
    evaluate(problems, set_name=set_name, policy_dir=FLAGS.policy, reward_dir=FLAGS.reward_model, out_dir=FLAGS.out,
             spec=spec, search_config=search_config,
             mesh_shape=search_flags.search_mesh_shape(), **search_flags.cache_budgets())


if __name__ == "__main__":
    define_flags()
    run(main)
