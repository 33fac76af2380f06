"""Programs and their displayed output, as the rStar-Math reference builds them from code-augmented steps.

A step is the text of one generation, e.g. ``"<code>\\n# Step 1: ...\\nx = 2\\n<end_of_step>"`` or
``"# Now print the final answer\\nprint(x)\\n<end_of_code>"``. The program run for a candidate step is the code
of the current ``<code>`` block from the root to that step, re-executed from scratch (stateless replay).
Pure functions only; the sandbox that runs programs lives in ``rstar_jax.verify.sandbox``.

Output differs from the reference's interpreter on purpose in three places: the program runs as a whole with
its complete stdout (the reference splits it at top-level print statements, labels each part with the printed
expression and loses prints that are not the last statement of a part); a final bare expression is not echoed;
and rounding applies to every line that is one float, never to integers (the reference rounds the whole output
when it parses as a float, which turns a 400-digit integer into "inf").
"""
from __future__ import annotations

import math
import re
from typing import Sequence

CODE = "<code>"
STEP_END = "<end_of_step>"
CODE_END = "<end_of_code>"
OUTPUT = "<output>"
OUTPUT_END = "<end_of_output>"
ANSWER = "<answer>"
ANSWER_END = "<end_of_answer>"
STEP_TAGS = (CODE, STEP_END, CODE_END, OUTPUT, OUTPUT_END, ANSWER, ANSWER_END)

# Reference display rules: whole-number-of-a-line floats with at most 4 decimals, output over 1024 characters
# shown as its first 512 + "..." + last 512 characters.
DISPLAY_DECIMALS = 4
DISPLAY_MAX_CHARS = 1024

_FENCE_LINE = re.compile(r"^\s*```\s*(?:python|py)?\s*$", re.IGNORECASE)
# A line that is exactly one decimal float literal (what print(float) or a SymPy Float writes). Integers are
# left alone on purpose: the reference's float() round trip turns a 400-digit integer into "inf".
_FLOAT_LINE = re.compile(
    r"^[ \t]*[+-]?(?:\d+\.\d*|\.\d+|\d+(?:\.\d*)?[eE][+-]?\d+|\d*\.\d+[eE][+-]?\d+)[ \t]*$", re.MULTILINE)


def is_answer_step(step_text: str) -> bool:
    """True for a final-answer step (the reference's parser: the text mentions ``boxed``); it runs no code."""
    return "boxed" in step_text


def current_block(step_texts: Sequence[str]) -> list[str]:
    """The steps of the node's ``<code>`` block: the node's own text and its ancestors up to (excluding) the
    nearest one that closed an earlier block (``<end_of_code>`` or ``<end_of_output>``). Answer steps carry
    no code and are skipped, as in the reference's ``collect_action_inputs``."""
    if not step_texts:
        raise ValueError("current_block needs at least one step text (the node's own)")
    block = [step_texts[-1]]
    for text in reversed(step_texts[:-1]):
        if CODE_END in text or OUTPUT_END in text:
            break
        if text and not is_answer_step(text):
            block.append(text)
    block.reverse()
    return block


def extract_code(text: str) -> str:
    """The Python code inside ``<code> ... <end_of_code>`` (all such blocks, in order), tags stripped.

    Matches the reference's line-based ``extract_program`` when the tags sit on their own lines (the trained
    format); unlike it, code sharing a line with a tag is kept, and text with no ``<code>`` tag is taken as
    code up to ``<end_of_code>`` instead of being run with the tags in it.
    """
    text = text.replace(STEP_END, "")
    if CODE not in text:
        code = text.split(CODE_END, 1)[0]
    else:
        lines: list[str] = []
        inside = False
        for line in text.split("\n"):
            if CODE in line:
                inside = True
                line = line.split(CODE, 1)[1]
                if not line.strip():
                    continue
            if not inside:
                continue
            if CODE_END in line:
                inside = False
                line = line.split(CODE_END, 1)[0]
                if not line.strip():
                    continue
            lines.append(line)
        code = "\n".join(lines)
    return _strip_markdown_fences(code).strip()


def assemble_program(step_texts: Sequence[str]) -> str:
    """The program to execute for the last of ``step_texts`` (root-to-node order, root first)."""
    return extract_code("".join(current_block(step_texts)))


def _strip_markdown_fences(code: str) -> str:
    # Models sometimes wrap the code in ``` fences inside <code>; the reference strips them too.
    return "\n".join(line for line in code.split("\n") if not _FENCE_LINE.match(line))


def _round_float_line(match: re.Match) -> str:
    line = match.group(0)
    value = float(line)
    if not math.isfinite(value):
        return line
    rounded = repr(round(value, DISPLAY_DECIMALS))
    # Reference rule: keep the printed text only when it is strictly shorter than the rounded one.
    return line if len(line.strip()) < len(rounded) else rounded


def round_float_lines(text: str) -> str:
    """Every line that is a single float literal shown with at most 4 decimals (``0.333333`` -> ``0.3333``)."""
    return _FLOAT_LINE.sub(_round_float_line, text)


def truncate_middle(text: str, max_chars: int = DISPLAY_MAX_CHARS) -> str:
    """``text`` itself, or its first and last ``max_chars // 2`` characters joined by ``...``."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + "..." + text[-half:]


def format_output(stdout: str) -> str:
    """What the reference shows in ``<output>...<end_of_output>`` for a program's full standard output."""
    return truncate_middle(round_float_lines(stdout)).strip()


def output_block(shown: str) -> str:
    """What follows a code-closing step: ``<output>shown<end_of_output>`` on lines of its own.

    A step tag the program printed is defused (``<`` written as ``&lt;``): it would otherwise become the
    tag's token in the model's context and close the block, or open an answer, on the program's say-so.
    """
    for tag in STEP_TAGS:
        shown = shown.replace(tag, "&lt;" + tag[1:])
    return f"\n{OUTPUT}{shown}{OUTPUT_END}\n"


def format_captured(head: str, tail: str, total_chars: int) -> str:
    """``format_output`` for output captured as its first and last characters (``total_chars`` in all).

    The sandbox keeps a bounded head and tail of long output; when the middle was dropped, both parts are
    longer than the half shown, so the display equals that of the full text up to rounding at the cut.
    """
    if len(head) + len(tail) >= total_chars:
        return format_output(head + tail)
    half = DISPLAY_MAX_CHARS // 2
    return (round_float_lines(head)[:half] + "..." + round_float_lines(tail)[-half:]).strip()
