"""One self-evolution round of rStar-Math into a run directory: search -> policy SFT -> PPM -> evaluation.

  python -m experiments.round --flagfile=experiments/configs/miniature.flags      # the embedded miniature
  python -m experiments.round --run_dir=runs/r --round=2 --problems=pool.jsonl --base_model=/ckpt/base ...

Stages, each skipped once complete (re-running the same command resumes where it stopped):
  miniature/data, miniature/base   only with --problems=miniature / --base_model=miniature: the generated
                                   problems and the miniature's base model, SFT-trained on a noisy teacher
  round_<k>/search                 MCTS over the pool with the round's policy (and PPM); trees + extracted data
  round_<k>/policy                 SFT of the *base* model on the round's verified trajectories
  round_<k>/ppm                    the PPM: the new policy + a value head, trained on the preference pairs
  round_<k>/eval                   greedy accuracy of the base and the new policy per difficulty; report.md
The round's search policy is --policy, else the previous round's policy (round 1: the base model); its
PPM is --ppm, else the previous round's (used by --mode=ppm/inference). The flags are saved in the run
directory; a later invocation with different result-shaping flags is refused.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import multihost, search_flags, stages, train_common

FLAGS = flags.FLAGS
# Flags that do not change results: they may differ between invocations on one run directory.
_FREE_FLAGS = ("progress_every_s", "batch_size", "sft_log_every", "ppm_log_every", "sft_profile_start",
               "ppm_profile_start", "dry_run")


def define_flags() -> None:
    search_flags.define()
    train_common.define_flags("sft_")
    train_common.define_flags("ppm_")
    flags.DEFINE_string("run_dir", None, "run directory (all rounds of one run)")
    flags.DEFINE_integer("round", 1, "which round to run (1..4)")
    flags.DEFINE_string("problems", "miniature", "training pool: JSONL/JSON file, tfds:<name>, or miniature")
    flags.DEFINE_string("eval_problems", "miniature", "evaluation problems (with an optional 'difficulty' field): "
                        "JSONL/JSON file, tfds:<name>, or miniature")
    flags.DEFINE_integer("limit", 0, "use the first N pool problems (0 = all)")
    flags.DEFINE_string("base_model", "miniature", "HF directory of the base model (SFT starts from it every "
                        "round), or miniature")
    flags.DEFINE_string("policy", None, "search policy (HF dir); default: the previous round's, round 1: the base")
    flags.DEFINE_string("ppm", None, "search reward model (HF dir); default: the previous round's PPM")
    flags.DEFINE_integer("miniature_pool", 256, "miniature: training pool size")
    flags.DEFINE_integer("miniature_eval_per_difficulty", 20, "miniature: evaluation problems per difficulty")
    flags.DEFINE_integer("miniature_teacher_solutions", 20000, "miniature: noisy-teacher solutions for the base")
    flags.DEFINE_integer("miniature_base_steps", 400, "miniature: SFT steps of the base model")
    flags.DEFINE_integer("miniature_seed", 0, "miniature: seed of the problems, the teacher and the base model")
    flags.DEFINE_integer("eval_max_problems", 0, "evaluate on at most N problems (0 = all)")
    flags.DEFINE_float("progress_every_s", 30.0, "seconds between search progress lines")


# ---- the miniature ---------------------------------------------------------------------------------

def miniature_data(stage_dir: str) -> dict:
    from rstar_jax import tokenizer as tk
    from rstar_jax.data import miniature
    seed = FLAGS.miniature_seed
    pool = miniature.make_pool(FLAGS.miniature_pool, seed)
    evals = [p for per in miniature.make_eval_sets(FLAGS.miniature_eval_per_difficulty, seed).values() for p in per]
    corpus = miniature.teacher_corpus(FLAGS.miniature_teacher_solutions, seed)
    teacher = [{"id": p["id"], "prompt": tk.format_prompt(p["question"]), "response": text} for p, text, _ in corpus]
    for name, rows in (("pool", pool), ("eval", evals), ("teacher_sft", teacher)):
        _write_jsonl(os.path.join(stage_dir, f"{name}.jsonl"), rows)
    tk.build_sentencepiece_tokenizer([r["prompt"] + r["response"] for r in teacher[:5000]],
                                     os.path.join(stage_dir, "tokenizer"), vocab_size=512, seed=seed)
    return {"pool": len(pool), "eval": len(evals), "teacher_solutions": len(teacher),
            "teacher_correct": sum(ok for _, _, ok in corpus) / max(len(corpus), 1)}


def miniature_base(data_dir: str, stage_dir: str) -> dict:
    cfg = train_common.TrainStageConfig(
        train_records=(os.path.join(data_dir, "teacher_sft.jsonl"),), out_dir=stage_dir, preset="tiny",
        tokenizer_dir=os.path.join(data_dir, "tokenizer"), max_len=512, overlength="truncate", batch_size=16,
        max_steps=FLAGS.miniature_base_steps, learning_rate=3e-3, schedule="cosine",
        warmup_steps=min(20, FLAGS.miniature_base_steps // 10), weight_decay=0.0, seed=FLAGS.miniature_seed,
        checkpoint_every=100, log_every=25)
    return train_common.run_training("sft", cfg)


# ---- one round ----------------------------------------------------------------------------------------

def _problems(spec: str, miniature_file: str) -> list[dict]:
    from experiments.search import load_problem_set
    return load_problem_set(miniature_file if spec == "miniature" else spec)


def evaluate(stage_dir: str, models: dict[str, str], problems: list[dict]) -> dict:
    """Greedy (System 1) accuracy of each model, overall and per difficulty; report.md."""
    import collections

    from rstar_jax.models.pretrained import load_policy
    from rstar_jax.search import baselines
    from rstar_jax.verify.grader import Grader
    from rstar_jax.verify.sandbox import Sandbox
    if FLAGS.eval_max_problems:
        problems = problems[:FLAGS.eval_max_problems]
    config = baselines.BaselineConfig(max_step_tokens=FLAGS.max_step_tokens,
                                      max_context_tokens=FLAGS.max_context_tokens, exec_timeout_s=FLAGS.exec_timeout_s)
    results = {}
    with Sandbox(timeout_s=FLAGS.exec_timeout_s) as sandbox, Grader() as grader:
        for name, hf_dir in models.items():
            tokenizer, model = load_policy(hf_dir)
            sampler = baselines.block_sampler(model, tokenizer)
            out = baselines.greedy(sampler, tokenizer, problems, sandbox=sandbox, grader=grader, config=config)
            by_difficulty = collections.defaultdict(list)
            for problem, trajectories in zip(problems, out):
                by_difficulty[problem.get("difficulty", "all")].append(bool(trajectories[0]["correct"]))
            results[name] = {"greedy": sum(map(sum, by_difficulty.values())) / max(len(problems), 1),
                             "greedy_by_difficulty": {str(d): sum(v) / len(v)
                                                      for d, v in sorted(by_difficulty.items())}}
    columns = list(results[next(iter(results))]["greedy_by_difficulty"])
    lines = ["| model | greedy | " + " | ".join(f"d={d}" for d in columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['greedy']:.1f}% | " + " | ".join(
            f"{100 * v:.0f}%" for v in r["greedy_by_difficulty"].values()) + " |")
    with open(os.path.join(stage_dir, "report.md"), "w") as f:
        f.write(f"# Round {FLAGS.round}: greedy accuracy on {len(problems)} problems\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return results


def run_round() -> dict:
    from experiments.search import run_search
    k, run_dir = FLAGS.round, FLAGS.run_dir
    mini_data, mini_base = os.path.join(run_dir, "miniature", "data"), os.path.join(run_dir, "miniature", "base")
    base = os.path.join(mini_base, "hf") if FLAGS.base_model == "miniature" else FLAGS.base_model
    here, previous = os.path.join(run_dir, f"round_{k}"), os.path.join(run_dir, f"round_{k - 1}")
    policy = FLAGS.policy or (os.path.join(previous, "policy", "hf") if k > 1 else base)
    ppm = FLAGS.ppm or (os.path.join(previous, "ppm", "hf") if k > 1 else None)
    config = search_flags.search_config()
    # Inputs that must already exist are checked before any stage runs.
    if config.uses_ppm and ppm is None:
        raise SystemExit(f"experiments.round: --mode={config.mode} needs a PPM: --ppm, or a finished round {k - 1}")
    for what, path in (("base model", None if FLAGS.base_model == "miniature" else base),
                       ("search policy", policy if k > 1 or FLAGS.policy else None),
                       ("search PPM", ppm if config.uses_ppm else None)):
        if path is not None and not os.path.isdir(path):
            raise SystemExit(f"experiments.round: {what} {path} does not exist (run round {k - 1} first, or pass "
                             f"--base_model/--policy/--ppm)")
    if "miniature" in (FLAGS.problems, FLAGS.eval_problems, FLAGS.base_model):
        stages.run_stage("miniature data", mini_data, miniature_data)
    if FLAGS.base_model == "miniature":
        stages.run_stage("miniature base model", mini_base, lambda d: miniature_base(mini_data, d))
    problems = _problems(FLAGS.problems, os.path.join(mini_data, "pool.jsonl"))
    problems = problems[:FLAGS.limit] if FLAGS.limit else problems
    search = stages.run_stage("search", os.path.join(here, "search"), lambda d: run_search(
        config, problems, policy, ppm, d, extract_config=search_flags.extract_config(),
        progress_every_s=FLAGS.progress_every_s))
    extracted = os.path.join(here, "search", "extracted")
    stages.run_stage("policy SFT", os.path.join(here, "policy"), lambda d: train_common.run_training(
        "sft", train_common.config_from_flags("sft_", init_hf_dir=base, out_dir=d,
                                              train_records=(os.path.join(extracted, "sft.jsonl"),))))
    stages.run_stage("PPM", os.path.join(here, "ppm"), lambda d: train_common.run_training(
        "ppm", train_common.config_from_flags("ppm_", init_hf_dir=os.path.join(here, "policy", "hf"), out_dir=d,
                                              train_records=(os.path.join(extracted, "pairs.jsonl"),))))
    eval_problems = _problems(FLAGS.eval_problems, os.path.join(mini_data, "eval.jsonl"))
    models = {"base": base, f"policy r{k}": os.path.join(here, "policy", "hf")}
    results = stages.run_stage("evaluation", os.path.join(here, "eval"),
                               lambda d: evaluate(d, models, eval_problems))
    return {"search": search, "eval": results}


def _write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.run_dir:
        raise app.UsageError("--run_dir is required")
    if not 1 <= FLAGS.round <= 4:
        raise app.UsageError(f"--round must be 1..4, got {FLAGS.round}")
    multihost.initialize()
    ours = {name: FLAGS[name].value for module in ("experiments.round", "experiments.search_flags",
                                                   "experiments.train_common", "__main__")
            for name in (f.name for f in FLAGS.get_flags_for_module(module))}
    try:
        stages.pin_flags(os.path.join(FLAGS.run_dir, f"round_{FLAGS.round}"), ours, ignore=_FREE_FLAGS)
    except stages.FlagConflictError as e:
        raise SystemExit(f"experiments.round: {e}") from None
    summary = run_round()
    print(json.dumps({"round": FLAGS.round, "eval": summary["eval"]}, default=str))


if __name__ == "__main__":
    define_flags()
    app.run(main)
