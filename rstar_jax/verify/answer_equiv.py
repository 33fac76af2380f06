"""Equivalence of two canonical answers (see `answer_extract.canonical_answer`).

Two tiers share one structure walk:
- fast (`symbolic=False`): exact strings, plain numbers, words and choice letters. Pure Python with
  bounded input sizes, safe in the caller's process; returns None ("undecided") for anything that needs
  sympy.
- symbolic (`symbolic=True`): additionally sympy via math-verify / latex2sympy2_extended. Unbounded in
  time on adversarial input, so it runs only in a grader worker process that can be killed
  (`rstar_jax.verify.grader`). sympy is imported lazily so the fast tier stays light.

Structure: a bare comma list (several answers) and a set `\\{...\\}` are unordered; tuples, points and
intervals `(a,b)`, `[a,b)` are ordered and their brackets must agree; a one-element list or set stands
for its element; `a\\pm b` is the list `a+b, a-b`; a one-row or one-column matrix is a tuple.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

# (equal, reason); equal is None when the fast tier cannot decide.
Outcome = tuple[Optional[bool], str]

DEFAULT_REL_TOL = 1e-4  # as in the Qwen2.5-Math evaluation the paper's numbers come from
_MAX_NUMBER_CHARS = 120
_MAX_EXPONENT = 1000
_MAX_ELEMENTS = 64
_MAX_NESTING = 8
_FAST_MAX_CHARS = 2000

# ---------------------------------------------------------------------------------------------------
# Plain numbers: integers, decimals, fractions of integers, percentages and scientific notation,
# parsed exactly into a Fraction. No thousands separators: `canonical_answer` removes them (`2,500` ->
# `2500`), so a comma left in a canonical answer always separates items (`2,500` is the list 2, 500).

_MANTISSA = r"(?P<mantissa>\d+(?:\.\d*)?|\.\d+)"
_EXPONENT = r"(?:[eE](?P<e1>[+-]?\d+)|(?:\\times|\\cdot|\*)10\^(?:\{(?P<e2>[+-]?\d+)\}|(?P<e3>\d)))"
_FRACTION = (
    r"\\frac\{(?P<fn1>[+-]?\d+)\}\{(?P<fd1>[+-]?\d+)\}|\\frac(?P<fn2>\d)(?P<fd2>\d)"
    r"|(?P<fn3>\d+)/(?P<fd3>\d+)"
)
_PLAIN_NUMBER = re.compile(
    rf"(?P<sign>[+-]?)(?:{_MANTISSA}{_EXPONENT}?|{_FRACTION}|10\^(?:\{{(?P<e4>[+-]?\d+)\}}|(?P<e5>\d)))(?P<percent>%?)"
)


@dataclass(frozen=True)
class PlainNumber:
    value: Fraction
    inexact: bool  # written with decimal digits: compared with a relative tolerance
    percent: bool  # `50%` also matches 0.5


def parse_number(text: str) -> PlainNumber | None:
    """A plain number written in `text`, or None. Bounded: long strings and huge exponents give None."""
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    match = _PLAIN_NUMBER.fullmatch(text)
    if match is None:
        return None
    groups = match.groupdict()
    sign = -1 if groups["sign"] == "-" else 1
    inexact = False
    if groups["mantissa"] is not None:
        mantissa = groups["mantissa"]
        inexact = "." in mantissa and not mantissa.endswith(".")
        value = Fraction(mantissa.rstrip(".") or "0")
    else:
        numerator = groups["fn1"] or groups["fn2"] or groups["fn3"]
        denominator = groups["fd1"] or groups["fd2"] or groups["fd3"]
        if numerator is None:  # a bare power of ten
            numerator, denominator = "1", "1"
        if int(denominator) == 0:
            return None
        value = Fraction(int(numerator), int(denominator))
    exponent = next((groups[k] for k in ("e1", "e2", "e3", "e4", "e5") if groups[k] is not None), None)
    if exponent is not None:
        if abs(int(exponent)) > _MAX_EXPONENT:
            return None
        value *= Fraction(10) ** int(exponent)
    return PlainNumber(sign * value, inexact, bool(groups["percent"]))


def _values_close(a: Fraction, b: Fraction, inexact: bool, rel_tol: float) -> bool:
    if a == b:
        return True
    return inexact and abs(a - b) <= Fraction(rel_tol) * max(abs(a), abs(b))


def numbers_equal(pred: PlainNumber, ref: PlainNumber, rel_tol: float) -> bool:
    """Exact for integers and fractions; relative tolerance once either side has decimal digits.
    A percentage on one side only matches its value or its value / 100 (`50%` ~ `50` ~ `0.5`)."""
    inexact = pred.inexact or ref.inexact
    if pred.percent == ref.percent:
        return _values_close(pred.value, ref.value, inexact, rel_tol)
    percent, other = (pred, ref) if pred.percent else (ref, pred)
    return any(
        _values_close(candidate, other.value, inexact, rel_tol)
        for candidate in (percent.value, percent.value / 100)
    )


# ---------------------------------------------------------------------------------------------------
# Words and multiple-choice letters: compared as text, never as products of one-letter symbols
# (sympy would make `Evelyn` equal `Evenly`).

_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]{2,}")
_CHOICE = re.compile(r"\(?([A-E])\)?")


def _fast_atom_outcome(pred: str, ref: str, rel_tol: float) -> Outcome:
    if not pred or not ref:
        return False, "empty answer"
    if pred == ref:
        return True, "exact string"
    if len(pred) > _FAST_MAX_CHARS or len(ref) > _FAST_MAX_CHARS:
        return None, "long answer"
    pred_number, ref_number = parse_number(pred), parse_number(ref)
    if pred_number is not None and ref_number is not None:
        return numbers_equal(pred_number, ref_number, rel_tol), "numeric"
    pred_choice, ref_choice = _CHOICE.fullmatch(pred), _CHOICE.fullmatch(ref)
    if pred_choice and ref_choice:
        return pred_choice.group(1).upper() == ref_choice.group(1).upper(), "choice letter"
    if _WORD.fullmatch(pred) and _WORD.fullmatch(ref):
        return pred.casefold() == ref.casefold(), "text"
    return None, "needs symbolic comparison"


# ---------------------------------------------------------------------------------------------------
# Structure: lists, sets, tuples and intervals, split at top-level commas.


@dataclass(frozen=True)
class Shape:
    kind: str  # "atom" | "ordered" | "unordered"
    text: str  # the canonical text this shape was parsed from
    brackets: str = ""  # ordered: "()", "[)", ...; unordered: "{}" for a set, "" for a bare list
    items: tuple["Shape", ...] = ()


_OPENERS = "([{"
_CLOSERS = ")]}"
_MATRIX = re.compile(r"\\begin\{(?P<env>[pbvBV]?matrix)\}(?P<body>.*)\\end\{(?P=env)\}", re.DOTALL)


def _scan(text: str):
    """Yield (index, token, depth_before) for bracket and comma tokens; `\\{`, `\\}` are brackets and
    other escapes are skipped. Depth ignores bracket types so half-open intervals `[a,b)` nest."""
    depth = 0
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            token = text[i : i + 2]
            if token in ("\\{", "\\}"):
                yield i, token, depth
                depth += 1 if token == "\\{" else -1
            i += 2
            continue
        if char in _OPENERS or char in _CLOSERS or char == ",":
            yield i, char, depth
            if char in _OPENERS:
                depth += 1
            elif char in _CLOSERS:
                depth -= 1
        i += 1


def _split_top_level(text: str) -> list[str]:
    parts, start = [], 0
    for index, token, depth in _scan(text):
        if token == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return [part for part in parts if part]


def _wraps_whole(text: str, closer_len: int) -> bool:
    """True when the bracket that opens text closes exactly at its end."""
    for index, token, depth in _scan(text):
        if depth == 1 and token in (")", "]", "}", "\\}"):
            return index == len(text) - closer_len
    return False


def _matrix_as_tuple(text: str) -> list[str] | None:
    match = _MATRIX.fullmatch(text)
    if match is None:
        return None
    rows = [row for row in match.group("body").split("\\\\") if row.strip()]
    cells = [[cell for cell in row.split("&")] for row in rows]
    if len(cells) == 1:
        return cells[0]
    if all(len(row) == 1 for row in cells):
        return [row[0] for row in cells]
    return None


def parse_shape(text: str, depth: int = 0) -> Shape:
    """The structure of a canonical answer (bounded: deep nesting or huge text stays one atom)."""
    if parse_number(text) is not None or len(text) > _FAST_MAX_CHARS * 4 or depth > _MAX_NESTING:
        return Shape("atom", text)
    parts = _split_top_level(text)
    if len(parts) > 1:
        return _container("unordered", text, "", parts, depth)
    if text.startswith("\\{") and text.endswith("\\}") and _wraps_whole(text, 2):
        return _container("unordered", text, "{}", _split_top_level(text[2:-2]), depth)
    if len(text) >= 2 and text[0] in "([" and text[-1] in ")]" and _wraps_whole(text, 1):
        inner = _split_top_level(text[1:-1])
        if len(inner) > 1:
            return _container("ordered", text, text[0] + text[-1], inner, depth)
        if text[0] == "(" and text[-1] == ")" and inner:
            return parse_shape(inner[0], depth + 1)  # `(x+1)` is `x+1`
    cells = _matrix_as_tuple(text)
    if cells is not None:
        return _container("ordered", text, "()", cells, depth)
    if text.count("\\pm") == 1 and "\\mp" not in text:
        plus, minus = text.replace("\\pm", "+"), text.replace("\\pm", "-")
        return Shape("unordered", text, "", (Shape("atom", plus), Shape("atom", minus)))
    return Shape("atom", text)


def _container(kind: str, text: str, brackets: str, parts: list[str], depth: int) -> Shape:
    if len(parts) > _MAX_ELEMENTS:
        return Shape("atom", text)
    return Shape(kind, text, brackets, tuple(parse_shape(part, depth + 1) for part in parts))


AtomComparer = Callable[[str, str], Outcome]


def _all_of(outcomes) -> Outcome:
    undecided = None
    for position, (equal, reason) in enumerate(outcomes):
        if equal is False:
            return False, f"element {position + 1} differs ({reason})"
        if equal is None:
            undecided = (None, reason)
    return undecided or (True, "all elements equal")


def _has_perfect_matching(size: int, edge: Callable[[int, int], bool]) -> bool:
    """Bipartite perfect matching (Kuhn's augmenting paths); edges are evaluated lazily."""
    match_of_ref: list[int | None] = [None] * size

    def augment(pred_index: int, seen: set[int]) -> bool:
        for ref_index in range(size):
            if ref_index in seen or not edge(pred_index, ref_index):
                continue
            seen.add(ref_index)
            if match_of_ref[ref_index] is None or augment(match_of_ref[ref_index], seen):
                match_of_ref[ref_index] = pred_index
                return True
        return False

    return all(augment(pred_index, set()) for pred_index in range(size))


def _unordered_outcome(pred: Shape, ref: Shape, atoms: AtomComparer) -> Outcome:
    size = len(pred.items)
    outcomes: dict[tuple[int, int], Outcome] = {}

    def outcome(i: int, j: int) -> Outcome:
        if (i, j) not in outcomes:
            outcomes[i, j] = compare_shapes(pred.items[i], ref.items[j], atoms)
        return outcomes[i, j]

    if _has_perfect_matching(size, lambda i, j: outcome(i, j)[0] is True):
        return True, "same elements in any order"
    if _has_perfect_matching(size, lambda i, j: outcome(i, j)[0] is not False):
        return None, "needs symbolic comparison of elements"
    return False, "different elements"


def _single_element(shape: Shape) -> Shape:
    if shape.kind == "unordered" and len(shape.items) == 1:
        return shape.items[0]
    return shape


def _whole_text(shape: Shape) -> str:
    """The text of a shape for a whole-expression comparison. A bare comma list goes in set braces:
    math-verify would read `1,100` as the number 1100 (its commas are list commas, see parse_number)."""
    if shape.kind == "unordered" and not shape.brackets and len(_split_top_level(shape.text)) > 1:
        return "\\{" + shape.text + "\\}"
    return shape.text


def compare_shapes(pred: Shape, ref: Shape, atoms: AtomComparer) -> Outcome:
    if pred.text and pred.text == ref.text:
        return True, "exact string"
    pred, ref = _single_element(pred), _single_element(ref)
    if pred.kind == "atom" and ref.kind == "atom":
        return atoms(pred.text, ref.text)
    if pred.kind == "atom" or ref.kind == "atom":
        atom, container = (pred, ref) if pred.kind == "atom" else (ref, pred)
        if len(container.items) > 1 and parse_number(atom.text) is not None:
            return False, f"{len(container.items)} elements vs one number"
        # e.g. `x\in\{1,2\}` vs `1,2`: only a whole-expression comparison can tell.
        return atoms(_whole_text(pred), _whole_text(ref))
    if len(pred.items) != len(ref.items):
        return False, f"{len(pred.items)} elements vs {len(ref.items)}"
    if pred.kind == "ordered" and ref.kind == "ordered":
        if pred.brackets != ref.brackets:
            return False, f"brackets {pred.brackets} vs {ref.brackets}"
        return _all_of(compare_shapes(p, r, atoms) for p, r in zip(pred.items, ref.items))
    if pred.kind == "ordered" or ref.kind == "ordered":
        unordered = ref if pred.kind == "ordered" else pred
        if unordered.brackets == "{}":
            return False, "set vs tuple"
        # A bare list against a tuple is read in its written order.
        return _all_of(compare_shapes(p, r, atoms) for p, r in zip(pred.items, ref.items))
    return _unordered_outcome(pred, ref, atoms)


# ---------------------------------------------------------------------------------------------------
# Symbolic tier (worker processes only).


@functools.lru_cache(maxsize=4096)
def _to_sympy(text: str):
    """sympy object for a canonical answer via math-verify's LaTeX parser, or None if unparsable."""
    from math_verify import LatexExtractionConfig, parse
    from sympy import Rational

    number = parse_number(text)
    if number is not None and not number.percent:
        # math-verify reads `1e-05` as `1*E - 5`; a plain number is built exactly instead.
        return Rational(number.value.numerator, number.value.denominator)
    parsed = parse(
        "\\boxed{" + text.replace("%", "\\%") + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
        fallback_mode="no_fallback",
        parsing_timeout=None,  # no signal.alarm: the worker is killed from outside instead
    )
    return parsed[0] if parsed else None


def _constant_value(expr):
    """A finite real value of a variable-free sympy expression, or None."""
    try:
        if getattr(expr, "free_symbols", None) or not getattr(expr, "is_number", False):
            return None
        value = complex(expr.evalf(30))
    except Exception:  # sympy raises many types on odd input; any of them means "no value"
        return None
    if value.imag != 0 or value.real != value.real or abs(value.real) == float("inf"):
        return None
    return Fraction(value.real)


def _symbolic_atom_outcome(pred: str, ref: str, rel_tol: float) -> Outcome:
    fast = _fast_atom_outcome(pred, ref, rel_tol)
    if fast[0] is not None:
        return fast
    from math_verify import verify

    gold, target = _to_sympy(ref), _to_sympy(pred)
    if gold is None or target is None:
        side = "both" if gold is None and target is None else ("reference" if gold is None else "answer")
        return False, f"unparsable ({side})"
    # A decimal against an exact expression (`0.7071` vs `\frac{\sqrt2}{2}`): same tolerance as numbers.
    for number_text, expr in ((pred, gold), (ref, target)):
        number = parse_number(number_text)
        if number is not None and number.inexact:
            value = _constant_value(expr)
            if value is not None:
                other = PlainNumber(value, True, False)
                return numbers_equal(number, other, rel_tol), "numeric evaluation"
    # allow_set_relation_comp: `-3<x\le2` answers `(-3,2]` whichever side is the relation.
    if verify(gold, target, timeout_seconds=None, allow_set_relation_comp=True):
        return True, "symbolic"
    return False, "not equal"


def compare_answers(pred: str, ref: str, rel_tol: float = DEFAULT_REL_TOL, symbolic: bool = False) -> Outcome:
    """Compare two canonical answers. With symbolic=False the result may be None (undecided)."""
    if not pred:
        return False, "empty answer"
    if not ref:
        return False, "empty reference"
    if pred == ref:
        return True, "exact string"
    atom_outcome = _symbolic_atom_outcome if symbolic else _fast_atom_outcome
    return compare_shapes(parse_shape(pred), parse_shape(ref), lambda p, r: atom_outcome(p, r, rel_tol))
