"""The embedded miniature's problems: seeded multi-step arithmetic word problems and a noisy teacher.

A problem is a short story about one person's items. The first sentence gives the starting amount, each
further sentence applies one operation (difficulty = number of operations, 1 to 7), distractor sentences
with irrelevant numbers are mixed in, and a question asks for the final amount. Every intermediate amount
is a positive integer and every division is exact.

    Mia has 24 shells. Mia is 9 years old. Mia buys 3 packs of 4 shells each. Mia shares the shells
    equally with 2 friends and keeps one share. How many shells does Mia have now?      (answer: 12)

Records are problem-shaped (`rstar_jax.data.problem`): `{"id", "question", "answer", "difficulty",
"split", "spec"}`; `spec` (JSON-serialisable: name, item, start, ops) is what the teacher solves from.

Sets: `make_pool` (training pool), `make_eval_sets` (held-out sets per difficulty) and the problems of
`teacher_corpus` are generated from separate seeded streams. Train and eval are disjoint by construction:
a problem's split is a fixed hash of its question without the distractor sentences, so no question (nor
the same story with other distractors) can be in a training set and an evaluation set, whatever the seeds.

The noisy teacher (`solve`) writes solutions in the rStar step format (RSTAR.md section 2), one step per
operation. Each step is wrong with probability `noise` (a wrong operation, a wrong number or swapped
operands). Two "trap" operations are misread systematically with probability `trap_error_rate`:

- "shares the items equally with m friends and keeps one share": m + 1 people share, the teacher writes
  `// m`;
- "gives k items to each of m friends": m * k items leave, the teacher writes `- k`.

A misread trap gives one consistent wrong answer (the generator makes sure that it differs from the
right one), so at the default 60% a majority vote over the teacher's (or a model's) samples picks it,
while random step noise scatters. The teacher's `<output>` is what its own (possibly wrong) program
prints, computed in-process by `run_arithmetic`, a small evaluator of assignments, integer arithmetic and
`print` (the only code the teacher writes); nothing is `exec`uted.

Everything is deterministic for a given seed. Pure Python.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
import random
import re
from collections.abc import Iterable, Sequence

from rstar_jax.verify.program import (ANSWER, ANSWER_END, CODE, CODE_END, OUTPUT, OUTPUT_END, STEP_END,
                                      assemble_program, format_output)

DIFFICULTIES = tuple(range(1, 8))
NOISE = 0.15  # probability that the teacher gets one step wrong at random
TRAP_ERROR_RATE = 0.6  # probability that the teacher misreads one trap operation
TRAP_RATE = 0.12  # probability that one operation of a generated problem is a trap
MAX_DISTRACTORS = 2  # distractor sentences per problem: 0 to this many
MAX_VALUE = 999  # bound on every (correct) intermediate amount
EVAL_FRACTION = 1 / 8  # share of all possible stories that belong to the eval split

REGULAR_KINDS = ("gain", "lose", "buy", "mult", "pile", "fraction")
TRAP_KINDS = ("share_with", "give_each")
KINDS = REGULAR_KINDS + TRAP_KINDS
NOISE_KINDS = ("wrong_op", "wrong_number", "swapped")

NAMES = ("Sam", "Mia", "Leo", "Ava", "Ben", "Zoe", "Nia", "Lily", "Tom", "Emma")
ITEMS = ("marbles", "stickers", "apples", "cards", "coins", "pencils", "shells", "books", "stamps", "cookies")

_START = ("{name} has {x} {item}.", "{name} starts with {x} {item}.", "{name} collects {x} {item}.")
_SENTENCES = {
    "gain": ("{name} finds {k} more {item}.", "{name} gets {k} {item} from {other}.", "{name} wins {k} {item}."),
    "lose": ("{name} loses {k} {item}.", "{name} gives {k} {item} to {other}.", "{name} sells {k} {item}."),
    "buy": ("{name} buys {k} packs of {m} {item} each.", "{name} buys {k} boxes with {m} {item} in each box."),
    "mult": ("{name} {mult_verb} the number of {item}.",),
    "pile": ("{name} puts the {item} into {m} equal piles and keeps one pile.",
             "{name} splits the {item} into {m} equal groups and keeps one group."),
    "fraction": ("{name} gives away {frac} of the {item}.", "{name} sells {frac} of the {item}."),
    "share_with": ("{name} shares the {item} equally with {m} friends and keeps one share.",
                   "{name} and {m} friends split the {item} equally, and {name} keeps one share."),
    "give_each": ("{name} gives {k} {item} to each of {m} friends.",
                  "Each of {m} friends gets {k} {item} from {name}."),
}
_COMMENTS = {
    "gain": "add the {k} new {item}",
    "lose": "take away the {k} {item}",
    "buy": "add {k} packs of {m} {item}",
    "mult": "multiply the {item} by {f}",
    "pile": "keep one of {m} equal piles",
    "fraction": "give away 1/{q} of the {item}",
    "share_with": "{name} and {m} friends make {m} + 1 equal shares, keep one",
    "give_each": "{m} friends get {k} {item} each",
}
# What the teacher thinks when it misreads a trap.
_TRAP_COMMENTS = {
    "share_with": "share equally among {m} friends, keep one share",
    "give_each": "give away {k} {item}",
}
_QUESTIONS = ("How many {item} does {name} have now?", "How many {item} does {name} have in the end?")
_DISTRACTORS = (
    "{other} has {n} {item}.",
    "{name} also has {n} {other_item}.",
    "{name} is {n} years old.",
    "The {item} cost {n} cents each.",
    "{other} lives {n} blocks away.",
    "There are {n} {other_item} on the table.",
)
_MULT_VERBS = {2: "doubles", 3: "triples"}
_FRACTIONS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}

# One step boundary per tag a generation stops at (as in experiments.expand), plus the output the
# search appends after <end_of_code>.
_STEP_BOUNDARY = r"(?<=<end_of_step>)|(?<=<end_of_code>)|(?<=<end_of_output>)|(?<=<end_of_answer>)"


# ---------------------------------------------------------------------------------------------------
# Seeds and splits


def _rng(seed: int, *labels) -> random.Random:
    """An independent, reproducible stream per (seed, labels) (no dependence on PYTHONHASHSEED)."""
    digest = hashlib.sha256(repr((int(seed),) + labels).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def split_of(core_text: str) -> str:
    """"eval" or "train": a fixed function of a story's text without its distractor sentences."""
    bucket = hashlib.sha256(core_text.encode()).digest()[0]
    return "eval" if bucket < round(256 * EVAL_FRACTION) else "train"


# ---------------------------------------------------------------------------------------------------
# Arithmetic expressions: ("num", v) | ("var", name) | (op, left, right), op in + - * //

_PREC = {"+": 1, "-": 1, "*": 2, "//": 2}
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//"}
_MAX_MAGNITUDE = 10 ** 15


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    elif op == "//":
        value = a // b  # ZeroDivisionError for b == 0, as Python's
    else:
        raise ValueError(f"unknown operator {op!r}")
    if abs(value) > _MAX_MAGNITUDE:
        raise OverflowError(f"value out of range: {value}")
    return value


def _eval(expr, env: dict) -> int:
    if expr[0] == "num":
        return expr[1]
    if expr[0] == "var":
        return env[expr[1]]
    return _apply(expr[0], _eval(expr[1], env), _eval(expr[2], env))


def _render(expr) -> str:
    if expr[0] == "num":
        return str(expr[1])
    if expr[0] == "var":
        return expr[1]
    op, left, right = expr
    text_l, text_r = _render(left), _render(right)
    if left[0] in _PREC and _PREC[left[0]] < _PREC[op]:
        text_l = f"({text_l})"
    if right[0] in _PREC and _PREC[right[0]] <= _PREC[op]:  # left-associative: a - (b - c) keeps them
        text_r = f"({text_r})"
    return f"{text_l} {op} {text_r}"


def _num_paths(expr, path=()) -> list[tuple]:
    if expr[0] == "num":
        return [path]
    if expr[0] == "var":
        return []
    return _num_paths(expr[1], path + (1,)) + _num_paths(expr[2], path + (2,))


def _swappable_paths(expr, path=()) -> list[tuple]:
    if expr[0] in ("num", "var"):
        return []
    own = [path] if expr[0] in ("-", "//") else []  # swapping + or * changes nothing
    return own + _swappable_paths(expr[1], path + (1,)) + _swappable_paths(expr[2], path + (2,))


def _get(expr, path):
    for i in path:
        expr = expr[i]
    return expr


def _replace(expr, path, new):
    if not path:
        return new
    parts = list(expr)
    parts[path[0]] = _replace(expr[path[0]], path[1:], new)
    return tuple(parts)


def run_arithmetic(code: str) -> str:
    """The standard output of a program made only of `name = <integer arithmetic>` and `print(<expr>)`.

    A tiny evaluator for the code the teacher writes (integer literals, names, + - * //, unary minus,
    parentheses); anything else is a ValueError. Nothing is executed.
    """
    env: dict[str, int] = {}
    lines = []
    for stmt in ast.parse(code).body:
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)):
            env[stmt.targets[0].id] = _eval_node(stmt.value, env)
        elif (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
              and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id == "print"
              and len(stmt.value.args) == 1 and not stmt.value.keywords):
            lines.append(str(_eval_node(stmt.value.args[0], env)))
        else:
            raise ValueError(f"not plain arithmetic: {ast.unparse(stmt)!r}")
    return "".join(line + "\n" for line in lines)


def _eval_node(node, env: dict) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise ValueError(f"name {node.id!r} is not defined")
        return env[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _apply(_BINOPS[type(node.op)], _eval_node(node.left, env), _eval_node(node.right, env))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval_node(node.operand, env)
        return -value if isinstance(node.op, ast.USub) else value
    raise ValueError(f"not plain arithmetic: {ast.unparse(node)!r}")


# ---------------------------------------------------------------------------------------------------
# Operations


def _step_expr(op: dict, x, misread: bool = False):
    """The expression of one operation applied to `x` (a number or the item variable)."""
    kind = op["kind"]
    num = lambda v: ("num", v)  # noqa: E731
    if kind == "gain":
        return ("+", x, num(op["k"]))
    if kind == "lose":
        return ("-", x, num(op["k"]))
    if kind == "buy":
        return ("+", x, ("*", num(op["k"]), num(op["m"])))
    if kind == "mult":
        return ("*", x, num(op["f"]))
    if kind == "pile":
        return ("//", x, num(op["m"]))
    if kind == "fraction":
        return ("-", x, ("//", x, num(op["q"])))
    if kind == "share_with":
        return ("//", x, num(op["m"])) if misread else ("//", x, ("+", num(op["m"]), num(1)))
    if kind == "give_each":
        return ("-", x, num(op["k"])) if misread else ("-", x, ("*", num(op["m"]), num(op["k"])))
    raise ValueError(f"unknown operation kind {kind!r}")


def _options(kind: str, x: int) -> list[dict]:
    """Every parameter choice of `kind` that keeps the amount a positive integer <= MAX_VALUE."""
    if kind == "gain":
        opts = [{"k": k} for k in range(2, 31) if x + k <= MAX_VALUE]
    elif kind == "lose":
        opts = [{"k": k} for k in range(2, min(30, x - 1) + 1)]
    elif kind == "buy":
        opts = [{"k": k, "m": m} for k in range(2, 7) for m in range(2, 13) if x + k * m <= MAX_VALUE]
    elif kind == "mult":
        opts = [{"f": f} for f in _MULT_VERBS if x * f <= MAX_VALUE]
    elif kind == "pile":
        opts = [{"m": m} for m in range(2, 7) if x % m == 0]
    elif kind == "fraction":
        opts = [{"q": q} for q in _FRACTIONS if x % q == 0]
    elif kind == "share_with":  # the misreading x // m must differ from x // (m + 1)
        opts = [{"m": m} for m in range(2, 6) if x % (m + 1) == 0 and x // m != x // (m + 1)]
    elif kind == "give_each":
        opts = [{"m": m, "k": k} for m in range(2, 6) for k in range(2, 11) if m * k < x]
    else:
        raise ValueError(f"unknown operation kind {kind!r}")
    return [{"kind": kind, **o} for o in opts]


def _run_spec(spec: dict, misread: Iterable[int] = ()) -> int:
    """The final amount when the operations at `misread` positions are read the teacher's wrong way."""
    misread = set(misread)
    value = spec["start"]
    for i, op in enumerate(spec["ops"]):
        value = _eval(_step_expr(op, ("num", value), i in misread), {})
    return value


def _template_fields(spec: dict, op: dict) -> dict:
    fields = dict(name=spec["name"], item=spec["item"], other=spec["other"], **op)
    if op["kind"] == "mult":
        fields["mult_verb"] = _MULT_VERBS[op["f"]]
    if op["kind"] == "fraction":
        fields["frac"] = _FRACTIONS[op["q"]]
    return fields


def trap_positions(problem: dict) -> list[int]:
    """0-based positions of the problem's trap operations."""
    return [i for i, op in enumerate(problem["spec"]["ops"]) if op["kind"] in TRAP_KINDS]


# ---------------------------------------------------------------------------------------------------
# Problems


def generate_problem(rng: random.Random, difficulty: int, *, trap_rate: float = TRAP_RATE,
                     max_distractors: int = MAX_DISTRACTORS) -> tuple[dict, str]:
    """One story with `difficulty` operations: (problem without id and split, its core text).

    Each operation is a trap with probability `trap_rate`. The core text (the question without its
    distractor sentences) decides the split (`split_of`).
    """
    if not 1 <= difficulty <= 7:
        raise ValueError(f"difficulty must be 1 to 7, got {difficulty}")
    if not 0.0 <= trap_rate <= 1.0:
        raise ValueError(f"trap_rate must be in [0, 1], got {trap_rate}")
    name, other = rng.sample(NAMES, 2)
    item, other_item = rng.sample(ITEMS, 2)
    spec = None
    while spec is None:
        kinds = [rng.choice(TRAP_KINDS) if rng.random() < trap_rate else rng.choice(REGULAR_KINDS)
                 for _ in range(difficulty)]
        for _ in range(50):  # numbers for these kinds; divisions must come out exact
            start = value = rng.randint(2, 60)
            ops = []
            for kind in kinds:
                options = _options(kind, value)
                if not options:
                    break
                ops.append(rng.choice(options))
                value = _eval(_step_expr(ops[-1], ("num", value)), {})
            else:
                candidate = {"name": name, "other": other, "item": item, "start": start, "ops": ops}
                traps = [i for i, op in enumerate(ops) if op["kind"] in TRAP_KINDS]
                # Every way of misreading traps must change the answer, so a misread is always wrong.
                if all(_run_spec(candidate, subset) != value
                       for r in range(1, len(traps) + 1) for subset in itertools.combinations(traps, r)):
                    spec = candidate
                    break

    fields = dict(name=name, item=item, other=other)
    sentences = [rng.choice(_START).format(x=spec["start"], **fields)]
    sentences += [rng.choice(_SENTENCES[op["kind"]]).format(**_template_fields(spec, op)) for op in spec["ops"]]
    question = rng.choice(_QUESTIONS).format(**fields)
    core = " ".join(sentences + [question])
    for _ in range(rng.randint(0, max_distractors)):
        text = rng.choice(_DISTRACTORS).format(n=rng.randint(2, 60), other_item=other_item, **fields)
        sentences.insert(rng.randint(0, len(sentences)), text)
    problem = {"question": " ".join(sentences + [question]), "answer": str(_run_spec(spec)),
               "difficulty": difficulty, "spec": spec}
    return problem, core


def _generate_set(n: int, rng: random.Random, split: str, id_prefix: str, difficulties: Sequence[int],
                  **kwargs) -> list[dict]:
    """`n` distinct problems of `split`, difficulties in turn (round robin)."""
    difficulties = list(difficulties)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not difficulties:
        raise ValueError("no difficulties given")
    problems, seen = [], set()
    budget = 200 * n + 1000
    while len(problems) < n:
        budget -= 1
        if budget < 0:
            raise RuntimeError(f"could not generate {n} distinct {split} problems of difficulties {difficulties}")
        problem, core = generate_problem(rng, difficulties[len(problems) % len(difficulties)], **kwargs)
        if split_of(core) != split or problem["question"] in seen:
            continue
        seen.add(problem["question"])
        problems.append({"id": f"{id_prefix}/{len(problems)}", "question": problem["question"],
                         "answer": problem["answer"], "difficulty": problem["difficulty"], "split": split,
                         "spec": problem["spec"]})
    return problems


def make_pool(n: int, seed: int, difficulties: Iterable[int] = DIFFICULTIES, *, trap_rate: float = TRAP_RATE,
              max_distractors: int = MAX_DISTRACTORS) -> list[dict]:
    """The training pool: `n` distinct train-split problems, difficulties in turn.

    Ids are `mini/train/{seed}/{index}`; `make_pool(n, seed)` is a prefix of `make_pool(n + 1, seed)`.
    """
    return _generate_set(n, _rng(seed, "pool"), "train", f"mini/train/{seed}", list(difficulties),
                         trap_rate=trap_rate, max_distractors=max_distractors)


def make_eval_sets(per_difficulty: int, seed: int, difficulties: Iterable[int] = DIFFICULTIES, *,
                   trap_rate: float = TRAP_RATE, max_distractors: int = MAX_DISTRACTORS) -> dict[int, list[dict]]:
    """Held-out evaluation sets {difficulty: problems}, each from its own stream (so a set does not
    depend on which other difficulties are asked for). Ids are `mini/eval/d{difficulty}/{seed}/{index}`."""
    return {d: _generate_set(per_difficulty, _rng(seed, "eval", d), "eval", f"mini/eval/d{d}/{seed}", [d],
                             trap_rate=trap_rate, max_distractors=max_distractors)
            for d in difficulties}


def make_eval_set(per_difficulty: int, seed: int, difficulties: Iterable[int] = DIFFICULTIES) -> list[dict]:
    """`make_eval_sets` as one list, difficulty by difficulty in the order given."""
    return [p for per in make_eval_sets(per_difficulty, seed, difficulties).values() for p in per]


# ---------------------------------------------------------------------------------------------------
# The noisy teacher


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What the teacher did at one operation step."""

    kind: str  # the operation's kind
    trap: bool  # the operation is a trap
    misread: bool  # the teacher misread the trap
    noise: str | None  # the random error made: one of NOISE_KINDS, or None
    code: str  # the step's line of code


@dataclasses.dataclass(frozen=True)
class TeacherSolution:
    text: str  # the whole response in the rStar step format
    value: str  # what the program prints (the <output> and the boxed answer)
    is_correct: bool  # value == the problem's answer
    steps: tuple[StepRecord, ...]

    @property
    def step_texts(self) -> list[str]:
        return solution_steps(self.text)


def _add_noise(expr, env: dict, rng: random.Random):
    """`expr` with one random error whose value differs from the correct one, and its kind (or None)."""
    correct = _eval(expr, env)
    kinds = list(NOISE_KINDS)
    rng.shuffle(kinds)
    for kind in kinds:
        for _ in range(4):
            if kind == "wrong_op":
                op = rng.choice([o for o in _PREC if o != expr[0]])
                noisy = (op, expr[1], expr[2])
            elif kind == "wrong_number":
                path = rng.choice(_num_paths(expr))
                value = _get(expr, path)[1]
                noisy = _replace(expr, path, ("num", abs(value + rng.choice((-2, -1, 1, 2)))))
            else:
                paths = _swappable_paths(expr)
                if not paths:
                    break
                path = rng.choice(paths)
                op, left, right = _get(expr, path)
                noisy = _replace(expr, path, (op, right, left))
            try:
                if _eval(noisy, env) != correct:
                    return noisy, kind
            except (ZeroDivisionError, OverflowError):
                pass
    return expr, None


def solve(problem: dict, rng: random.Random | None = None, *, noise: float = NOISE,
          trap_error_rate: float = TRAP_ERROR_RATE) -> TeacherSolution:
    """The teacher's solution of a generated problem (it reads `problem["spec"]`).

    Each trap step is misread with probability `trap_error_rate`; then each step independently gets a
    random error with probability `noise`. With both 0 the solution is the correct one (no rng needed).
    """
    for label, rate in (("noise", noise), ("trap_error_rate", trap_error_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{label} must be in [0, 1], got {rate}")
    if rng is None:
        if noise or trap_error_rate:
            raise ValueError("a noisy teacher needs an rng")
        rng = random.Random(0)  # never drawn from
    spec = problem["spec"]
    item = spec["item"]
    env = {}
    records, step_texts = [], []
    for i, op in enumerate(spec["ops"]):
        trap = op["kind"] in TRAP_KINDS
        misread = trap and trap_error_rate > 0 and rng.random() < trap_error_rate
        x = ("num", spec["start"]) if i == 0 else ("var", item)
        expr = _step_expr(op, x, misread)
        error = None
        if noise > 0 and rng.random() < noise:
            expr, error = _add_noise(expr, env, rng)
        env[item] = _eval(expr, env)
        comment = (_TRAP_COMMENTS if misread else _COMMENTS)[op["kind"]].format(**_template_fields(spec, op))
        if i == 0:
            comment = f"start with {spec['start']} {item}, then {comment}"
        code = f"{item} = {_render(expr)}"
        opening = CODE + "\n" if i == 0 else "\n"
        step_texts.append(f"{opening}# Step {i + 1}: {comment}\n{code}\n{STEP_END}")
        records.append(StepRecord(op["kind"], trap, misread, error, code))
    step_texts.append(f"\n# Now print the final answer\nprint({item})\n{CODE_END}")
    value = format_output(run_arithmetic(assemble_program(step_texts)))
    if value != str(env[item]):  # the rendered code and the expressions must agree
        raise AssertionError(f"teacher program prints {value!r}, expected {env[item]!r}")
    step_texts.append(f"\n{OUTPUT}{value}{OUTPUT_END}")
    step_texts.append(f"\n{ANSWER}The answer is \\boxed{{{value}}}{ANSWER_END}")
    return TeacherSolution("".join(step_texts), value, value == problem["answer"], tuple(records))


def reference_solution(problem: dict) -> TeacherSolution:
    """The correct solution (the teacher without noise and without misreadings)."""
    return solve(problem, None, noise=0.0, trap_error_rate=0.0)


def solution_steps(text: str) -> list[str]:
    """A response split into its steps, each ending at a step tag (as the search sees them)."""
    return [step for step in re.split(_STEP_BOUNDARY, text) if step]


def teacher_corpus(n: int, seed: int, noise: float = NOISE, trap_error_rate: float = TRAP_ERROR_RATE, *,
                   difficulties: Iterable[int] = DIFFICULTIES, trap_rate: float = TRAP_RATE,
                   max_distractors: int = MAX_DISTRACTORS) -> list[tuple[dict, str, bool]]:
    """`n` (problem, solution text, is_correct) for the base model's training, one teacher sample each.

    The problems are train-split problems from their own stream (ids `mini/teacher/{seed}/{index}`), not
    those of `make_pool(n, seed)`.
    """
    problems = _generate_set(n, _rng(seed, "teacher-problems"), "train", f"mini/teacher/{seed}",
                             list(difficulties), trap_rate=trap_rate, max_distractors=max_distractors)
    rng = _rng(seed, "teacher")
    corpus = []
    for problem in problems:
        solution = solve(problem, rng, noise=noise, trap_error_rate=trap_error_rate)
        corpus.append((problem, solution.text, solution.is_correct))
    return corpus


__all__ = [
    "DIFFICULTIES",
    "NOISE",
    "NOISE_KINDS",
    "TRAP_ERROR_RATE",
    "TRAP_KINDS",
    "TRAP_RATE",
    "StepRecord",
    "TeacherSolution",
    "generate_problem",
    "make_eval_sets",
    "make_pool",
    "reference_solution",
    "run_arithmetic",
    "solution_steps",
    "solve",
    "split_of",
    "teacher_corpus",
    "trap_positions",
]
