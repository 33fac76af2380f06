"""From sampled continuations to candidate steps: filtering, classification and the executed text.

Host-side and pure, so the driver's rules can be tested without a model.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from rstar_jax.verify.program import CODE_END, is_answer_step, output_block
from rstar_jax.verify.sandbox import ExecResult

# What a candidate needs next: the sandbox, the grader, or nothing (it already failed).
CODE, ANSWER_STEP, NO_STOP = "code", "answer", "no_stop"


@dataclasses.dataclass
class Candidate:
    text: str
    kind: str  # CODE | ANSWER_STEP | NO_STOP


def classify(text: str, finish_reason: str) -> str:
    """An answer step (mentions \\boxed), a code step that ended at a step tag, or a failed generation."""
    if is_answer_step(text):
        return ANSWER_STEP
    return CODE if finish_reason == "stop" and text.strip() else NO_STOP


def candidate_steps(samples: Sequence[tuple[str, str]], *, dedupe: bool, answer_first: bool) -> list[Candidate]:
    """The children to create from (text, finish_reason) samples, in sample order.

    dedupe drops a text seen before (compared stripped, as the reference does); with answer_first, once any
    candidate is an answer step, the first such is the only child (the reference's rule).
    """
    out, seen = [], set()
    for text, finish in samples:
        key = text.strip()
        if dedupe and key in seen:
            continue
        seen.add(key)
        out.append(Candidate(text, classify(text, finish)))
    answers = [c for c in out if c.kind == ANSWER_STEP]
    return answers[:1] if answer_first and answers else out


def with_output(text: str, result: ExecResult) -> str:
    """A step that closed the code block shows the program's output after it (rStar section 2)."""
    if CODE_END not in text:
        return text
    return text + output_block(result.stdout)
