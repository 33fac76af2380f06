"""The problem format shared by every stage: {"id": str, "question": str, "answer": str, ...extras}.

Extra fields are kept as they came. A problem without an id gets a stable one, `"{name}/{index}"`:
the name of its set (a benchmark, a pool, or a file's stem) and the 0-based position of its record in
the source file (bad records count too, so skipping one never renumbers the others).
"""
from __future__ import annotations

import decimal
import math
import re
from typing import Any

from rstar_jax.errors import InputError

REQUIRED_FIELDS = ("id", "question", "answer")


class FieldError(InputError):
    """A record's field is missing or unusable; the reader adds file and line to it."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field {field!r}: {reason}")
        self.field = field
        self.reason = reason


def auto_id(name: str, index: int) -> str:
    """The stable id of a record that has none."""
    return f"{name}/{index}"


# An unescaped `$`: the math-mode delimiter, not the dollar sign `\$`.
_MATH_DOLLAR = re.compile(r"(?<!\\)\$")


def strip_math_delimiters(text: str) -> str:
    """`$\\frac12$` -> `\\frac12`; `$x=1$ or $x=2$` -> `x=1 or x=2`; `\\$5` stays (a dollar sign)."""
    return _MATH_DOLLAR.sub("", text).strip()


def canonical_number(value: int | float) -> str:
    """Numbers as a reference answer string: 27.0 -> "27", 0.5 -> "0.5", 1e-05 -> "0.00001"."""
    if isinstance(value, bool):  # bool is an int subclass; True is no answer.
        raise TypeError(f"a boolean is not a numeric answer: {value!r}")
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {value!r}")
    if value.is_integer():
        return str(int(value))
    # repr gives the shortest digits that round-trip; Decimal prints them without an exponent.
    return format(decimal.Decimal(repr(value)), "f")


def canonical_answer(value: Any) -> str:
    """A source answer (string, number, or list of them) as one non-empty answer string.

    Strings lose surrounding space and `$` math delimiters; numbers become their shortest exact
    decimal; lists are joined with ", " (callers keep the list itself as an extra field).
    """
    if isinstance(value, str):
        text = strip_math_delimiters(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            text = canonical_number(value)
        except ValueError as e:  # NaN or infinity
            raise FieldError("answer", str(e)) from None
    elif isinstance(value, list) and value:
        text = ", ".join(canonical_answer(item) for item in value)
    else:
        raise FieldError("answer", f"expected a string, number or non-empty list, got {value!r}")
    if not text:
        raise FieldError("answer", "empty answer")
    return text


def require(record: dict, field: str) -> Any:
    """The value of a field that must be present and not null."""
    if field not in record or record[field] is None:
        raise FieldError(field, "missing")
    return record[field]


def require_text(record: dict, field: str) -> str:
    value = require(record, field)
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise FieldError(field, "empty")
    return value


def first_present(record: dict, fields: tuple[str, ...]) -> str:
    """The first of several alternative field names that the record has (copies differ)."""
    for field in fields:
        if record.get(field) is not None:
            return field
    raise FieldError("/".join(fields), "missing (none of these fields is present)")


def problem_id(record: dict, field: str, name: str, index: int) -> str:
    """The record's own id if it has one, else the stable `auto_id`."""
    value = record.get(field)
    if value is None:
        return auto_id(name, index)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise FieldError(field, f"expected a string or integer id, got {value!r}")
    text = str(value).strip()
    if not text:
        raise FieldError(field, "empty id")
    return text


def problem_from_record(record: dict, index: int, name: str) -> dict:
    """A record already in the problem format (the mapper for plain problem files).

    A missing id becomes `auto_id(name, index)`; a numeric or list answer becomes a string (a list
    is also kept as "answers").
    """
    problem = dict(record)
    problem["id"] = problem_id(record, "id", name, index)
    problem["question"] = require_text(record, "question")
    raw_answer = require(record, "answer")
    problem["answer"] = canonical_answer(raw_answer)
    if isinstance(raw_answer, list):
        problem["answers"] = [canonical_answer(item) for item in raw_answer]
    return problem
