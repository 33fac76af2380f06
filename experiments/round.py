"""One self-evolution round of rStar-Math into a run directory: search -> policy SFT -> PPM -> evaluation.

  python -m experiments.round --flagfile=experiments/configs/miniature/round1.flags   # the miniature, round 1
  python -m experiments.round --run_dir=runs/r --round=2 --problems=pool.jsonl --base_model=/ckpt/base ...

Stages, each skipped once complete (re-running the same command resumes where it stopped):
  miniature/data, miniature/base   only with --problems=miniature / --base_model=miniature: the generated
                                   problems and the miniature's base model, SFT-trained on a noisy teacher
  round_<k>/search                 MCTS over the pool with the round's policy (and PPM); trees + extracted data
  round_<k>/policy                 SFT of the *base* model on the round's verified trajectories
  round_<k>/ppm                    the PPM: the new policy (round 1: the base model) + a value head, trained on
                                   the preference pairs (--reward_models adds round_<k>/pqm and round_<k>/orm)
  base_eval, round_<k>/eval        experiments.evaluate of the base model (once) and of the new policy with its
                                   PPM (--eval_methods); report.md, and rounds.md over the rounds so far
The round's search policy is --policy, else the previous round's policy (round 1: the base model); its
PPM is --ppm, else the previous round's (used by --mode=ppm). The flags are saved in the run
directory (the base model, the evaluation set and the miniature's flags for the whole run); a later
invocation with different result-shaping flags is refused. Flags and inputs are checked before anything is
written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from absl import app, flags

from experiments import multihost, search_flags, stages, train_common
from experiments.usage import check_usage, positive_ints, run
from rstar_jax.errors import InputError
from rstar_jax.models.config import PRESETS
from rstar_jax.search.config import SearchConfig

FLAGS = flags.FLAGS
REWARD_MODELS = ("ppm", "pqm", "orm")
ROUNDS_SCHEMA = "rstar_jax.rounds/1"
# Flags that do not change results: they may differ between invocations on one run directory (the memory
# savers and the meshes too, so a stage that ran out of memory, or a job restarted on other devices, resumes).
_FREE_FLAGS = ("progress_every_s", "batch_size", "sft_log_every", "ppm_log_every", "sft_profile_start",
               "ppm_profile_start", "sft_profile_steps", "ppm_profile_steps", "search_profile_start",
               "search_profile_iterations", "profile", "dry_run", "dry_run_devices", "device_memory_gib",
               "model_preset", "search_mesh", "sft_mesh", "ppm_mesh", "sft_remat", "ppm_remat", "sft_loss_chunk",
               "score_cache_mib", "policy_cache_mib")


def define_flags() -> None:
    search_flags.define()
    train_common.define_flags("sft_", reward=False)
    train_common.define_flags("ppm_")
    for module in (search_flags, train_common, multihost):  # absl's --help lists the main module's flags only
        flags.adopt_module_key_flags(module)
    flags.DEFINE_string("run_dir", None, "run directory (all rounds of one run)")
    flags.DEFINE_integer("round", 1, "which round to run (1..4)")
    flags.DEFINE_string("problems", "miniature", "training pool: JSONL/JSON file, pool:<preset>:<files> (e.g. "
                        "pool:numinamath:/data/numina/*.jsonl), tfds:<benchmark>, or miniature")
    flags.DEFINE_string("eval_problems", "miniature", "evaluation problems (with an optional 'difficulty' field): "
                        "JSONL/JSON file, tfds:<name>, or miniature")
    flags.DEFINE_integer("limit", 0, "use the first N pool problems (0 = all)", lower_bound=0)
    flags.DEFINE_string("base_model", "miniature", "HF directory of the base model (SFT starts from it every "
                        "round), or miniature")
    flags.DEFINE_string("policy", None, "search policy (HF dir); default: the previous round's, round 1: the base")
    flags.DEFINE_string("ppm", None, "search reward model (HF dir); default: the previous round's PPM")
    flags.DEFINE_list("reward_models", ["ppm"], "reward models trained each round, from the round's policy (round 1: "
                      "the base model) with the --ppm_* settings: ppm (always), and for the paper's ablations pqm "
                      "(Q-value regression) and orm (outcome), into round_<k>/pqm and round_<k>/orm")
    flags.DEFINE_integer("miniature_pool", 256, "miniature: training pool size", lower_bound=1)
    flags.DEFINE_integer("miniature_eval_per_difficulty", 20, "miniature: evaluation problems per difficulty",
                         lower_bound=1)
    flags.DEFINE_integer("miniature_teacher_solutions", 20000, "miniature: noisy-teacher solutions for the base",
                         lower_bound=1)
    flags.DEFINE_list("miniature_eval_difficulties", [str(d) for d in range(1, 8)],
                      "miniature: difficulties (operations, 1..7) of the evaluation sets")
    flags.register_validator("miniature_eval_difficulties",
                             lambda v: bool(v) and all(d.strip() in {str(x) for x in range(1, 8)} for d in v),
                             "--miniature_eval_difficulties must be one or more of 1..7")
    # Many small steps: copying the question's numbers into the code appears after thousands of updates
    # whatever the batch size (64 x 400 steps learns nothing of it), and a CPU step costs about its tokens.
    flags.DEFINE_integer("miniature_base_steps", 3000, "miniature: SFT steps of the base model", lower_bound=1)
    flags.DEFINE_integer("miniature_base_batch_size", 4, "miniature: rows per SFT step of the base model",
                         lower_bound=1)
    flags.DEFINE_float("miniature_base_learning_rate", 1e-3, "miniature: peak learning rate of the base model")
    flags.register_validator("miniature_base_learning_rate", lambda v: v > 0,
                             "--miniature_base_learning_rate must be positive")
    flags.DEFINE_integer("miniature_seed", 0, "miniature: seed of the problems, the teacher and the base model")
    flags.DEFINE_integer("eval_max_problems", 0, "evaluate on at most N problems (0 = all)", lower_bound=0)
    flags.DEFINE_list("eval_methods", ["greedy"], "evaluation of the round's policy (the base model: its greedy and "
                      "majority only): greedy, majority, best_of_n, beam, mcts (with the round's PPM)")
    flags.DEFINE_list("eval_ns", ["1"], "evaluation N: samples (majority, best_of_n) and searches (mcts)")
    flags.register_validator("eval_ns", positive_ints, "--eval_ns must be positive integers, e.g. 1,4")
    flags.DEFINE_integer("eval_num_candidates", 0, "evaluation MCTS candidates per step (0 = --num_candidates)",
                         lower_bound=0)
    flags.DEFINE_integer("eval_rollouts", 0, "evaluation MCTS rollouts per search (0 = --rollouts)", lower_bound=0)
    flags.DEFINE_float("progress_every_s", 30.0, "seconds between search progress lines", lower_bound=0)
    flags.DEFINE_bool("profile", False, "profiler traces of search iterations 2-4 (round_<k>/search/profile) and of "
                      "training steps 2-4 (round_<k>/{policy,ppm}/profile), unless their own flags say otherwise")
    flags.DEFINE_bool("dry_run", False, "print the per-device memory plan of search and training on the target "
                      "mesh (fake CPU devices, abstract arrays) and exit; nothing is written")
    flags.DEFINE_integer("dry_run_devices", 8, "--dry_run: devices of the target (training mesh; the search mesh is "
                         "per host)", lower_bound=1)
    flags.DEFINE_float("device_memory_gib", 0.0, "--dry_run: memory per device, to say whether each stage fits "
                       "(0: not said)", lower_bound=0)
    flags.DEFINE_enum("model_preset", None, sorted(PRESETS), "--dry_run: the base model's shapes when its directory "
                      "is not there yet")


# ---- the miniature ---------------------------------------------------------------------------------

def miniature_data(stage_dir: str) -> dict:
    from rstar_jax import tokenizer as tk
    from rstar_jax.data import miniature
    seed = FLAGS.miniature_seed
    pool = miniature.make_pool(FLAGS.miniature_pool, seed)
    difficulties = [int(d) for d in FLAGS.miniature_eval_difficulties]
    evals = miniature.make_eval_set(FLAGS.miniature_eval_per_difficulty, seed, difficulties)
    corpus = miniature.teacher_corpus(FLAGS.miniature_teacher_solutions, seed)
    teacher = [{"id": p["id"], "prompt": tk.format_prompt(p["question"]), "response": text} for p, text, _ in corpus]
    for name, rows in (("pool", pool), ("eval", evals), ("teacher_sft", teacher)):
        stages.write_jsonl_atomic(os.path.join(stage_dir, f"{name}.jsonl"), rows)
    tk.build_sentencepiece_tokenizer([r["prompt"] + r["response"] for r in teacher[:5000]],
                                     os.path.join(stage_dir, "tokenizer"), vocab_size=1024, seed=seed)
    return {"pool": len(pool), "eval": len(evals), "teacher_solutions": len(teacher),
            "teacher_correct": sum(ok for _, _, ok in corpus) / max(len(corpus), 1)}


def miniature_base(data_dir: str, stage_dir: str) -> dict:
    cfg = train_common.TrainStageConfig(
        train_records=(os.path.join(data_dir, "teacher_sft.jsonl"),), out_dir=stage_dir, preset="tiny",
        tokenizer_dir=os.path.join(data_dir, "tokenizer"), max_len=512, overlength="truncate",
        batch_size=FLAGS.miniature_base_batch_size, max_steps=FLAGS.miniature_base_steps,
        learning_rate=FLAGS.miniature_base_learning_rate, schedule="cosine",
        warmup_steps=min(20, FLAGS.miniature_base_steps // 10), weight_decay=0.0, seed=FLAGS.miniature_seed,
        checkpoint_every=500, log_every=100)
    return train_common.run_training("sft", cfg)


# ---- one round ----------------------------------------------------------------------------------------

def _problems(spec: str, miniature_file: str) -> list[dict]:
    from experiments.search import load_problem_set
    return load_problem_set(miniature_file if spec == "miniature" else spec, **search_flags.tfds_dirs())


def _eval_spec(methods) -> "EvalSpec":
    from experiments.evaluate import EvalSpec
    try:
        return EvalSpec(methods=tuple(methods), ns=tuple(int(n) for n in FLAGS.eval_ns))
    except ValueError as e:
        raise InputError(f"--eval_methods/--eval_ns: {e}") from None


def evaluate_model(stage_dir: str, problems: list[dict], policy: str, ppm: str | None, methods, *,
                   trained: bool) -> dict:
    """`experiments.evaluate` of one model on the evaluation set; the rows are the stage's summary. A policy the
    round trained sees the plain prompt it was trained on, not --prompt_prefix_file (the bootstrap model's)."""
    from experiments.evaluate import evaluate
    config = search_flags.search_config(mode="inference", num_candidates=FLAGS.eval_num_candidates or
                                        FLAGS.num_candidates, rollouts=FLAGS.eval_rollouts or FLAGS.rollouts,
                                        max_rollouts_unsolved=0, **({"prompt_prefix": ""} if trained else {}))
    summary = evaluate(problems, set_name=os.path.basename(FLAGS.eval_problems), policy_dir=policy, reward_dir=ppm,
                       out_dir=stage_dir, spec=_eval_spec(methods), search_config=config,
                       mesh_shape=search_flags.search_mesh_shape(), **search_flags.cache_budgets())
    return {"rows": [{k: v for k, v in r.items() if k != "correct"} for r in summary["rows"]]}


def _methods(summary: dict) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in summary["rows"]))


def coverage_by_difficulty(search_dir: str, problems: list[dict]) -> dict[str, float]:
    """Fraction of the pool's problems with a correct trajectory in the round's search, per difficulty."""
    import collections
    difficulty = {p["id"]: str(p.get("difficulty", "all")) for p in problems}
    solved = collections.defaultdict(list)
    with open(os.path.join(search_dir, "extracted", "buckets.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            solved[difficulty.get(row["id"], "all")].append(row["correct"] > 0)
    total = [ok for v in solved.values() for ok in v]
    return {"all": sum(total) / max(len(total), 1), **{d: sum(v) / len(v) for d, v in sorted(solved.items())}}


def _best(rows: list[dict], method: str) -> float | None:
    """Accuracy of `method` at its largest N (None when not evaluated)."""
    rows = [r for r in rows if r["method"] == method]
    return max(rows, key=lambda r: r["n"])["accuracy"] if rows else None


def round_report(run_dir: str, k: int) -> str:
    """rounds.md, rounds.json and plots of rounds 0 (the base model) .. k from the stages' summaries."""
    from rstar_jax.eval import plots
    rounds = [stages.load_done(os.path.join(run_dir, "base_eval"))] + [
        stages.load_done(os.path.join(run_dir, f"round_{j}", "eval")) for j in range(1, k + 1)]
    # A round started from given models (--policy, --ppm) may have no earlier rounds in this run directory.
    coverage = [None] + [(stages.load_done(os.path.join(run_dir, f"round_{j}", "search")) or {}).get(
        "coverage_by_difficulty") for j in range(1, k + 1)]
    methods = list(dict.fromkeys(r["method"] for summary in rounds if summary for r in summary["rows"]))
    series = {m: [_best(s["rows"], m) if s else None for s in rounds] for m in methods}
    out_dir = os.path.join(run_dir, f"round_{k}", "eval")
    plots.per_round(series, os.path.join(out_dir, "accuracy_per_round.png"), ylabel="accuracy (%)",
                    title="evaluation accuracy per round (largest N)")
    difficulties = sorted({d for c in coverage if c for d in c}, key=lambda d: (d != "all", d))
    plots.per_round({f"d={d}" if d != "all" else "all": [c.get(d) if c else None for c in coverage]
                     for d in difficulties}, os.path.join(out_dir, "coverage_per_round.png"),
                    ylabel="pool problems solved (%)", title="search coverage per round")
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"
    lines = [f"# Run {run_dir}: rounds 0-{k}", "", "Accuracy on the evaluation set (largest N of each method; "
             "round 0 = the base model), and the search's coverage of the training pool.", "",
             "| round | " + " | ".join(methods) + " | coverage |", "|---|" + "---|" * (len(methods) + 1)]
    for j, summary in enumerate(rounds):
        cov = coverage[j].get("all") if coverage[j] else None
        lines.append(f"| {j} | " + " | ".join(pct(series[m][j]) for m in methods) + f" | {pct(cov)} |")
    lines += ["", "![accuracy](accuracy_per_round.png) ![coverage](coverage_per_round.png)", "",
              "Per-method tables: `base_eval/report.md`, `round_<k>/eval/report.md`."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "rounds.md"), "w") as f:
        f.write(text)
    stages.write_json_atomic(os.path.join(out_dir, "rounds.json"), {
        "schema": ROUNDS_SCHEMA, "run_dir": run_dir,
        "rounds": [{"round": j, "accuracy": {m: series[m][j] for m in methods}, "coverage": coverage[j]}
                   for j in range(k + 1)]})
    return text


@dataclasses.dataclass(frozen=True)
class RoundInputs:
    """What a round reads, resolved from the flags and checked before anything is written."""
    k: int
    run_dir: str
    base: str  # HF dir of the base model (the miniature's: built by its stage)
    policy: str  # the search policy
    ppm: str | None  # the search PPM (None in terminal mode)
    config: SearchConfig
    problems: list[dict] | None  # None: the miniature's pool, generated by its stage
    eval_problems: list[dict] | None


def _fail(message: str):
    raise InputError(message)  # printed as `experiments.round: error: <message>` (experiments.usage.run)


def check_inputs() -> RoundInputs:
    """Every flag and input of the round, checked before a flag is pinned or a stage runs: a failed start
    leaves the run directory as it was, so the corrected command is not refused."""
    from experiments.search import load_problem_set
    k, run_dir = FLAGS.round, FLAGS.run_dir
    if "://" in run_dir:
        _fail(f"--run_dir={run_dir}: the stages write through the local file system; give a path every host "
              f"shares (an NFS / Filestore mount, or a bucket mounted with gcsfuse), not a URL")
    try:
        config = search_flags.search_config()
        search_flags.extract_config()
        for prefix in ("sft_", "ppm_"):
            train_common.config_from_flags(prefix)
    except ValueError as e:
        _fail(f"bad flag value: {e}")
    if config.mode == "inference":
        _fail("--mode=inference scores answers with the PPM instead of grading them, so it yields no verified "
              "data: a round searches with --mode=terminal or ppm")
    paper_mode = "terminal" if k <= 2 else "ppm"  # RSTAR.md section 7
    if config.mode != paper_mode:
        print(f"warning: round {k} searches with --mode={config.mode}, where the paper's round {k} is {paper_mode}: "
              f"is a flagfile for another round in use?", file=sys.stderr, flush=True)
    _eval_spec(FLAGS.eval_methods)
    unknown = set(FLAGS.reward_models) - set(REWARD_MODELS)
    if unknown or "ppm" not in FLAGS.reward_models:
        _fail(f"--reward_models={','.join(FLAGS.reward_models)}: must include ppm, and only {', '.join(REWARD_MODELS)}")

    base = os.path.join(run_dir, "miniature", "base", "hf") if FLAGS.base_model == "miniature" else FLAGS.base_model
    previous = os.path.join(run_dir, f"round_{k - 1}")
    policy = FLAGS.policy or (os.path.join(previous, "policy", "hf") if k > 1 else base)
    ppm = FLAGS.ppm or (os.path.join(previous, "ppm", "hf") if k > 1 else None)
    if config.uses_ppm and ppm is None:
        _fail(f"--mode={config.mode} needs a PPM: --ppm" + (f", or a finished round {k - 1}" if k > 1 else ""))
    for given, stage in (("policy", "policy"), ("ppm", "ppm" if config.uses_ppm else None)):
        stage_dir = os.path.join(previous, stage) if stage and k > 1 and not FLAGS[given].value else None
        if stage_dir and os.path.isdir(stage_dir) and not stages.is_done(stage_dir):  # its export may be partial
            _fail(f"round {k - 1}'s {stage} stage is not complete ({stage_dir} has no {stages.DONE}): rerun round "
                  f"{k - 1} to finish it, or pass --{given}")
    from rstar_jax.models.hf_io import check_hf_dir
    for what, path in (("base model", None if FLAGS.base_model == "miniature" else base),
                       ("search policy", policy if k > 1 or FLAGS.policy else None),
                       ("search PPM", ppm if config.uses_ppm else None)):
        if path is not None and not os.path.isdir(path):
            first = f"run round {k - 1} first, or " if k > 1 else ""
            _fail(f"{what} {path} does not exist ({first}pass --base_model/--policy/--ppm)")
        if path is not None:
            try:
                check_hf_dir(path)
            except InputError as e:
                _fail(f"{what}: {e}")

    def problem_set(flag: str) -> list[dict] | None:
        spec = FLAGS[flag].value
        if spec == "miniature":
            return None
        try:
            return load_problem_set(spec, **search_flags.tfds_dirs(), flag=flag)
        except InputError as e:
            _fail(str(e))

    problems = problem_set("problems")
    if problems is not None and FLAGS.limit:
        problems = problems[:FLAGS.limit]
    eval_problems = problem_set("eval_problems")
    if eval_problems is not None and FLAGS.eval_max_problems:
        eval_problems = eval_problems[:FLAGS.eval_max_problems]
    return RoundInputs(k, run_dir, base, policy, ppm, config, problems, eval_problems)


def check_meshes() -> None:
    """The meshes fit this job's devices, checked before the search: the training meshes span the devices of
    all processes, the search mesh this host's (a fixed one may use fewer)."""
    import jax

    from rstar_jax import parallel
    for flag in ("sft_mesh", "ppm_mesh", "search_mesh"):
        shape = tuple(int(v) for v in FLAGS[flag].value)
        devices = jax.local_device_count() if flag == "search_mesh" else jax.device_count()
        try:
            if flag == "search_mesh" and -1 not in shape and math.prod(shape) <= devices:
                continue
            parallel.MeshConfig(*shape).shape(devices)
        except ValueError as e:
            where = "this host's devices" if flag == "search_mesh" else "the devices of all processes"
            _fail(f"--{flag}={','.join(map(str, shape))} does not fit {where}: {e}")


def _unpinned_flags(names, here: str) -> set[str]:
    """The round's flags whose stages have not run yet, so a corrected value is taken: the search's (and the
    models and problems it searches) until it starts, as its trees resume by search settings alone; a training
    stage's and the evaluation's until they are complete, as they refuse or redo work of other settings."""
    search = {f.name for f in FLAGS.get_flags_for_module("experiments.search_flags")} | {
        "problems", "limit", "policy", "ppm"}
    open_ = set()
    if not os.path.exists(os.path.join(here, "search")):
        open_ |= search
    if not stages.is_done(os.path.join(here, "policy")):
        open_ |= {n for n in names if n.startswith("sft_")}
    if not any(stages.is_done(os.path.join(here, m)) for m in REWARD_MODELS):
        open_ |= {n for n in names if n.startswith("ppm_")} | {"reward_models"}
    if not stages.is_done(os.path.join(here, "eval")):
        open_ |= {n for n in names if n.startswith("eval_")} - {"eval_problems", "eval_max_problems"}
    return open_


def pin_round_flags() -> None:
    """Save the flags in the run directory, or refuse flags that differ from the saved ones: per round every
    result-shaping flag once its stage has run, and for the whole run what every round must share (the base
    model, the evaluation set, the miniature's data)."""
    ours = {name: FLAGS[name].value for module in ("experiments.round", "experiments.search_flags",
                                                   "experiments.train_common", "__main__")
            for name in (f.name for f in FLAGS.get_flags_for_module(module))}
    shared = {name: ours[name] for name in ("base_model", "eval_problems", "eval_max_problems")}
    if "miniature" in (FLAGS.problems, FLAGS.eval_problems, FLAGS.base_model):
        shared.update({name: value for name, value in ours.items() if name.startswith("miniature_")})
    here = os.path.join(FLAGS.run_dir, f"round_{FLAGS.round}")
    try:
        stages.pin_flags(FLAGS.run_dir, shared)
        stages.pin_flags(here, ours, ignore=_FREE_FLAGS, unpinned=_unpinned_flags(ours, here))
    except stages.FlagConflictError as e:
        _fail(str(e))


def run_round(inputs: RoundInputs) -> dict:
    from experiments.search import run_search
    k, run_dir, base, policy, ppm, config = (inputs.k, inputs.run_dir, inputs.base, inputs.policy, inputs.ppm,
                                             inputs.config)
    mini_data, mini_base = os.path.join(run_dir, "miniature", "data"), os.path.join(run_dir, "miniature", "base")
    here = os.path.join(run_dir, f"round_{k}")
    if "miniature" in (FLAGS.problems, FLAGS.eval_problems, FLAGS.base_model):
        stages.run_stage("miniature data", mini_data, miniature_data, primary_only=True)
    if FLAGS.base_model == "miniature":
        stages.run_stage("miniature base model", mini_base, lambda d: miniature_base(mini_data, d))
    problems = inputs.problems
    if problems is None:
        problems = _problems("miniature", os.path.join(mini_data, "pool.jsonl"))
        problems = problems[:FLAGS.limit] if FLAGS.limit else problems

    def search_stage(d: str) -> dict:
        start, iterations = search_flags.search_profile()
        stats = run_search(config, problems, policy, ppm, d, extract_config=search_flags.extract_config(),
                           progress_every_s=FLAGS.progress_every_s, mesh_shape=search_flags.search_mesh_shape(),
                           profile=(2 if FLAGS.profile and start < 0 else start, iterations),
                           **search_flags.cache_budgets())
        if stages.is_primary():  # it extracted the training data from every process's trees
            stats["coverage_by_difficulty"] = coverage_by_difficulty(d, problems)
        if not stages.agree(stages.is_primary() and stats["extracted"]["sft"]):
            # The trees stay on disk; rerunning after a fix skips the problems already searched.
            _fail(f"round {k}'s search solved none of the {len(problems)} pool problems (no correct trajectory, so "
                  f"no training data); its trees are in {d}. Remove that directory and rerun with a stronger "
                  f"--policy, more --rollouts / --max_rollouts_unsolved, or easier --problems")
        return stats

    search = stages.run_stage("search", os.path.join(here, "search"), search_stage)
    extracted = os.path.join(here, "search", "extracted")
    def training(prefix: str, **settings) -> train_common.TrainStageConfig:
        cfg = train_common.config_from_flags(prefix, **settings)
        return dataclasses.replace(cfg, profile_start=2) if FLAGS.profile and cfg.profile_start < 0 else cfg

    stages.run_stage("policy SFT", os.path.join(here, "policy"), lambda d: train_common.run_training("sft", training(
        "sft_", init_hf_dir=base, out_dir=d, train_records=(os.path.join(extracted, "sft.jsonl"),))))
    pairs = os.path.join(extracted, "pairs.jsonl")
    if not stages.agree(stages.is_primary() and search["extracted"]["pairs"] > 0):
        _fail(f"round {k}'s search yielded no preference pairs ({pairs} is empty: no step had both a child "
              f"leading to a correct answer and one leading to a wrong one), so there is no PPM to train; the "
              f"policy is saved in {os.path.join(here, 'policy')}. Remove {here} and rerun the round with more "
              f"--rollouts / --num_candidates, more --problems, or a lower --min_margin")
    reward_init = os.path.join(here, "policy", "hf") if k > 1 else base  # RSTAR.md section 6: round 1 from the base
    for name in sorted(set(FLAGS.reward_models), key=REWARD_MODELS.index):  # the PPM first: later stages need it
        records = pairs if name == "ppm" else os.path.join(extracted, f"{name}.jsonl")
        stages.run_stage(name.upper(), os.path.join(here, name), lambda d, name=name, records=records:
                         train_common.run_training(name, training("ppm_", init_hf_dir=reward_init, out_dir=d,
                                                                  train_records=(records,))))
    eval_problems = inputs.eval_problems
    if eval_problems is None:
        eval_problems = _problems("miniature", os.path.join(mini_data, "eval.jsonl"))
        eval_problems = eval_problems[:FLAGS.eval_max_problems] if FLAGS.eval_max_problems else eval_problems
    # Evaluation runs on process 0's devices (the others wait). The base model's methods are those without a
    # reward model; a round that asks for one an earlier round did not evaluate extends the stage (the results
    # it has are reused), so the rounds report has the base model's figure for it.
    base_eval = os.path.join(run_dir, "base_eval")
    wanted = [m for m in FLAGS.eval_methods if m in ("greedy", "majority")] or ["greedy"]
    evaluated = _methods(stages.load_done(base_eval) or {"rows": []})
    stages.run_stage("base model evaluation", base_eval, lambda d: evaluate_model(
        d, eval_problems, base, None, list(dict.fromkeys(evaluated + wanted)), trained=False), primary_only=True,
        covers=lambda summary: set(wanted) <= set(_methods(summary)))
    results = stages.run_stage("evaluation", os.path.join(here, "eval"), lambda d: evaluate_model(
        d, eval_problems, os.path.join(here, "policy", "hf"), os.path.join(here, "ppm", "hf"), FLAGS.eval_methods,
        trained=True),
        primary_only=True)
    if stages.is_primary():
        print(round_report(run_dir, k), flush=True)
    return {"search": search, "eval": results}


# ---- --dry_run ------------------------------------------------------------------------------------------

def _base_model_config():
    """The base model's shapes: its config.json when the directory exists, else --model_preset."""
    from rstar_jax.models import from_hf_config, preset
    if FLAGS.base_model == "miniature":
        return preset("tiny")
    if os.path.isfile(os.path.join(FLAGS.base_model, "config.json")):
        cfg = from_hf_config(FLAGS.base_model)
        if FLAGS.model_preset and preset(FLAGS.model_preset).replace(dtype=cfg.dtype) != cfg:
            print(f"warning: --model_preset={FLAGS.model_preset} differs from {FLAGS.base_model}/config.json; "
                  "using the checkpoint's shapes", flush=True)
        return cfg
    if not FLAGS.model_preset:
        raise InputError(f"--dry_run: --base_model={FLAGS.base_model} has no config.json; give --model_preset for "
                         "its shapes")
    return preset(FLAGS.model_preset)


def dry_run() -> str:
    """The per-device memory plan of the round's search, evaluation search and training stages."""
    from experiments import dry_run as dr
    count = FLAGS.dry_run_devices
    dr.use_fake_devices(count)
    cfg = _base_model_config()
    gib = FLAGS.device_memory_gib or None

    def mesh(flag: str, shape, devices: int):
        try:
            return dr.mesh_over(shape, devices)
        except ValueError as e:
            raise InputError(f"--{flag}={','.join(map(str, shape))} with --dry_run_devices={count}: {e}") from None

    shape = search_flags.search_mesh_shape()
    search_mesh = mesh("search_mesh", shape, count if -1 in shape else math.prod(shape))
    parts = [f"dry run of round {FLAGS.round}: {cfg.num_params() / 1e9:.2f}B parameters ({cfg.dtype}), "
             f"{count} devices"]
    searches = (("search", FLAGS.num_candidates, search_flags.search_config().uses_ppm),
                ("evaluation search", FLAGS.eval_num_candidates or FLAGS.num_candidates, True))  # PPM-guided
    for name, n, with_ppm in searches:
        parts.append(dr.format_plan(f"{name} (each host, {FLAGS.batch_size} trees, n={n})", dr.search_memory(
            cfg, search_mesh, trees=FLAGS.batch_size, num_candidates=n, max_context_tokens=FLAGS.max_context_tokens,
            max_step_tokens=FLAGS.max_step_tokens, with_ppm=with_ppm), search_mesh, gib))
    for prefix, name in (("sft_", "policy SFT"), ("ppm_", "PPM training")):
        t = train_common.config_from_flags(prefix)
        train_mesh = mesh(f"{prefix}mesh", tuple(int(v) for v in t.mesh), count)
        parts.append(dr.format_plan(f"{name} (batch {t.batch_size} x {t.max_len} tokens)", dr.training_memory(
            cfg, train_mesh, batch=t.batch_size, seq=t.max_len, microbatches=t.microbatches,
            compute_dtype=t.compute_dtype, remat=t.remat, loss_chunk=t.loss_chunk, reward_model=prefix == "ppm_",
            stage=name), train_mesh, gib))
    return "\n".join(parts)


def main(argv):
    check_usage(argv)
    if not FLAGS.run_dir and not FLAGS.dry_run:
        raise app.UsageError("--run_dir is required")
    if not 1 <= FLAGS.round <= 4:
        raise app.UsageError(f"--round must be 1..4, got {FLAGS.round}")
    if FLAGS.dry_run:
        print(dry_run())
        return
    inputs = check_inputs()
    multihost.initialize()
    check_meshes()
    stages.use_compilation_cache(FLAGS.run_dir)
    pin_round_flags()
    summary = run_round(inputs)
    print(json.dumps({"round": FLAGS.round, "eval": summary["eval"]}, default=str))


if __name__ == "__main__":
    define_flags()
    run(main)
