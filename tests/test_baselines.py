"""Baselines: System 1 greedy, sampled solutions with Best-of-N / majority vote, step-level beam search.

Two layers, both with the real sandbox and the real grader:
- a scripted policy (a test double of the sampler that writes known steps) pins the semantics exactly:
  execution, `<output>`, grading, failed steps, beam ranking and width, one call per phase;
- the real tiny Qwen2 (briefly warmed up) with a PPM scorer runs every baseline end to end: shapes,
  determinism of greedy, Best-of-N's choice, beam width, and agreement with the grader.
"""
import dataclasses
import random
import re

import numpy as np
import pytest

from rstar_jax import tokenizer as tk
from rstar_jax.eval import selection
from rstar_jax.sampling import Sample, Sampler, SamplingConfig
from rstar_jax.search import baselines as bl
from rstar_jax.verify.grader import Grader
from rstar_jax.verify.sandbox import Sandbox

KEYS = {"response", "final_answer", "correct", "score", "num_tokens", "end"}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(num_workers=2, timeout_s=5.0, preload=("math",), uid_base=60400) as sb:
        yield sb


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=1) as g:
        yield g


class Counting:
    """Counts calls of one method of a real sandbox / grader / scorer / sampler, passing everything through."""

    def __init__(self, inner, method):
        self.inner, self.method, self.calls = inner, method, []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        def counted(items, *args, **kwargs):
            self.calls.append(list(items))
            return attr(self.calls[-1], *args, **kwargs)
        return counted


# ---------------------------------------------------------------------------------------------------
# Scripted policy


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


class ScriptedSampler:
    """`generate` like a Sampler, writing `script(response_so_far, a, b, j)` for sample j."""

    def __init__(self, script, stop_strings):
        self.script, self.stop_strings, self.calls = script, stop_strings, []

    def generate(self, prompts, n=1, config=SamplingConfig(), *, seed=0, prompt_ids=None):
        texts = ["".join(map(chr, p)) for p in prompts]
        self.calls.append((texts, n, config, list(prompt_ids)))
        out = []
        for text in texts:
            a, b = map(int, re.search(r"Sam has (\d+) items and adds (\d+)\.", text).groups())
            response = text.split("solve the problem with code.", 1)[1]
            per = []
            for j in range(n):
                step, finish = self.script(response, a, b, j)
                stop = next((s for s in self.stop_strings if step.endswith(s)), None) if finish == "stop" else None
                per.append(Sample(list(range(len(step))), step, [0.0] * len(step), finish, stop))
            out.append(per)
        return out


def _answer_from_output(response):
    out = re.search(r"<output>(.*?)<end_of_output>", response, re.S).group(1)
    return f"<answer>The answer is \\boxed{{{out}}}<end_of_answer>", "stop"


def block_script(response, a, b, j):
    if "<end_of_output>" in response:
        return _answer_from_output(response)
    return [(f"<code>\n# Step 1: start\nx = {a}\n<end_of_step>\n# Step 2: add\nprint(x + {b})\n<end_of_code>", "stop"),
            (f"<code>\nprint({a})\n<end_of_code>", "stop"),  # wrong
            ("<code>\nprint(1 // 0)\n<end_of_code>", "stop"),  # fails
            ("<code>\nprint(", "length"),  # runs out of tokens
            (f"<answer>\\boxed{{{a + b}}}<end_of_answer>", "stop"),  # answers without code
            (f"<code>\nprint({a} + {b})\n<end_of_answer>", "stop")][j % 6]  # wrong closing tag: no answer


def step_script(response, a, b, j):
    if "<end_of_output>" in response:
        return _answer_from_output(response)
    if "<end_of_step>" not in response:
        return [(f"<code>\n# Step 1: start\nx = {a}\n<end_of_step>", "stop"),
                ("<code>\n# Step 1: start\nx = 1 // 0\n<end_of_step>", "stop"),  # fails: dropped
                (f"<code>\n# Step 1: start\nx = {a} + 1\n<end_of_step>", "stop"),
                ("<code>\n# Step 1: start\nx =", "length")][j % 4]  # no stop: dropped
    return [(f"# Step 2: add\nprint(x + {b})\n<end_of_code>", "stop"),
            ("# Step 2: add\nprint(x - 1000)\n<end_of_code>", "stop")][j % 2]


class OracleScorer:
    """A reward model that likes the right steps: x = a, then x + b, then the right answer."""

    def __init__(self):
        self.calls = []

    def score(self, texts):
        self.calls.append(list(texts))
        out = []
        for text in texts:
            a, b = map(int, re.search(r"Sam has (\d+) items and adds (\d+)\.", text).groups())
            s = 0.5 if f"x = {a}\n" in text else -0.5
            s += 0.2 if f"print(x + {b})" in text else 0.0
            s += 0.2 if f"\\boxed{{{a + b}}}" in text else 0.0
            s += 1e-3 * (len(text) % 7)  # deterministic spread
            out.append(s)
        return np.asarray(out, np.float32)


SCRIPTED_PROBLEMS = [{"id": "p0", "question": "Sam has 3 items and adds 4.", "answer": "7"},
                     {"id": "p1", "question": "Sam has 10 items and adds 5.", "answer": "15"},
                     {"id": "p2", "question": "Sam has 1 items and adds 1."}]  # no reference: not graded


def test_sample_solutions_scripted(sandbox, grader):
    sampler = ScriptedSampler(block_script, bl.BLOCK_STOPS)
    sb, gr, scorer = Counting(sandbox, "run"), Counting(grader, "grade_batch"), OracleScorer()
    pools = bl.sample_solutions(sampler, CharTokenizer(), SCRIPTED_PROBLEMS, 6, sandbox=sb, grader=gr, scorer=scorer,
                                config=bl.BaselineConfig(exec_timeout_s=5.0))
    # One call per phase for every problem: code blocks, sandbox, answer steps, grader, scorer.
    assert len(sampler.calls) == 2 and len(sb.calls) == 1 and len(gr.calls) == 1 and len(scorer.calls) == 1
    assert sampler.calls[0][1] == 6 and len(sampler.calls[0][0]) == 3  # n per prompt, all problems at once
    assert len(sampler.calls[1][0]) == 3 * 2 and sampler.calls[1][1] == 1  # the two programs that ran cleanly
    assert len(sb.calls[0]) == 3 * 3  # ok, wrong, failing block per problem
    assert [len(pool) for pool in pools] == [6, 6, 6]
    for (a, b), pool, problem in zip([(3, 4), (10, 5), (1, 1)], pools, SCRIPTED_PROBLEMS):
        assert all(set(t) == KEYS for t in pool)
        ok, wrong, failed, cut, direct, bad_tag = pool
        assert ok["response"].endswith(f"<end_of_code>\n<output>{a + b}<end_of_output>\n"
                                       f"<answer>The answer is \\boxed{{{a + b}}}<end_of_answer>")
        assert (ok["final_answer"], ok["end"]) == (str(a + b), bl.ANSWER)
        assert (wrong["final_answer"], wrong["end"]) == (str(a), bl.ANSWER)
        assert (direct["final_answer"], direct["end"]) == (str(a + b), bl.ANSWER)
        assert failed["end"] == bl.EXEC_ERROR and failed["final_answer"] is None
        assert "<output>" not in failed["response"]
        assert cut["end"] == bad_tag["end"] == bl.NO_ANSWER and cut["final_answer"] is None
        graded = "answer" in problem
        assert [t["correct"] for t in pool] == ([True, False, False, False, True, False] if graded else [None] * 6)
        assert ok["num_tokens"] == len(ok["response"]) - len(f"\n<output>{a + b}<end_of_output>\n")
        prompt = tk.format_prompt(problem["question"])
        assert [t["score"] for t in pool] == pytest.approx(list(scorer.score([prompt + t["response"] for t in pool])))

    best = bl.best_of_n(pools)
    for pool, chosen in zip(pools, best):
        answered = [t for t in pool if t["final_answer"] is not None]
        assert chosen is max(answered, key=lambda t: t["score"])
    assert [t["correct"] for t in best] == [True, True, None]
    votes = bl.majority_vote(pools, grader=grader)  # a+b twice, a once
    assert [t["final_answer"] for t in votes] == ["7", "15", "2"]
    # A plain vote: the scores best-of-N put on the shared pool never break its ties.
    tie = [[{**pools[0][0], "final_answer": "1", "score": -0.9}, {**pools[0][0], "final_answer": "2", "score": 0.9}]]
    assert bl.majority_vote(tie)[0]["final_answer"] == "1" and bl.best_of_n(tie)[0]["final_answer"] == "2"
    # The pool of n is the first n of a larger pool (streams per problem and sample).
    small = bl.sample_solutions(ScriptedSampler(block_script, bl.BLOCK_STOPS), CharTokenizer(), SCRIPTED_PROBLEMS, 2,
                                sandbox=sandbox, grader=grader)
    assert [[t["response"] for t in p] for p in small] == [[t["response"] for t in p[:2]] for p in pools]


def test_a_prompt_prefix_is_seen_by_the_policy_alone(sandbox, grader):
    """A bootstrap model's instruction and examples go before every policy input; the reward model scores, and
    the trajectories hold, what they would without it."""
    prefix = "Worked examples first.\n\n"
    solutions = lambda sampler, scorer, cfg: bl.sample_solutions(sampler, CharTokenizer(), SCRIPTED_PROBLEMS, 3,
                                                                 sandbox=sandbox, grader=grader, scorer=scorer,
                                                                 config=cfg)
    beam = lambda sampler, scorer, cfg: bl.step_beam_search(sampler, CharTokenizer(), SCRIPTED_PROBLEMS, scorer=scorer,
                                                            sandbox=sandbox, grader=grader, config=cfg)
    for run, script, stops in ((solutions, block_script, bl.BLOCK_STOPS), (beam, step_script, tk.STOP_TAGS)):
        runs = []
        for p in ("", prefix):
            sampler, scorer = ScriptedSampler(script, stops), OracleScorer()
            cfg = bl.BaselineConfig(beam_width=2, samples_per_beam=4, max_depth=5, prompt_prefix=p)
            runs.append((run(sampler, scorer, cfg), sampler, scorer))
        (base, base_sampler, base_scorer), (ours, sampler, scorer) = runs
        assert ours == base
        assert all(t.startswith(prefix + "<|user|>:") for call in sampler.calls for t in call[0])
        assert [[t[len(prefix):] for t in call[0]] for call in sampler.calls] == [c[0] for c in base_sampler.calls]
        assert scorer.calls == base_scorer.calls and not any(t.startswith(prefix) for c in scorer.calls for t in c)


def test_answer_after_error_and_context_limit(sandbox, grader):
    sampler = ScriptedSampler(block_script, bl.BLOCK_STOPS)
    cfg = bl.BaselineConfig(answer_after_error=True)
    pools = bl.sample_solutions(sampler, CharTokenizer(), SCRIPTED_PROBLEMS[:1], 3, sandbox=sandbox, grader=grader,
                                config=cfg)
    failed = pools[0][2]
    assert "<output>ZeroDivisionError" in failed["response"] and failed["end"] == bl.ANSWER
    assert failed["final_answer"].startswith("ZeroDivisionError") and failed["correct"] is False
    # A prompt longer than the context is not extended.
    tiny = bl.BaselineConfig(max_context_tokens=20)
    pools = bl.sample_solutions(sampler, CharTokenizer(), SCRIPTED_PROBLEMS[:1], 2, sandbox=sandbox, grader=grader,
                                config=tiny)
    assert [t["end"] for t in pools[0]] == [bl.CONTEXT] * 2 and pools[0][0]["correct"] is False


def test_token_budgets(sandbox, grader):
    """A code block may hold max_depth steps (max_depth x max_step_tokens); the answer is one step. Both stop
    at the context limit."""
    sampler = ScriptedSampler(block_script, bl.BLOCK_STOPS)
    cfg = bl.BaselineConfig(max_step_tokens=30, max_depth=4, max_context_tokens=10_000)
    bl.sample_solutions(sampler, CharTokenizer(), SCRIPTED_PROBLEMS[:1], 1, sandbox=sandbox, grader=grader, config=cfg)
    assert [call[2].max_new_tokens for call in sampler.calls] == [120, 30]
    prompt = len(tk.format_prompt(SCRIPTED_PROBLEMS[0]["question"]))
    sampler.calls.clear()
    bl.sample_solutions(sampler, CharTokenizer(), SCRIPTED_PROBLEMS[:1], 1, sandbox=sandbox, grader=grader,
                        config=dataclasses.replace(cfg, max_context_tokens=prompt + 50))
    assert sampler.calls[0][2].max_new_tokens == 50


def test_samplers_must_match_the_baseline(sandbox):
    with pytest.raises(ValueError, match="block_sampler"):
        bl.greedy(ScriptedSampler(block_script, tk.STOP_TAGS), CharTokenizer(), SCRIPTED_PROBLEMS, sandbox=sandbox)
    with pytest.raises(ValueError, match="for_steps"):
        bl.step_beam_search(ScriptedSampler(step_script, bl.BLOCK_STOPS), CharTokenizer(), SCRIPTED_PROBLEMS,
                            scorer=OracleScorer(), sandbox=sandbox)
    with pytest.raises(ValueError, match="scorer"):
        bl.step_beam_search(ScriptedSampler(step_script, tk.STOP_TAGS), CharTokenizer(), SCRIPTED_PROBLEMS,
                            scorer=None, sandbox=sandbox)


def test_step_beam_search_scripted(sandbox, grader):
    sampler = ScriptedSampler(step_script, tk.STOP_TAGS)
    sb, gr, scorer = Counting(sandbox, "run"), Counting(grader, "grade_batch"), OracleScorer()
    cfg = bl.BaselineConfig(beam_width=2, samples_per_beam=4, max_depth=5)
    results = bl.step_beam_search(sampler, CharTokenizer(), SCRIPTED_PROBLEMS, scorer=scorer, sandbox=sb, grader=gr,
                                  config=cfg)
    # Depth 1: one prompt per problem; after that at most beam_width live entries per problem.
    assert [len(c[0]) for c in sampler.calls] == [3, 6, 6] and all(c[1] == 4 for c in sampler.calls)
    assert len(sb.calls) == 2 and len(gr.calls) == 1 and len(scorer.calls) == 3
    # Depth 1 sandbox: per problem x = a, x = a + 1 and the failing 1 // 0 (the cut one never runs).
    assert len(sb.calls[0]) == 3 * 3
    for (a, b), res, problem in zip([(3, 4), (10, 5), (1, 1)], results, SCRIPTED_PROBLEMS):
        assert len(res) == 2  # beam_width finished trajectories: both from the x = a entry
        assert [t["score"] for t in res] == sorted((t["score"] for t in res), reverse=True)
        best, other = res
        assert best["response"] == (f"<code>\n# Step 1: start\nx = {a}\n<end_of_step># Step 2: add\nprint(x + {b})\n"
                                    f"<end_of_code>\n<output>{a + b}<end_of_output>\n"
                                    f"<answer>The answer is \\boxed{{{a + b}}}<end_of_answer>")
        assert best["final_answer"] == str(a + b) and other["final_answer"] == str(a - 1000)
        assert best["correct"] is (True if "answer" in problem else None)
        assert other["correct"] is (False if "answer" in problem else None)
        assert all("1 // 0" not in t["response"] and t["end"] == bl.ANSWER for t in res)
        assert best["num_tokens"] == len(best["response"]) - len(f"\n<output>{a + b}<end_of_output>\n")
        prompt = tk.format_prompt(problem["question"])
        assert best["score"] == pytest.approx(float(scorer.score([prompt + best["response"]])[0]))
    # Beam 1: one finished trajectory, the scorer's favourite path.
    one = bl.step_beam_search(ScriptedSampler(step_script, tk.STOP_TAGS), CharTokenizer(), SCRIPTED_PROBLEMS,
                              scorer=scorer, sandbox=sandbox, grader=grader,
                              config=bl.BaselineConfig(beam_width=1, samples_per_beam=4))
    assert [[t["final_answer"] for t in r] for r in one] == [["7"], ["15"], ["2"]]
    # Depth limit: two steps are not enough to reach an answer.
    short = bl.step_beam_search(ScriptedSampler(step_script, tk.STOP_TAGS), CharTokenizer(), SCRIPTED_PROBLEMS,
                                scorer=scorer, sandbox=sandbox, grader=grader,
                                config=bl.BaselineConfig(beam_width=2, samples_per_beam=4, max_depth=2))
    assert short == [[], [], []]


# ---------------------------------------------------------------------------------------------------
# The real tiny model


@pytest.fixture(scope="module")
def policy(miniature):
    from flax import nnx

    from experiments.expand import example_problem
    from rstar_jax.models.ppm import PPM
    from rstar_jax.search.scoring import Scorer

    tokenizer, model = miniature["tokenizer"], miniature["model"]
    ppm = PPM(model.config, rngs=nnx.Rngs(1), backbone=model)
    ppm.v_head.weight[...] = np.random.default_rng(0).normal(0, 1, ppm.v_head.weight.shape).astype(np.float32)
    scorer = Scorer(ppm, lambda t: tokenizer.encode(t, add_special_tokens=False), pad_id=tokenizer.pad_token_id,
                    cache_mib=64)  # beam search scores steps on stored contexts
    rng = random.Random(7)
    problems = [example_problem(rng, i)[0] for i in range(3)]
    return {"tokenizer": tokenizer, "block": bl.block_sampler(model, tokenizer),
            "steps": Sampler.for_steps(model, tokenizer, cache_mib=64),  # beam steps prefill on stored contexts
            "scorer": scorer, "problems": problems}


REAL = bl.BaselineConfig(max_step_tokens=40, max_context_tokens=512, exec_timeout_s=5.0, beam_width=3,
                         samples_per_beam=3, max_depth=3)


def check_against_grader(trajectories, problem, grader):
    for t in trajectories:
        assert set(t) == KEYS and t["end"] in bl.END_REASONS and t["num_tokens"] >= 1
        if t["final_answer"] is None:
            assert t["correct"] is False and t["end"] != bl.ANSWER
        else:
            verdict = grader.grade(t["response"], problem["answer"])
            assert (verdict.extracted, verdict.equal) == (t["final_answer"], t["correct"])


def test_greedy_real_model(policy, sandbox, grader):
    p = policy
    first = bl.greedy(p["block"], p["tokenizer"], p["problems"], sandbox=sandbox, grader=grader, scorer=p["scorer"],
                      config=REAL)
    again = bl.greedy(p["block"], p["tokenizer"], p["problems"], sandbox=sandbox, grader=grader, scorer=p["scorer"],
                      config=REAL)
    assert first == again  # temperature 0: deterministic, scores included
    assert [len(r) for r in first] == [1, 1, 1]
    for res, problem in zip(first, p["problems"]):
        check_against_grader(res, problem, grader)
        assert -1 <= res[0]["score"] <= 1
        assert not res[0]["response"].endswith(tk.STEP_END)  # the block is one generation, not one step


def test_sampled_pool_best_of_n_and_majority_real_model(policy, sandbox, grader):
    p = policy
    pools = bl.sample_solutions(p["block"], p["tokenizer"], p["problems"], 4, sandbox=sandbox, grader=grader,
                                scorer=p["scorer"], config=REAL)
    assert [len(pool) for pool in pools] == [4, 4, 4]
    texts = [tk.format_prompt(prob["question"]) + t["response"] for prob, pool in zip(p["problems"], pools)
             for t in pool]
    assert [t["score"] for pool in pools for t in pool] == pytest.approx(list(p["scorer"].score(texts)), abs=1e-5)
    assert len({t["response"] for pool in pools for t in pool}) > 3  # temperature 1: the samples differ
    for pool, problem, chosen in zip(pools, p["problems"], bl.best_of_n(pools)):
        check_against_grader(pool, problem, grader)
        answered = [t for t in pool if t["final_answer"] is not None]
        assert chosen is (max(answered, key=lambda t: t["score"]) if answered else None)
    groups = selection.group_answers_batch([[t["final_answer"] for t in pool] for pool in pools], grader)
    for pool, g, chosen in zip(pools, groups, bl.majority_vote(pools, grader=grader)):
        counts = {k: g.count(k) for k in g if k is not None}
        if not counts:
            assert chosen is None
        else:
            assert counts[g[pool.index(chosen)]] == max(counts.values())


def test_step_beam_search_real_model(policy, sandbox, grader):
    p = policy
    sampler = Counting(p["steps"], "generate")
    results = bl.step_beam_search(sampler, p["tokenizer"], p["problems"], scorer=p["scorer"], sandbox=sandbox,
                                  grader=grader, config=REAL)
    assert 2 <= len(sampler.calls) <= REAL.max_depth  # some steps survive (a comment-only step runs fine)
    assert len(sampler.calls[0]) == len(p["problems"])
    assert all(len(prompts) <= REAL.beam_width * len(p["problems"]) for prompts in sampler.calls)
    assert len(results) == len(p["problems"])
    for res, problem in zip(results, p["problems"]):
        assert len(res) <= REAL.beam_width
        assert [t["score"] for t in res] == sorted((t["score"] for t in res), reverse=True)
        assert all(t["final_answer"] is not None and t["end"] == bl.ANSWER for t in res)
        check_against_grader(res, problem, grader)
        if res:  # scored on stored contexts, as if whole
            np.testing.assert_allclose([t["score"] for t in res], p["scorer"].score(
                [tk.format_prompt(problem["question"]) + t["response"] for t in res]), atol=1e-5)
    assert p["scorer"].store.hits > 0
    assert p["steps"].store.hits > 0  # each step was generated after its beam's stored context
