"""Benchmark source records -> problems, one mapper per source schema.

Field names follow the public copies (HuggingFaceH4/MATH-500, openai/grade-school-math, and the
Qwen2.5-Math `evaluation/data/*/test.jsonl` files that rStar-Math's numbers come from). Every mapper
has the `Mapper` signature `(record, index, name) -> problem`: the id is `"{name}/{source id}"` when
the source has an id field, else `"{name}/{index}"`. Fields not consumed by the mapping are kept as
they came, except that a source field named "id" is kept as "source_id".
"""
from __future__ import annotations

import re

from rstar_jax.data.problem import (
    FieldError,
    auto_id,
    canonical_answer,
    first_present,
    problem_id,
    require,
    require_text,
)

# Copies of the same benchmark name the question field differently ("problem" upstream,
# "question" in some re-serialisations); both mean the same thing.
QUESTION_FIELDS = ("problem", "question")


def _problem(record: dict, *, name: str, index: int, id_field: str | None, question: str,
             answer: str, consumed: tuple[str, ...], **derived) -> dict:
    problem = {k: v for k, v in record.items() if k not in consumed}
    if "id" in problem:  # the problem's own id takes this name; keep the source's beside it
        problem["source_id"] = problem.pop("id")
    if id_field is not None and record.get(id_field) is not None:
        problem["id"] = f"{name}/{problem_id(record, id_field, name, index)}"
    else:
        problem["id"] = auto_id(name, index)
    problem.update(question=question, answer=answer, **derived)
    return problem


def _plain(record: dict, index: int, name: str, *, id_field: str | None) -> dict:
    """Question under "problem" or "question", answer under "answer" (string or number)."""
    question_field = first_present(record, QUESTION_FIELDS)
    return _problem(record, name=name, index=index, id_field=id_field,
                    question=require_text(record, question_field),
                    answer=canonical_answer(require(record, "answer")),
                    consumed=(question_field, "answer"))


def math500_problem(record: dict, index: int, name: str) -> dict:
    """MATH-500: problem, solution, answer, subject, level, unique_id ("test/algebra/1.json")."""
    return _plain(record, index, name, id_field="unique_id")


def aime24_problem(record: dict, index: int, name: str) -> dict:
    """AIME 2024 (AI-MO / Qwen copy): id, problem, solution, answer, url."""
    return _plain(record, index, name, id_field="id")


def amc23_problem(record: dict, index: int, name: str) -> dict:
    """AMC 2023 (AI-MO / Qwen copy): id, question (or problem), answer as a float (27.0), url."""
    return _plain(record, index, name, id_field="id")


def college_math_problem(record: dict, index: int, name: str) -> dict:
    """College Math (Qwen copy): question, answer `$`-wrapped, plus topic / source fields; no id."""
    return _plain(record, index, name, id_field=None)


def gaokao2023en_problem(record: dict, index: int, name: str) -> dict:
    """Gaokao 2023 En (Qwen copy): question, answer `$`-wrapped; no id."""
    return _plain(record, index, name, id_field=None)


def omni_math_problem(record: dict, index: int, name: str) -> dict:
    """Omni-MATH: domain (list), difficulty (float), problem, solution, answer, source; no id."""
    return _plain(record, index, name, id_field=None)


# "#### 1,234" at the end of a GSM8K rationale.
_GSM8K_FINAL = re.compile(r"####\s*(.*?)\s*$", re.DOTALL)
# A comma between digit groups ("1,234"), not a list separator ("1, 2").
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def gsm8k_problem(record: dict, index: int, name: str) -> dict:
    """GSM8K: question, answer = rationale + "#### N". Answer N without thousands separators; the
    rationale (with its <<calculator>> annotations) kept as "rationale"."""
    solution = require_text(record, "answer")
    head, sep, tail = solution.rpartition("####")
    final = _THOUSANDS_COMMA.sub("", tail.strip())
    if not sep or not final:
        raise FieldError("answer", "no final '#### <answer>' in the GSM8K rationale")
    return _problem(record, name=name, index=index, id_field=None,
                    question=require_text(record, "question"), answer=final,
                    consumed=("question", "answer"), rationale=head.strip())


def olympiadbench_problem(record: dict, index: int, name: str) -> dict:
    """OlympiadBench (Qwen copy: the text-only English math open-ended subset): id, question,
    final_answer as a list of `$`-wrapped strings, context, solution, unit, answer_type, ...

    The answer is the list joined with ", " and the list is kept as "answers". A non-empty
    "context" (shared preamble of a problem group) is prepended to the question, since the
    question is incomplete without it.
    """
    raw = require(record, "final_answer")
    items = raw if isinstance(raw, list) else [raw]
    try:
        answers = [canonical_answer(item) for item in items]
    except FieldError as e:
        raise FieldError("final_answer", e.reason) from None
    if not answers:
        raise FieldError("final_answer", "empty list")
    question = require_text(record, "question")
    context = record.get("context")
    if isinstance(context, str) and context.strip():
        question = f"{context.strip()}\n\n{question}"
    return _problem(record, name=name, index=index, id_field="id", question=question,
                    answer=", ".join(answers), consumed=("question", "final_answer"), answers=answers)
