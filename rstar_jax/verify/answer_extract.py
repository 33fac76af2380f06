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
    answers that must all be given should be joined by the caller into one comma-separated string.
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
    ("\\varnothing", "\\emptyset"), ("\\$", ""), ("$", ""), ("{,}", ","), ("\\%", "%"),
]
# Sizing commands: \left( -> (, \left. -> nothing.
_SIZING = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![a-zA-Z])\.?")
# `\\` (a matrix row break) is matched first so that `\\ 3` is not read as `\` + `\ `.
_SPACING = re.compile(r"\\\\|\\[,:;!> ]|\\q?quad(?![a-zA-Z])|~")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|mathit)\s*\{")
# `x and y`, `x \text{ or } y` list several answers.
# `(?<!\s)` starts a match only at the beginning of a whitespace run, keeping long runs linear.
_LIST_WORDS = re.compile(r"(?<!\s)\s*\\text\s*\{\s*(?:and|or)\s*\}\s*|(?<!\s)\s+(?:and|or)\s+")
# A unit after a number: `5\text{ cm}`, `5\mbox{ cm}^2`, `5\mathrm{cm}`, `5 square feet`, `5 dollars`.
_TRAILING_TEXT_UNIT = re.compile(
    r"(?<=[\d}.])\s*\\(?:text|mbox|mathrm|textrm)\s*\{\s*[a-zA-Z][a-zA-Z .]*\}(?:\^\{?[23]\}?)?\s*$"
)
_TRAILING_WORD_UNIT = re.compile(r"(?<=\d)\s+[a-zA-Z]{2,}(?:\s+[a-zA-Z]+)*\.?\s*$")
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


def _strip_trailing_unit(answer: str) -> str:
    head, tail = answer[:-_UNIT_TAIL_CHARS], answer[-_UNIT_TAIL_CHARS:]
    # The lookbehinds need the character before the tail too.
    probe = (head[-1:] + tail) if head else tail
    for pattern in (_TRAILING_TEXT_UNIT, _TRAILING_WORD_UNIT):
        stripped = pattern.sub("", probe)
        if stripped != probe and stripped.strip():
            probe = stripped
    return (head[:-1] + probe) if head else probe


def _drop_whitespace(answer: str) -> str:
    """Remove whitespace, except one space between a command and a letter (`\\pi r` != `\\pir`)."""

    def replace(match: re.Match) -> str:
        before = answer[max(0, match.start() - 40) : match.start()]
        after = answer[match.end() : match.end() + 1]
        return " " if after.isalpha() and _ENDS_WITH_COMMAND.search(before) else ""

    return _WHITESPACE.sub(replace, answer)


def canonical_answer(answer: str) -> str:
    """The canonical string of an extracted answer: spacing, sizing, `\\dfrac`, degrees, dollars,
    units after numbers and `\\text{}` wrappers removed; `and`/`or` lists turned into commas.

    Degrees are dropped, not converted (`30^\\circ` is `30`, not `\\pi/6`).
    """
    for char, replacement in _UNICODE.items():
        answer = answer.replace(char, replacement)
    for old, new in _SIMPLE_REWRITES:
        answer = answer.replace(old, new)
    answer = _SIZING.sub("", answer)
    answer = _SPACING.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else " ", answer)
    answer = _DEGREES.sub("", answer)
    answer = _LIST_WORDS.sub(",", answer.strip())
    answer = _strip_trailing_unit(answer.strip())
    answer = _unwrap_text_commands(answer)
    answer = _drop_whitespace(answer.strip())
    return answer.rstrip(".")
