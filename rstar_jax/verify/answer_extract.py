"""Final answers out of model text and benchmark references, and their canonical string form.

Everything here is plain string work in linear time (no sympy, no backtracking-prone regexes), so it is
safe to run in the caller's process on untrusted model output.
"""
from __future__ import annotations

import math
import re

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
# Raw model output (rStar tags or several lines) is never mistaken for a bare answer.
_MODEL_OUTPUT_MARKERS = ("<end_of_", "<answer>", "<code>", "<output>", "\n")
_GSM8K_MARKER = "####"
_BARE_ANSWER_MAX_CHARS = 300
_MAX_UNWRAP_LEVELS = 3
_WHOLE_ANSWER_WRAPPERS = ("text", "textbf", "mbox", "textrm")


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the `}` closing the `{` at open_index; `\\{` and `\\}` are literal braces, not groups."""
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character never opens or closes a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (brace-matched), or None.

    `\\boxed 5` (no braces) gives the next token. A last box left open (a cut-off generation) gives
    None rather than an earlier, superseded answer.
    """
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    while start < len(text) and text[start] == " ":
        start += 1
    if start < len(text) and text[start] == "{":
        close = _matching_brace(text, start)
        return None if close is None else text[start + 1 : close]
    token = re.match(r"[^\s$]+", text[start:])
    return token.group(0).rstrip(".,;") if token else None


def _strip_math_delimiters(answer: str) -> str:
    answer = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            return answer[len(left) : len(answer) - len(right)].strip()
    return answer


def _unwrap_whole(answer: str) -> str:
    """`\\text{X}` -> `X` when the wrapper spans the whole answer (a few nested levels at most, so
    adversarial nesting stays linear)."""
    for _ in range(_MAX_UNWRAP_LEVELS):
        for command in _WHOLE_ANSWER_WRAPPERS:
            prefix = "\\" + command + "{"
            if answer.startswith(prefix) and _matching_brace(answer, len(prefix) - 1) == len(answer) - 1:
                answer = answer[len(prefix) : -1].strip()
                break
        else:
            break
    return answer


def _bare(answer: str) -> str:
    return _unwrap_whole(_strip_math_delimiters(answer)).strip()


def extract_answer(text: str | None) -> str | None:
    """The final answer in a model's text (or a bare answer), or None when there is none.

    Order: the last `\\boxed{}` / `\\fbox{}`; a GSM8K rationale's `#### N`; otherwise the text itself
    when it is a short one-line bare answer (`$...$` removed). A `\\text{}` around the whole answer is
    removed. Raw model output without a box gives None.
    """
    if text is None:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        answer = boxed
    elif _BOX_COMMAND.search(text):
        return None  # a box that never closes: the generation was cut off
    elif _GSM8K_MARKER in text:
        answer = text.rsplit(_GSM8K_MARKER, 1)[1]
    else:
        stripped = text.strip()
        if any(marker in stripped for marker in _MODEL_OUTPUT_MARKERS):
            return None
        if len(stripped) > _BARE_ANSWER_MAX_CHARS:
            return None
        answer = stripped
    return _bare(answer)


def reference_answers(ref: object) -> list[str]:
    """A benchmark's reference answer as a list of acceptable answer strings.

    Accepts a string (a bare answer, `$...$`-wrapped, a full solution with `\\boxed{}`, or a GSM8K
    rationale ending in `#### N`), an int or float (College Math style numeric answers), or a list of
    those (several acceptable answers; any one matching is correct). OlympiadBench-style multi-part
    answers that must all be given should be joined by the caller with ", " (comma and space: `2,500` is
    one number, `2, 500` two answers).
    """
    if isinstance(ref, bool) or ref is None:
        raise TypeError(f"reference answer must be a string, number or list, got {ref!r}")
    if isinstance(ref, (list, tuple)):
        if not ref:
            raise ValueError("reference answer list is empty")
        return [answer for item in ref for answer in reference_answers(item)]
    if isinstance(ref, int):
        return [str(ref)]
    if isinstance(ref, float):
        if not math.isfinite(ref):
            raise ValueError(f"reference answer is not a finite number: {ref!r}")
        return [repr(ref)]
    if not isinstance(ref, str):
        raise TypeError(f"reference answer must be a string, number or list, got {type(ref).__name__}")
    boxed = last_boxed(ref)
    if boxed is not None:
        answer = boxed
    elif _GSM8K_MARKER in ref:
        answer = ref.rsplit(_GSM8K_MARKER, 1)[1]
    else:
        answer = ref
    return [_bare(answer)]


# ---------------------------------------------------------------------------------------------------
# Canonical form: rewrites under which two answers grade the same (notation, spacing, units, degrees),
# so equal canonical strings are equal answers. Applied to both sides before any comparison.

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u03c0": "\\pi ",
    "\u221e": "\\infty ", "\u221a": "\\sqrt ", "\u00b0": "", "\u2264": "\\le ", "\u2265": "\\ge ",
    "\u00b1": "\\pm ", "\u2205": "\\emptyset ", "\u222a": "\\cup ", "\u2229": "\\cap ",
}
_SIMPLE_REWRITES = [
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("\\dbinom", "\\binom"),
    ("\\tbinom", "\\binom"), ("\\displaystyle", ""), ("\\lbrace", "\\{"), ("\\rbrace", "\\}"),
    ("\\langle", "("), ("\\rangle", ")"), ("\\leq", "\\le"), ("\\geq", "\\ge"), ("\\neq", "\\ne"),
    ("\\varnothing", "\\emptyset"), ("\\$", ""), ("$", ""), ("\\%", "%"),
    # LaTeX thousands separators: `2{,}500` and `2,\!500` (`\!` cancels the space TeX puts after a comma).
    ("{,}", ","), (",\\!", ","),
]
# Sizing commands: \left( -> (, \left. -> nothing.
_SIZING = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![a-zA-Z])\.?")
# `\\` (a matrix row break) is matched first so that `\\ 3` is not read as `\` + `\ `.
_SPACING = re.compile(r"\\\\|\\[,:;!> ]|\\q?quad(?![a-zA-Z])|~")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|mathit)\s*\{")
# `x and y`, `x \text{ or } y` list several answers; they become `, ` (a list comma, see _THOUSANDS).
# `(?<!\s)` starts a match only at the beginning of a whitespace run, keeping long runs linear.
_LIST_WORDS = re.compile(r"(?<!\s)\s*\\text\s*\{\s*(?:and|or)\s*\}\s*|(?<!\s)\s+(?:and|or)\s+")
# Commas in numbers. A comma directly followed by exactly three digits inside a number at bracket depth
# 0 is a thousands separator (`2,500`, `1,234,567`, `-1,000.5`, `x=1,000`); it is removed here, so every
# comma left in a canonical answer separates items. A comma followed by whitespace separates list items
# (`2, 500` is the list 2 and 500, as OlympiadBench joins its answer lists), and so does one followed by
# a LaTeX space (`2,\ 500`, `2,\,500`, `2,~500`: the spacing was already turned into whitespace; only
# `2,\!500` and `2{,}500` are thousands forms). Inside brackets a comma always separates elements
# (`[0,100]`, `(2,500)`), and a number that runs on into another `,digit` (`1,2,500`) is a list.
_THOUSANDS = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?!\d|,\d)")
# A unit after a number: `5\text{ cm}`, `5\mbox{ cm}^2`, `5\mathrm{cm}`, `5 square feet`, `5 dollars`.
# Only removed when no word of it is mathematics (`2\mathrm{e}`, `3 pi`, `5 cos x` keep their tails).
_TRAILING_TEXT_UNIT = re.compile(
    r"(?<=[\d}.])\s*\\(?:text|mbox|mathrm|textrm)\s*\{\s*(?P<unit>[a-zA-Z][a-zA-Z .]*)\}(?:\^\{?[23]\}?)?\s*$"
)
_TRAILING_WORD_UNIT = re.compile(r"(?<=\d)\s+(?P<unit>[a-zA-Z]{2,}(?:\s+[a-zA-Z]+)*)\.?\s*$")
# Words that are mathematics, never a unit: constants, functions, operators and number words.
_TRIG = ("sin", "cos", "tan", "sec", "csc", "cot")
_MATH_WORDS = frozenset(
    [*_TRIG, *(f"{f}h" for f in _TRIG), *(f"arc{f}" for f in _TRIG), *(f"arc{f}h" for f in _TRIG),
     *(f"ar{f}h" for f in _TRIG), *(f"a{f}" for f in _TRIG), "cosec", "cosech", "ctg", "tg",
     "pi", "e", "i", "log", "ln", "lg", "exp", "sqrt", "root", "cbrt", "inf", "infty", "infinity",
     "max", "gcd", "lcm", "mod", "pmod", "choose", "binom", "times", "cdot", "div", "plus", "minus",
     "over", "squared", "cubed", "factorial", "sgn", "abs", "floor", "ceil", "det", "arg", "lim"]
)
# In `\text{}` a function would have been written as a command (`\sec`): `5\text{ sec}` is seconds.
_TEXT_MATH_WORDS = _MATH_WORDS - {"sec"}
# A bare word of one or two letters after a number is a unit only when it is a known abbreviation
# (`5 xy` is a product, `5 cm` a length); longer words are units unless they are mathematics, since
# count nouns (`7 apples`, `3 people`) are too many to list.
_SHORT_UNITS = frozenset(
    ["cm", "mm", "km", "nm", "kg", "mg", "ml", "cl", "dl", "ft", "in", "yd", "mi", "lb", "oz", "hr",
     "sq", "cu", "cc"]
)
_UNIT_TAIL_CHARS = 120  # units are short; matching only the tail keeps the regexes linear
_WHITESPACE = re.compile(r"\s+")
_ENDS_WITH_COMMAND = re.compile(r"\\[a-zA-Z]+$")


def _unwrap_text_commands(answer: str) -> str:
    """`\\text{a b}` -> `a b` everywhere (brace-matched), keeping the content."""
    out = []
    i = 0
    while True:
        match = _TEXT_COMMAND.search(answer, i)
        if match is None:
            out.append(answer[i:])
            return "".join(out)
        close = _matching_brace(answer, match.end() - 1)
        if close is None:
            out.append(answer[i:])
            return "".join(out)
        out.append(answer[i : match.start()])
        out.append(answer[match.end() : close])
        i = close + 1


def _is_unit(words: str, bare: bool) -> bool:
    """True when `words` (the tail after a number) is a unit, not more of the answer's mathematics.

    In `\\text{}` / `\\mathrm{}` any non-mathematical word counts (`\\text{ m}`, `\\mathrm{kg}`); bare
    words need three letters or a known abbreviation (see _SHORT_UNITS)."""
    words = words.replace(".", " ").lower().split()
    math_words = _MATH_WORDS if bare else _TEXT_MATH_WORDS
    if not words or any(word in math_words for word in words):
        return False
    return not bare or all(len(word) >= 3 or word in _SHORT_UNITS for word in words)


def _strip_trailing_unit(answer: str) -> str:
    head, tail = answer[:-_UNIT_TAIL_CHARS], answer[-_UNIT_TAIL_CHARS:]
    # The lookbehinds need the character before the tail too.
    probe = (head[-1:] + tail) if head else tail
    for pattern, bare in ((_TRAILING_TEXT_UNIT, False), (_TRAILING_WORD_UNIT, True)):
        match = pattern.search(probe)
        if match and match.start() > 0 and probe[: match.start()].strip() and _is_unit(match["unit"], bare):
            probe = probe[: match.start()]
    return (head[:-1] + probe) if head else probe


def _remove_thousands_separators(answer: str) -> str:
    """`2,500` -> `2500` for numbers at bracket depth 0 (see _THOUSANDS); linear time."""
    if "," not in answer:
        return answer
    depth, depths = 0, []
    for char in answer:
        depths.append(depth)
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
    return _THOUSANDS.sub(lambda m: m.group(0).replace(",", "") if depths[m.start()] == 0 else m.group(0), answer)


def _drop_whitespace(answer: str) -> str:
    """Remove whitespace, except one space between a command and a letter (`\\pi r` != `\\pir`)."""

    def replace(match: re.Match) -> str:
        before = answer[max(0, match.start() - 40) : match.start()]
        after = answer[match.end() : match.end() + 1]
        return " " if after.isalpha() and _ENDS_WITH_COMMAND.search(before) else ""

    return _WHITESPACE.sub(replace, answer)


def canonical_answer(answer: str) -> str:
    """The canonical string of an extracted answer: spacing, sizing, `\\dfrac`, degrees, dollars,
    units after numbers, thousands separators and `\\text{}` wrappers removed; `and`/`or` lists turned
    into commas. Every comma left separates items (`2,500` -> `2500`, `2, 500` -> `2,500`, a list).

    Degrees are dropped, not converted (`30^\\circ` is `30`, not `\\pi/6`).
    """
    for char, replacement in _UNICODE.items():
        answer = answer.replace(char, replacement)
    for old, new in _SIMPLE_REWRITES:
        answer = answer.replace(old, new)
    answer = _SIZING.sub("", answer)
    answer = _SPACING.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else " ", answer)
    answer = _DEGREES.sub("", answer)
    answer = _LIST_WORDS.sub(", ", answer.strip())
    answer = _strip_trailing_unit(answer.strip())
    answer = _unwrap_text_commands(answer)
    answer = _remove_thousands_separators(answer)  # before whitespace goes: `2, 500` is a list
    answer = _drop_whitespace(answer.strip())
    return answer.rstrip(".")
