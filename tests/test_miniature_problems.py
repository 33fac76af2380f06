"""The miniature's word problems and its noisy teacher (rstar_jax.data.miniature)."""
import collections
import contextlib
import io
import random
import re

import pytest

from rstar_jax.data import miniature as mini
from rstar_jax.verify.program import CODE_END, assemble_program, format_output

_STEP_TAGS = ("<end_of_step>", "<end_of_code>", "<end_of_output>", "<end_of_answer>")


def run_trusted(code: str) -> str:
    """Plain exec of a program this test generated itself (never of model output); its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"__builtins__": {"print": print}})  # noqa: S102 - trusted, generated arithmetic
    return out.getvalue()


def code_steps(text: str) -> list[str]:
    """The steps of a solution up to and including the one that closes the code block."""
    steps = mini.solution_steps(text)
    end = next(i for i, s in enumerate(steps) if s.endswith(CODE_END))
    return steps[:end + 1]


def test_deterministic_for_a_seed():
    assert mini.make_pool(60, 3) == mini.make_pool(60, 3)
    assert mini.make_pool(60, 3)[:40] == mini.make_pool(40, 3)  # growing a pool keeps its prefix
    assert mini.make_eval_sets(8, 3) == mini.make_eval_sets(8, 3)
    assert mini.make_eval_sets(8, 3, difficulties=[5])[5] == mini.make_eval_sets(8, 3)[5]
    assert mini.teacher_corpus(60, 3) == mini.teacher_corpus(60, 3)
    assert mini.make_pool(60, 3) != mini.make_pool(60, 4)
    assert mini.teacher_corpus(60, 3) != mini.teacher_corpus(60, 4)
    problem = mini.make_pool(1, 0, difficulties=[4])[0]
    assert mini.solve(problem, random.Random(7)) == mini.solve(problem, random.Random(7))


def test_records_are_problem_shaped_with_stable_ids():
    pool = mini.make_pool(70, 11)
    assert [p["id"] for p in pool] == [f"mini/train/11/{i}" for i in range(70)]
    assert [p["difficulty"] for p in pool] == [1 + i % 7 for i in range(70)]
    evals = mini.make_eval_sets(5, 11)
    assert sorted(evals) == list(range(1, 8))
    for d, problems in evals.items():
        assert [p["id"] for p in problems] == [f"mini/eval/d{d}/11/{i}" for i in range(5)]
        assert all(p["difficulty"] == d and p["split"] == "eval" for p in problems)
    for p in pool:
        assert p["split"] == "train"
        assert {"id", "question", "answer", "difficulty", "split"} <= set(p)
        assert p["question"].endswith("?") and re.fullmatch(r"\d+", p["answer"])
    with pytest.raises(ValueError):
        mini.make_pool(3, 0, difficulties=[8])


def test_difficulty_is_the_number_of_operations():
    for p in mini.make_pool(140, 2) + [q for ps in mini.make_eval_sets(5, 2).values() for q in ps]:
        d = p["difficulty"]
        assert len(p["spec"]["ops"]) == d
        text = mini.reference_solution(p).text
        assert re.findall(r"# Step (\d+):", text) == [str(i) for i in range(1, d + 1)]
        assert text.count("<end_of_step>") == d
        program = assemble_program(code_steps(text))
        assignments = [line for line in program.splitlines() if re.match(r"^\w+ = ", line)]
        assert len(assignments) == d  # one assignment (one operation of the story) per step


def test_answers_equal_the_executed_correct_program():
    checked = 0
    for seed in range(12):
        problems = mini.make_pool(35, seed) + [q for ps in mini.make_eval_sets(2, seed).values() for q in ps]
        for p in problems:
            steps = code_steps(mini.reference_solution(p).text)
            assert run_trusted(assemble_program(steps)).strip() == p["answer"]
            # Every intermediate amount is a positive integer (divisions exact): run each prefix.
            item = p["spec"]["item"]
            for i in range(1, len(steps)):
                value = int(run_trusted(assemble_program(steps[:i]) + f"\nprint({item})"))
                assert 1 <= value <= mini.MAX_VALUE
            checked += 1
    assert checked == 12 * (35 + 14)


def test_noise_free_teacher_is_always_correct():
    rng = random.Random(0)
    for p in mini.make_pool(700, 9):
        solution = mini.solve(p, rng, noise=0.0, trap_error_rate=0.0)
        assert solution.is_correct and solution.value == p["answer"]
        assert all(s.noise is None and not s.misread for s in solution.steps)
        assert solution == mini.reference_solution(p)


@pytest.mark.parametrize("noise", [0.15, 0.4])
def test_step_noise_rate_is_the_configured_one(noise):
    rng = random.Random(1)
    problems = mini.make_pool(1400, 21, trap_rate=0.0)
    solutions = [mini.solve(p, rng, noise=noise, trap_error_rate=0.0) for p in problems]
    steps = [s for sol in solutions for s in sol.steps]
    assert len(steps) == 4 * len(problems)
    rate = sum(s.noise is not None for s in steps) / len(steps)
    assert abs(rate - noise) < 0.03, rate  # 5600 steps: the standard error is at most 0.007
    assert set(s.noise for s in steps) == set(mini.NOISE_KINDS) | {None}
    clean = [sol for sol in solutions if all(s.noise is None for s in sol.steps)]
    assert all(sol.is_correct for sol in clean)
    # A random step error almost always changes the answer (it always changes the step's value).
    noisy = [sol for sol in solutions if any(s.noise for s in sol.steps)]
    assert sum(not sol.is_correct for sol in noisy) / len(noisy) > 0.9
    # Per difficulty, the share of wrong solutions follows 1 - (1 - noise) ** d, a little below it since a
    # later floor division sometimes undoes an error (200 problems each: the standard error is <= 0.035).
    for d in (1, 4, 7):
        sols = [sol for p, sol in zip(problems, solutions) if p["difficulty"] == d]
        wrong = sum(not sol.is_correct for sol in sols) / len(sols)
        expected = 1 - (1 - noise) ** d
        assert 0.8 * expected - 0.05 < wrong < expected + 0.06, (d, wrong, expected)


def test_traps_appear_and_are_misread_at_the_configured_rate():
    problems = mini.make_pool(2100, 4)
    kinds = collections.Counter(op["kind"] for p in problems for op in p["spec"]["ops"])
    assert set(kinds) == set(mini.REGULAR_KINDS + mini.TRAP_KINDS)
    trap_problems = [p for p in problems if mini.trap_positions(p)]
    assert 0.2 < len(trap_problems) / len(problems) < 0.5
    questions = " ".join(p["question"] for p in trap_problems)
    assert "friends and keeps one share" in questions and "to each of" in questions

    rng = random.Random(2)
    solutions = [mini.solve(p, rng, noise=0.0) for p in trap_problems]  # default trap_error_rate
    trap_steps = [s for sol in solutions for s in sol.steps if s.trap]
    assert len(trap_steps) > 400
    misread = sum(s.misread for s in trap_steps) / len(trap_steps)
    assert abs(misread - mini.TRAP_ERROR_RATE) < 0.08, misread
    assert not any(s.misread for sol in solutions for s in sol.steps if not s.trap)
    for sol in solutions:  # any misreading makes the answer wrong (the generator guarantees it)
        assert sol.is_correct == (not any(s.misread for s in sol.steps))
    single = [sol for p, sol in zip(trap_problems, solutions) if len(mini.trap_positions(p)) == 1]
    assert abs(sum(not sol.is_correct for sol in single) / len(single) - mini.TRAP_ERROR_RATE) < 0.08

    for p in trap_problems[:200]:
        assert mini.solve(p, rng, noise=0.0, trap_error_rate=0.0).is_correct
        assert not mini.solve(p, rng, noise=0.0, trap_error_rate=1.0).is_correct


def test_trap_misreadings_are_the_documented_ones():
    rng = random.Random(0)
    for p in mini.make_pool(700, 8):
        wrong = mini.solve(p, rng, noise=0.0, trap_error_rate=1.0)
        right = mini.reference_solution(p)
        for i, op in enumerate(p["spec"]["ops"]):
            code_right, code_wrong = right.steps[i].code, wrong.steps[i].code
            if op["kind"] == "share_with":
                assert code_right.endswith(f" // ({op['m']} + 1)") and code_wrong.endswith(f" // {op['m']}")
            elif op["kind"] == "give_each":
                assert code_right.endswith(f" - {op['m']} * {op['k']}") and code_wrong.endswith(f" - {op['k']}")
            else:
                assert code_right == code_wrong


def test_majority_vote_of_the_teacher_is_wrong_on_most_trap_problems():
    rng = random.Random(3)
    problems = [p for p in mini.make_pool(700, 6, difficulties=[1, 2, 3]) if len(mini.trap_positions(p)) == 1]
    wrong = 0
    for p in problems[:80]:
        votes = collections.Counter(mini.solve(p, rng).value for _ in range(16))
        wrong += votes.most_common(1)[0][0] != p["answer"]
    assert wrong / min(80, len(problems)) > 0.55


def test_train_and_eval_are_disjoint():
    train = mini.make_pool(3500, 0) + [p for p, _, _ in mini.teacher_corpus(1400, 1)]
    evals = [p for seed in (0, 1) for ps in mini.make_eval_sets(100, seed).values() for p in ps]
    train_questions = {p["question"] for p in train}
    eval_questions = {p["question"] for p in evals}
    assert len(eval_questions) == len(evals)
    assert not train_questions & eval_questions
    assert all(p["split"] == "train" for p in train) and all(p["split"] == "eval" for p in evals)
    # Not even the same story with other distractors: the stories' specs are disjoint too.
    key = lambda p: repr(sorted(p["spec"].items()))  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in evals}
    assert len({p["question"] for p in train[:3500]}) == 3500  # within a set no question repeats


_STEP_RE = re.compile(r"(<code>)?\n# Step (\d+): [^\n]+\n(\w+) = [^\n]+\n<end_of_step>")


def test_solutions_are_in_the_step_format_and_show_what_they_print():
    corpus = mini.teacher_corpus(700, 5) + mini.teacher_corpus(140, 6, noise=0.5, trap_error_rate=1.0)
    wrong = 0
    for problem, text, is_correct in corpus:
        steps = mini.solution_steps(text)
        assert "".join(steps) == text
        assert all(step.endswith(_STEP_TAGS) for step in steps)
        assert sum(step.endswith(tag) for step in steps for tag in _STEP_TAGS) == len(steps)
        d = problem["difficulty"]
        assert len(steps) == d + 3
        item = problem["spec"]["item"]
        for i, step in enumerate(steps[:d]):
            m = _STEP_RE.fullmatch(step if i else "\n" + step[len("<code>\n"):])
            assert m and m.group(2) == str(i + 1) and m.group(3) == item, step
        assert steps[0].startswith("<code>\n# Step 1: ")
        assert steps[d] == f"\n# Now print the final answer\nprint({item})\n<end_of_code>"
        printed = format_output(run_trusted(assemble_program(steps[:d + 1])))
        assert steps[d + 1] == f"\n<output>{printed}<end_of_output>"
        assert steps[d + 2] == f"\n<answer>The answer is \\boxed{{{printed}}}<end_of_answer>"
        assert is_correct == (printed == problem["answer"])
        wrong += not is_correct
    assert 0.3 < wrong / len(corpus) < 0.8


def test_run_arithmetic_evaluates_only_arithmetic():
    assert mini.run_arithmetic("a = 7\nb = a - a // 3\nprint(b * (2 + 1))\nprint(-a)") == "15\n-7\n"
    for code in ("import os", "print(open('x'))", "a = (1).__class__", "a = 2 ** 3", "print(b)", "a = 1.5",
                 "print(1, 2)", "a = [1]"):
        with pytest.raises(ValueError):
            mini.run_arithmetic(code)
    with pytest.raises(ZeroDivisionError):
        mini.run_arithmetic("print(1 // 0)")
