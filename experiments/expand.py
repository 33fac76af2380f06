"""One MCTS expansion, end to end: sample candidate steps, execute them in the sandbox, grade answers.

  python -m experiments.expand                                  # the embedded miniature
  python -m experiments.expand --hf_dir=/ckpt/qwen --problems=problems.jsonl --n=8

For every problem: the rStar prompt (+ `--prefix`, the partial solution of the node being expanded) is
prefilled once and `n` candidate steps are sampled, each stopping at a step tag; every code candidate's
program (the current `<code>` block, replayed from scratch) runs in the sandbox, and every answer
candidate is graded against the reference. Writes one JSON line per candidate to `--out` and prints a
summary. Without `--hf_dir` the policy is the miniature's tiny Qwen2, taught the step format by a short
warm-up on generated solutions (a quick look at the step format; `experiments.round` trains the miniature's real
base model).
"""
from __future__ import annotations

import json
import os
import random
import re
import time

from absl import flags, logging

from experiments import multihost
from experiments.usage import check_usage, run

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Called by main only, so tests can import the miniature helpers next to other tools' flags."""
    flags.adopt_module_key_flags(multihost)  # absl's --help lists the main module's flags only
    flags.DEFINE_string("hf_dir", None, "HF Qwen2 directory (weights + tokenizer); default: the miniature")
    flags.DEFINE_string("problems", None, "problems as experiments.search takes them (a JSONL/JSON file, "
                        "tfds:<benchmark>, pool:<preset>:<files>); default: 4 generated")
    flags.DEFINE_string("prefix", "", "partial solution (step texts so far) appended to every prompt")
    flags.DEFINE_integer("n", 4, "candidate steps per problem")
    flags.DEFINE_integer("max_step_tokens", 64, "token limit of one step")
    flags.DEFINE_float("temperature", 1.0, "sampling temperature (0 = greedy)")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_string("out", "runs/expand", "output directory (candidates.jsonl, the miniature tokenizer)")
    flags.DEFINE_float("timeout_s", 10.0, "sandbox wall-clock limit per program")
    flags.DEFINE_integer("warmup_steps", 150, "miniature only: steps of teacher-forced training "
                         "on the example solutions before sampling (0 = random weights)")


OPERATIONS = [("+", "adds"), ("-", "removes"), ("*", "multiplies it by")]
# A step ends right after one of these (an <output> block is the tail of the step that closed the code).
STEP_BOUNDARY = r"(?<=<end_of_step>)|(?<=<end_of_output>)|(?<=<end_of_answer>)"


def example_problem(rng: random.Random, index: int) -> tuple[dict, str]:
    """A two-number word problem and its solution in the rStar step format (the miniature's teacher)."""
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    op, word = rng.choice(OPERATIONS)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    problem = {"id": f"mini/{index}", "question": f"Sam has {a} items and {word} {b}.", "answer": str(value)}
    solution = (f"<code>\n# Step 1: the starting amount\nstart = {a}\n<end_of_step>\n"
                f"# Step 2: apply the change\nresult = start {op} {b}\n<end_of_step>\n# Now print the final answer\n"
                f"print(result)\n<end_of_code>\n<output>{value}<end_of_output>\n"
                f"<answer>The answer is \\boxed{{{value}}}<end_of_answer>")
    return problem, solution


def miniature_policy(out_dir: str, seed: int, warmup_steps: int):
    """The miniature's tokenizer (built here) and a tiny Qwen2 policy, briefly taught the step format.

    The warm-up is a stand-in until the rounds pipeline trains the miniature's real base model.
    """
    from flax import nnx

    from rstar_jax import tokenizer as tk
    from rstar_jax.models import Qwen2, preset
    rng = random.Random(seed)
    corpus = [example_problem(rng, i) for i in range(400)]
    texts = [tk.format_prompt(p["question"]) + s for p, s in corpus]
    tok_dir = tk.build_sentencepiece_tokenizer(texts, os.path.join(out_dir, "tokenizer"), vocab_size=1024, seed=seed)
    tokenizer = tk.load_tokenizer(tok_dir)
    model = Qwen2(preset("tiny").replace(vocab_size=tk.vocab_rows_needed(tokenizer)), rngs=nnx.Rngs(seed))
    if warmup_steps:
        warm_up(model, tokenizer, [(tk.format_prompt(p["question"]), s) for p, s in corpus], warmup_steps, seed)
    return tokenizer, model


def warm_up(model, tokenizer, examples, steps: int, seed: int, batch: int = 8):
    """Teacher-forced training on (prompt, response) pairs, loss on the response tokens only."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from rstar_jax.models import positions_from_mask
    from rstar_jax.train.losses import masked_lm_loss
    rows = []
    for prompt, response in examples:
        p = tokenizer.encode(prompt, add_special_tokens=False)
        r = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append((p + r, len(p)))
    width = max(len(ids) for ids, _ in rows)
    tokens = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)  # [N, T] right-padded
    mask = np.zeros((len(rows), width), bool)
    loss_mask = np.zeros((len(rows), width), bool)
    for i, (ids, prompt_len) in enumerate(rows):
        tokens[i, :len(ids)], mask[i, :len(ids)], loss_mask[i, prompt_len:len(ids)] = ids, True, True
    optimizer = nnx.Optimizer(model, optax.adamw(optax.cosine_decay_schedule(3e-3, steps)), wrt=nnx.Param)

    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def train_step(state, tokens, mask, loss_mask):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            hidden, _ = model(tokens, positions_from_mask(mask), mask)
            return masked_lm_loss(model.logits(hidden), tokens, loss_mask)[0]
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    order = np.random.default_rng(seed)
    for step in range(steps):
        idx = order.choice(len(rows), batch, replace=False)
        loss, state = train_step(state, tokens[idx], mask[idx], loss_mask[idx])
        if step % 25 == 0 or step == steps - 1:
            print(f"  warm-up step {step + 1}/{steps}: loss {float(loss):.3f}", flush=True)
    nnx.update((model, optimizer), state)


def main(argv):
    check_usage(argv)
    from experiments.search import load_problem_set
    from rstar_jax import tokenizer as tk
    from rstar_jax.sampling import Sampler, SamplingConfig
    from rstar_jax.verify.grader import Grader
    from rstar_jax.verify.program import assemble_program, is_answer_step
    from rstar_jax.verify.sandbox import Sandbox

    import jax

    from rstar_jax import parallel
    multihost.initialize()
    # Each process expands its own share of the problems with its own devices, into its own directory.
    out = FLAGS.out if jax.process_count() == 1 else os.path.join(FLAGS.out, f"process_{jax.process_index()}")
    os.makedirs(out, exist_ok=True)
    rng = random.Random(FLAGS.seed + 1)  # held out from the warm-up corpus's stream
    problems = load_problem_set(FLAGS.problems) if FLAGS.problems else [example_problem(rng, i)[0] for i in range(4)]
    problems = parallel.host_shard(problems)
    timings = {}
    start = time.perf_counter()
    if FLAGS.hf_dir:
        from rstar_jax.models.pretrained import load_policy
        tokenizer, model = load_policy(FLAGS.hf_dir)
    else:
        tokenizer, model = miniature_policy(out, FLAGS.seed, FLAGS.warmup_steps)
    timings["load"] = time.perf_counter() - start
    print(f"policy: {'HF ' + FLAGS.hf_dir if FLAGS.hf_dir else 'miniature (tiny Qwen2)'}, "
          f"{model.config.num_params() / 1e6:.2f}M params, vocab {len(tokenizer)}", flush=True)

    sampler = Sampler.for_steps(model, tokenizer)
    prompts = [tk.format_prompt(p["question"]) + FLAGS.prefix for p in problems]
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    start = time.perf_counter()
    config = SamplingConfig(max_new_tokens=FLAGS.max_step_tokens, temperature=FLAGS.temperature)
    samples = sampler.generate(prompt_ids, n=FLAGS.n, config=config, seed=FLAGS.seed)
    timings["generate"] = time.perf_counter() - start

    candidates = [(p, s) for p, per in zip(problems, samples) for s in per]
    # The node's path as separate steps, so program assembly sees where earlier code blocks closed.
    prefix_steps = [step for step in re.split(STEP_BOUNDARY, FLAGS.prefix) if step]
    code_jobs = [i for i, (_, s) in enumerate(candidates) if not is_answer_step(s.text)]
    answer_jobs = [i for i, (_, s) in enumerate(candidates) if is_answer_step(s.text)]
    start = time.perf_counter()
    with Sandbox(timeout_s=FLAGS.timeout_s) as sandbox:
        results = sandbox.run([assemble_program(prefix_steps + [candidates[i][1].text]) for i in code_jobs])
    timings["execute"] = time.perf_counter() - start
    start = time.perf_counter()
    with Grader() as grader:
        verdicts = grader.grade_batch([(candidates[i][1].text, candidates[i][0]["answer"]) for i in answer_jobs])
    timings["grade"] = time.perf_counter() - start

    outcome = {i: {"kind": "code", **r.to_dict()} for i, r in zip(code_jobs, results)}
    outcome.update({i: {"kind": "answer", **v.to_dict()} for i, v in zip(answer_jobs, verdicts)})
    path = os.path.join(out, "candidates.jsonl")
    with open(path, "w") as f:
        for i, (problem, sample) in enumerate(candidates):
            record = {"problem_id": problem["id"], "text": sample.text, "finish_reason": sample.finish_reason,
                      "num_tokens": len(sample.token_ids),
                      "mean_logprob": sum(sample.logprobs) / max(len(sample.logprobs), 1),
                      **outcome[i]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    for problem, per in zip(problems, samples):
        print(f"\n[{problem['id']}] {problem['question']}  (answer {problem['answer']})")
        for sample in per:
            i = next(k for k, (p, s) in enumerate(candidates) if s is sample)
            o = outcome[i]
            verdict = (f"answer {o['extracted']!r}: {'correct' if o['equal'] else 'wrong'}" if o["kind"] == "answer"
                       else f"exec {'FAILED ' + str(o['error_type']) if o['failed'] else 'ok'}")
            print(f"  - {sample.finish_reason:6s} {len(sample.token_ids):3d} tok | {verdict:28s} | "
                  f"{sample.text[:70]!r}")
    ok = sum(not r.failed for r in results)
    correct = sum(v.equal for v in verdicts)
    print(f"\n{len(candidates)} candidates: {len(code_jobs)} code steps ({ok} executed cleanly), "
          f"{len(answer_jobs)} answers ({correct} correct); stop-tag finishes "
          f"{sum(s.finish_reason == 'stop' for _, s in candidates)}")
    print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()) + f"; records in {path}")
    logging.info("sampler timing %s", sampler.last_timing)


if __name__ == "__main__":
    define_flags()
    run(main)
