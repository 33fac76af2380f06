"""The baselines rStar-Math compares MCTS against (RSTAR.md section 8), batched over many problems.

- `greedy`: System 1. Temperature 0; the whole code block in one generation (stops at `<end_of_code>`, not at
  `<end_of_step>`), executed, its `<output>` appended, then the answer step generated and graded.
- `sample_solutions`: N independent full solutions the same way at temperature T, the pool for:
  - `best_of_n`: the pool's solution with the highest reward-model score (ORM or PPM on prompt + response);
  - `majority_vote`: the pool's most common final answer (`rstar_jax.eval.selection` has the other rules).
- `step_beam_search`: step-level beam search: every beam entry samples `samples_per_beam` next steps, code
  is executed per step (failed steps dropped), the reward model scores prompt + partial solution, and the
  `beam_width` best candidates over all entries are kept; an answer step among them finishes a trajectory
  and takes one place of the beam for good (the reference's shrinking `current_top_num`). Ends when no
  entry is left or at `max_depth` steps; the final answer is the highest-scored finished trajectory.

Every phase is one call for all live problems: one sampler call per generation step (split only when it
would exceed `max_rows` sampler rows), one sandbox call, one scorer call, one grader call. Conventions
follow the MCTS driver: programs from `assemble_program` (the current `<code>` block, replayed from
scratch), `with_output` after `<end_of_code>`, and sampler streams from `stream_id(problem id, seed, node)`,
so a trajectory depends only on (seed, problem id, its index), never on what else is in the batch; the
first n trajectories of a pool of N > n are the pool of n.

A trajectory (one per solution) is a dict:
  {"response": str, "final_answer": str | None, "correct": bool | None, "score": float | None,
   "num_tokens": int, "end": str}
`final_answer` is the extracted (not canonicalised) `\\boxed{}` content; `correct` is the grader's verdict
against the problem's "answer" (None when no grader or no reference; reporting only, never used to choose);
`score` is the reward model's tanh score of prompt + response (None without a scorer); `num_tokens` counts
the generated tokens of the response (not the appended `<output>`); `end` says how it ended (`END_REASONS`).

Problems are dicts with "id", "question" and optionally "answer" (rstar_jax.data's format).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from rstar_jax import tokenizer as tk
from rstar_jax.eval import selection
from rstar_jax.sampling import Sample, Sampler, SamplingConfig
from rstar_jax.search import steps
from rstar_jax.search.driver import stream_id
from rstar_jax.verify.answer_extract import extract_answer
from rstar_jax.verify.program import ANSWER_END, CODE_END, STEP_END, assemble_program, output_block

# How a trajectory ended.
ANSWER = "answer"  # an answer step with a \boxed{} answer
NO_ANSWER = "no_answer"  # the generation ended without one (length, eos, an answer step without a box)
EXEC_ERROR = "exec_error"  # its code failed (and answer_after_error is off)
CONTEXT = "context"  # the prompt reached max_context_tokens before an answer
END_REASONS = (ANSWER, NO_ANSWER, EXEC_ERROR, CONTEXT)

BLOCK_STOPS = (CODE_END, ANSWER_END)


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Settings of every baseline; defaults from the paper / the reference's inference configs."""

    temperature: float = 1.0  # sampling temperature of sample_solutions and beam search (greedy: 0)
    top_p: float = 1.0
    top_k: int = 0
    # One step's generation (an answer step, a beam step). A System-1 code block holds up to max_depth steps
    # and gets max_depth x max_step_tokens (what one MCTS path may write), both capped by max_context_tokens.
    max_step_tokens: int = 2048
    max_context_tokens: int = 4096  # prompt + response; a longer prompt is not extended
    exec_timeout_s: float = 30.0
    # System 1 after a failed program: stop without an answer (the reference's errors_threshold = 1, as MCTS
    # treats a failed step) or show the error in <output> and still ask for the answer.
    answer_after_error: bool = False
    seed: int = 0
    max_rows: int = 1024  # sampler rows (prompts x samples) per call; more are split into several calls
    # Step-level beam search (the reference's faster alternative to MCTS: beam 8, 8 samples per step).
    beam_width: int = 8
    samples_per_beam: int = 8  # next steps sampled from each beam entry
    max_depth: int = 16
    dedupe: bool = True  # drop a beam entry's repeated candidate texts (as MCTS expansion does)
    # Text the policy sees before every prompt (a bootstrap model's instruction and worked examples); the
    # reward model scores, and the trajectories hold, the plain prompt.
    prompt_prefix: str = ""

    def __post_init__(self):
        for name in ("max_step_tokens", "max_context_tokens", "max_rows", "beam_width", "samples_per_beam",
                     "max_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.exec_timeout_s <= 0:
            raise ValueError(f"exec_timeout_s must be > 0, got {self.exec_timeout_s}")
        SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)  # validates them


def block_sampler(model, tokenizer, **kwargs) -> Sampler:
    """A sampler of whole code blocks: stops at `<end_of_code>` and `<end_of_answer>` (and eos), not at
    `<end_of_step>`; the sampler `greedy` and `sample_solutions` need (answer steps stop at `<end_of_answer>`)."""
    return Sampler(model, lambda ids: tokenizer.decode(ids, skip_special_tokens=False), stop_strings=BLOCK_STOPS,
                   stop_token_ids=tuple(tk.tag_ids(tokenizer, BLOCK_STOPS).values()),
                   eos_token_ids=tk.eos_token_ids(tokenizer),
                   pad_id=tokenizer.pad_token_id or 0, valid_vocab_size=tk.vocab_rows_needed(tokenizer), **kwargs)


# ---------------------------------------------------------------------------------------------------
# Shared pieces


def _record(response: str, final_answer: str | None, correct: bool | None, score: float | None, num_tokens: int,
            end: str) -> dict:
    return {"response": response, "final_answer": final_answer, "correct": correct, "score": score,
            "num_tokens": num_tokens, "end": end}


def _sampling(cfg: BaselineConfig, temperature: float, prompt_lengths: Sequence[int], *,
              whole_block: bool = False) -> SamplingConfig:
    room = max((cfg.max_context_tokens - n for n in prompt_lengths), default=1)
    budget = cfg.max_step_tokens * (cfg.max_depth if whole_block else 1)
    return SamplingConfig(max_new_tokens=max(1, min(budget, room)), temperature=temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k)


def _generate(sampler: Sampler, prompts: Sequence[list[int]], n: int, config: SamplingConfig, seed: int,
              streams: Sequence[int], max_rows: int, texts: Sequence[str] | None = None,
              parents: Sequence[str | None] | None = None) -> list[list[Sample]]:
    """`sampler.generate` over all prompts, split so no call exceeds max_rows rows (results do not depend on
    the split: each prompt samples from its own stream). texts, parents: the prompts' texts and the texts they
    extend, for a sampler with a store (`Sampler(cache_mib=...)`)."""
    named = texts is not None and getattr(sampler, "store", None) is not None
    per_call = max(1, max_rows // n)
    out: list[list[Sample]] = []
    for start in range(0, len(prompts), per_call):
        part = slice(start, start + per_call)
        out.extend(sampler.generate(prompts[part], n=n, config=config, seed=seed, prompt_ids=streams[part],
                                    **(dict(texts=texts[part], parents=parents[part]) if named else {})))
    return out


def _check_stops(sampler: Sampler, *, step_level: bool, what: str) -> None:
    stops = getattr(sampler, "stop_strings", None)
    if stops is None:
        return  # a test double without the attribute
    if step_level and STEP_END not in stops:
        raise ValueError(f"{what} generates one step at a time: use Sampler.for_steps (stops {tk.STOP_TAGS})")
    if not step_level and (STEP_END in stops or CODE_END not in stops):
        raise ValueError(f"{what} generates the code block in one go: use block_sampler (stops {BLOCK_STOPS}), "
                         f"not a sampler stopping at {stops}")


def _grade(grader, items: Sequence[tuple[str, Mapping]]) -> list[tuple[str | None, bool | None]]:
    """(final answer, correct) of each (answer step text, problem): one grader call for the graded ones."""
    out: list[tuple[str | None, bool | None]] = [(extract_answer(text), None) for text, _ in items]
    graded = [k for k, (_, p) in enumerate(items) if grader is not None and p.get("answer") is not None]
    verdicts = grader.grade_batch([(items[k][0], items[k][1]["answer"]) for k in graded]) if graded else []
    for k, v in zip(graded, verdicts):
        out[k] = (v.extracted, bool(v.equal))
    return out


def _executed(text: str, result, show_errors: bool) -> str:
    """The step text after execution: `<output>` follows `<end_of_code>` (the error itself if shown)."""
    if not result.failed:
        return steps.with_output(text, result)
    if show_errors and CODE_END in text:
        return text + output_block(result.observation)
    return text


def _scores(scorer, texts: Sequence[str]) -> list[float | None]:
    if scorer is None or not texts:
        return [None] * len(texts)
    return [float(v) for v in scorer.score(list(texts))]


def _step_scores(scorer, children: Sequence[tuple[str, str, bool]]) -> list[float]:
    """Scores of (context, step, may continue) children: by context through `Scorer.score_children`, which
    runs only the steps on stored contexts and stores those that may continue; whole texts with a scorer
    that only has `score`."""
    if not hasattr(scorer, "score_children"):
        return _scores(scorer, [context + step for context, step, _ in children])
    groups: dict[str, list[int]] = {}
    for k, (context, _, _) in enumerate(children):
        groups.setdefault(context, []).append(k)
    values = scorer.score_children(list(groups), [[children[k][1] for k in ks] for ks in groups.values()],
                                   keep=[[children[k][2] for k in ks] for ks in groups.values()])
    out = [0.0] * len(children)
    for ks, vs in zip(groups.values(), values):
        for k, v in zip(ks, vs):
            out[k] = float(v)
    return out


# ---------------------------------------------------------------------------------------------------
# System 1 and sampled full solutions


@dataclasses.dataclass
class _Solution:
    problem: int
    index: int  # j-th solution of its problem
    parts: list[str] = dataclasses.field(default_factory=list)
    tokens: int = 0
    end: str | None = None  # set once it can go no further
    answer_step: str | None = None

    @property
    def response(self) -> str:
        return "".join(self.parts)


def sample_solutions(sampler: Sampler, tokenizer, problems: Sequence[Mapping], n: int, *, sandbox, grader=None,
                     scorer=None, config: BaselineConfig = BaselineConfig(),
                     temperature: float | None = None) -> list[list[dict]]:
    """n independent full solutions per problem: code block in one go -> execute -> `<output>` -> answer step.

    sampler: a `block_sampler`. temperature: overrides config.temperature. With a scorer every solution is
    scored on prompt + response (one call). Returns per problem its n trajectories, in sample order.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check_stops(sampler, step_level=False, what="sample_solutions")
    cfg = config
    temperature = cfg.temperature if temperature is None else temperature
    prompts = [tk.format_prompt(p["question"]) for p in problems]
    ids = [tokenizer.encode(cfg.prompt_prefix + text, add_special_tokens=False) for text in prompts]
    sols = [[_Solution(i, j) for j in range(n)] for i in range(len(problems))]

    # 1. The code block, one generation per solution (n per prompt, one prefill each).
    live = [i for i in range(len(problems)) if len(ids[i]) < cfg.max_context_tokens]
    for i in set(range(len(problems))) - set(live):
        for s in sols[i]:
            s.end = CONTEXT
    samples = _generate(sampler, [ids[i] for i in live], n, _sampling(cfg, temperature, [len(ids[i]) for i in live],
                                                                         whole_block=True), cfg.seed, [stream_id(problems[i]["id"], cfg.seed, 0) for i in live], cfg.max_rows)
    to_run: list[_Solution] = []
    for i, per in zip(live, samples):
        for s, sample in zip(sols[i], per):
            s.parts.append(sample.text)
            s.tokens += len(sample.token_ids)
            kind = steps.classify(sample.text, sample.finish_reason)
            if kind == steps.ANSWER_STEP:  # answered without (finishing) code: graded as it is
                s.answer_step = sample.text
            elif kind == steps.CODE and sample.stop == CODE_END:
                to_run.append(s)
            else:
                s.end = NO_ANSWER

    # 2. Execute every finished code block (one sandbox call) and show its output.
    programs = [assemble_program(s.parts) for s in to_run]
    results = sandbox.run(programs, timeout_s=cfg.exec_timeout_s) if programs else []
    to_answer: list[_Solution] = []
    for s, result in zip(to_run, results):
        if result.failed and not cfg.answer_after_error:
            s.end = EXEC_ERROR
            continue
        s.parts[-1] = _executed(s.parts[-1], result, show_errors=True)
        to_answer.append(s)

    # 3. The answer step, one generation per solution (its own stream).
    answer_ids = {id(s): tokenizer.encode(cfg.prompt_prefix + prompts[s.problem] + s.response, add_special_tokens=False)
                  for s in to_answer}
    for s in to_answer:
        if len(answer_ids[id(s)]) >= cfg.max_context_tokens:
            s.end = CONTEXT
    asking = [s for s in to_answer if s.end is None]
    samples = _generate(sampler, [answer_ids[id(s)] for s in asking], 1,
                        _sampling(cfg, temperature, [len(answer_ids[id(s)]) for s in asking]), cfg.seed,
                        [stream_id(problems[s.problem]["id"], cfg.seed, 1 + s.index) for s in asking], cfg.max_rows)
    for s, (sample,) in zip(asking, samples):
        s.parts.append(sample.text)
        s.tokens += len(sample.token_ids)
        if steps.classify(sample.text, sample.finish_reason) == steps.ANSWER_STEP:
            s.answer_step = sample.text
        else:
            s.end = NO_ANSWER

    # 4. Grade every answer (one grader call) and score every solution (one scorer call).
    flat = [s for per in sols for s in per]
    answered = [s for s in flat if s.answer_step is not None]
    verdicts = dict(zip(map(id, answered), _grade(grader, [(s.answer_step, problems[s.problem]) for s in answered])))
    scores = _scores(scorer, [prompts[s.problem] + s.response for s in flat])
    graded_problems = [grader is not None and p.get("answer") is not None for p in problems]
    records = {}
    for s, score in zip(flat, scores):
        answer, correct = verdicts.get(id(s), (None, False if graded_problems[s.problem] else None))
        end = s.end or (ANSWER if answer is not None else NO_ANSWER)
        records[id(s)] = _record(s.response, answer, correct, score, s.tokens, end)
    return [[records[id(s)] for s in per] for per in sols]


def greedy(sampler: Sampler, tokenizer, problems: Sequence[Mapping], *, sandbox, grader=None, scorer=None,
           config: BaselineConfig = BaselineConfig()) -> list[list[dict]]:
    """System 1: one temperature-0 solution per problem (see `sample_solutions`). Returns [[trajectory], ...]."""
    return sample_solutions(sampler, tokenizer, problems, 1, sandbox=sandbox, grader=grader, scorer=scorer,
                            config=config, temperature=0.0)


def best_of_n(pools: Sequence[Sequence[Mapping]]) -> list[Mapping | None]:
    """Per problem the pool's answered solution with the highest reward-model score (ties: the first).

    pools: `sample_solutions(..., scorer=...)` output (every answered solution needs a score). Taking the
    pool rather than sampling here lets Best-of-N and majority vote (and every N <= the pool's size, by
    prefixes) be compared on the same samples. None where no solution has an answer.
    """
    return selection.select(pools, selection.top_score)


def majority_vote(pools: Sequence[Sequence[Mapping]], *, grader=None) -> list[Mapping | None]:
    """Per problem a solution carrying the pool's most common final answer (None where none has an answer).

    Answers are grouped by `selection.group_answers` (canonical string / exact number value; with a grader
    also the grader's equivalence). A plain vote: ties go to the answer seen first, and reward-model scores
    (present when best-of-N shares the pool) are ignored, so the baseline never depends on a reward model.
    """
    unscored = [[{**t, "score": None} for t in pool] for pool in pools]
    chosen = selection.select_indices(unscored, selection.majority, grader=grader)
    return [None if i is None else pool[i] for pool, i in zip(pools, chosen)]


# ---------------------------------------------------------------------------------------------------
# Step-level beam search


@dataclasses.dataclass
class _Entry:
    """A partial solution in the beam (or a candidate for it)."""

    steps: list[str]
    tokens: int
    node: int  # its id within its problem's search: names its sampler stream
    score: float = 0.0


def step_beam_search(sampler: Sampler, tokenizer, problems: Sequence[Mapping], *, scorer, sandbox, grader=None,
                     config: BaselineConfig = BaselineConfig()) -> list[list[dict]]:
    """Step-level beam search guided by a reward model (`scorer`: PPM / PQM `Scorer`, or anything with
    `score(texts) -> [float]`). sampler: `Sampler.for_steps`.

    Returns per problem its finished trajectories (at most beam_width), highest score first: the first one
    is the beam search's answer (`best_of_n(results)` picks the same). A problem whose beams all died (failed
    programs, no stop tag, max_depth reached, prompt + partial solution at max_context_tokens) has none.
    """
    if scorer is None:
        raise ValueError("step_beam_search needs a reward model (scorer) to rank partial solutions")
    _check_stops(sampler, step_level=True, what="step_beam_search")
    cfg = config
    prompts = [tk.format_prompt(p["question"]) for p in problems]
    policy = [cfg.prompt_prefix + prompt for prompt in prompts]  # what the policy sees
    beams: list[list[_Entry]] = [[_Entry([], 0, 0)] for _ in problems]
    next_node = [1] * len(problems)
    finished: list[list[_Entry]] = [[] for _ in problems]

    for _ in range(cfg.max_depth):
        entries = [(i, e) for i in range(len(problems)) for e in beams[i]]
        ids = {id(e): tokenizer.encode(policy[i] + "".join(e.steps), add_special_tokens=False) for i, e in entries}
        entries = [(i, e) for i, e in entries if len(ids[id(e)]) < cfg.max_context_tokens]
        if not entries:
            break
        samples = _generate(sampler, [ids[id(e)] for _, e in entries], cfg.samples_per_beam,
                            _sampling(cfg, cfg.temperature, [len(ids[id(e)]) for _, e in entries]), cfg.seed,
                            [stream_id(problems[i]["id"], cfg.seed, e.node) for i, e in entries], cfg.max_rows,
                            texts=[policy[i] + "".join(e.steps) for i, e in entries],
                            parents=[policy[i] + "".join(e.steps[:-1]) if e.steps else None for i, e in entries])

        # Candidates: answer steps with a \boxed{} answer, and code steps whose program runs (one sandbox
        # call); the rest (no stop tag, no extractable answer, a failed program) is dropped.
        cands: list[tuple[int, _Entry, steps.Candidate, int]] = []  # (problem, parent, candidate, tokens)
        for (i, e), per in zip(entries, samples):
            tokens = {}
            for sample in per:
                tokens.setdefault(sample.text.strip(), len(sample.token_ids))
            for c in steps.candidate_steps([(s.text, s.finish_reason) for s in per], dedupe=cfg.dedupe,
                                           answer_first=False):
                if c.kind == steps.CODE or (c.kind == steps.ANSWER_STEP and extract_answer(c.text) is not None):
                    cands.append((i, e, c, tokens[c.text.strip()]))
        code = [k for k, (_, _, c, _) in enumerate(cands) if c.kind == steps.CODE]
        results = sandbox.run([assemble_program(cands[k][1].steps + [cands[k][2].text]) for k in code],
                              timeout_s=cfg.exec_timeout_s) if code else []
        failed = {k for k, r in zip(code, results) if r.failed}
        for k, r in zip(code, results):
            cands[k][2].text = _executed(cands[k][2].text, r, show_errors=False)
        cands = [cand for k, cand in enumerate(cands) if k not in failed]

        # Score every surviving partial solution (one scorer call) and keep the best per problem.
        scores = _step_scores(scorer, [(prompts[i] + "".join(e.steps), c.text, c.kind == steps.CODE)
                                       for i, e, c, _ in cands])
        by_problem: dict[int, list[tuple[float, int]]] = {}
        for k, ((i, _, _, _), score) in enumerate(zip(cands, scores)):
            by_problem.setdefault(i, []).append((score, k))
        beams = [[] for _ in problems]
        for i, ranked in by_problem.items():
            room = cfg.beam_width - len(finished[i])
            for score, k in sorted(ranked, key=lambda x: -x[0])[:max(room, 0)]:  # stable: ties keep sample order
                _, parent, c, tokens = cands[k]
                entry = _Entry(parent.steps + [c.text], parent.tokens + tokens, next_node[i], score)
                next_node[i] += 1
                (finished[i] if c.kind == steps.ANSWER_STEP else beams[i]).append(entry)

    # Grade every finished trajectory (one grader call).
    flat = [(i, e) for i in range(len(problems)) for e in finished[i]]
    verdicts = _grade(grader, [(e.steps[-1], problems[i]) for i, e in flat])
    out: list[list[dict]] = [[] for _ in problems]
    for (i, e), (answer, correct) in zip(flat, verdicts):
        out[i].append(_record("".join(e.steps), answer, correct, e.score, e.tokens, ANSWER))
    for per in out:
        per.sort(key=lambda t: -t["score"])  # stable: equal scores keep their finishing order
    return out
