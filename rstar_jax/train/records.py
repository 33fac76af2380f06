"""Training records from JSONL files, checked field by field; every error names file:line and field.

  sft   {"id", "prompt", "response"}                                  policy SFT
  pair  {"id", "prompt", "pos", "neg", "pos_count", "neg_count", "margin"}   PPM (Bradley-Terry)
  pqm   {"id", "prompt", "response", "q"}                             PQM (MSE on the Q value)
  orm   {"id", "prompt", "response", "correct"}                       ORM (BCE on correctness)
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

from rstar_jax.errors import InputError
from rstar_jax.jsonl import json_objects
from rstar_jax.tokenizer import PROMPT_TEMPLATE

_PROMPT_END = PROMPT_TEMPLATE.split("{question}")[1]  # "\n<|assistant|>: Let's think step by step ..."

KINDS = ("sft", "pair", "pqm", "orm")


class RecordError(InputError):
    """A bad training record or file: where it is and what is wrong."""


@dataclasses.dataclass(frozen=True)
class Record:
    fields: dict
    where: str  # "path:line", for errors found later (tokenization, over-length)


def _text(rec: dict, name: str, where: str) -> str:
    value = rec.get(name)
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {name!r}: expected a string, got "
                          f"{'nothing (missing)' if name not in rec else type(value).__name__}")
    return value


def _got(rec: dict, name: str) -> str:
    """What a field holds, for an error: a missing field is not a null one."""
    return "nothing (missing)" if name not in rec else repr(rec[name])


def _number(rec: dict, name: str, where: str) -> float:
    value = rec.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"{where}: field {name!r}: expected a finite number, got {_got(rec, name)}")
    return float(value)


def _count(rec: dict, name: str, where: str) -> int:
    value = rec.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecordError(f"{where}: field {name!r}: expected an integer >= 1, got {_got(rec, name)}")
    return value


def check_record(kind: str, rec: dict, where: str) -> dict:
    """The record's training fields, validated. Extra fields are ignored."""
    out = {"id": _text(rec, "id", where), "prompt": _text(rec, "prompt", where)}
    if kind == "sft":
        out["response"] = _text(rec, "response", where)
    elif kind == "pair":
        out.update(pos=_text(rec, "pos", where), neg=_text(rec, "neg", where),
                   pos_count=_count(rec, "pos_count", where), neg_count=_count(rec, "neg_count", where),
                   margin=_number(rec, "margin", where))
    elif kind == "pqm":
        out.update(response=_text(rec, "response", where), q=_number(rec, "q", where))
        if not -1.0 <= out["q"] <= 1.0:
            raise RecordError(f"{where}: field 'q': Q value {out['q']} is outside [-1, 1]")
    elif kind == "orm":
        out["response"] = _text(rec, "response", where)
        if not isinstance(rec.get("correct"), bool):
            raise RecordError(f"{where}: field 'correct': expected true or false, got {_got(rec, 'correct')}")
        out["correct"] = rec["correct"]
    else:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    return out


def read_records(kind: str, paths: str | Sequence[str]) -> list[Record]:
    """All records of `paths` (JSONL; blank lines skipped), in file order. Raises on the first bad line."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    seen = {}
    for path in paths:  # one file twice would train on its records twice
        real = os.path.realpath(path)
        if real in seen:
            raise RecordError(f"{path}: listed twice" + (f" (also as {seen[real]})" if seen[real] != path else "")
                              + "; its records would be read twice")
        seen[real] = path
    records = []
    for path in paths:
        if os.path.isdir(path):
            raise RecordError(f"{path}: a directory, not a {kind} records file")
        if not os.path.isfile(path):
            raise RecordError(f"{path}: no such {kind} records file")
        for line_no, rec in json_objects(path):
            where = f"{path}:{line_no}"
            if isinstance(rec, str):
                raise RecordError(f"{where}: {rec}")
            records.append(Record(check_record(kind, rec, where), where))
    if not records:
        raise RecordError(f"empty dataset: no {kind} records in {', '.join(paths) or '(no files given)'}")
    return records


def _question(prompt: str) -> str:
    """The problem a prompt poses: the rStar prompt up to the end of its template (a step pair's prompt goes on
    with the path's steps); any other prompt whole."""
    end = prompt.find(_PROMPT_END)
    return prompt if end < 0 else prompt[:end + len(_PROMPT_END)]


def holdout_split(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, held out): about a seeded `fraction` of the records (at least one when fraction > 0) held out.

    A problem's records are held out together: its preference pairs at every step and its final-answer pairs
    (whole trajectories, which contain every step) share texts, so holding out some of them would test on
    texts trained on.
    """
    import numpy as np
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction {fraction} must be in [0, 1)")
    n_out = 0 if fraction == 0 else max(1, int(round(len(records) * fraction)))
    by_question: dict[str, list[int]] = {}  # question -> record indices, in order of first appearance
    for i, r in enumerate(records):
        by_question.setdefault(_question(r.fields.get("prompt", "")), []).append(i)
    groups = list(by_question.values())
    held: set[int] = set()
    for g in np.random.default_rng(seed).permutation(len(groups)):
        if len(held) >= n_out:
            break
        held.update(groups[g])
    if len(held) >= len(records) and n_out > 0:
        raise RecordError(f"holdout fraction {fraction} of {len(records)} records ({len(groups)} problems) leaves "
                          "nothing to train on")
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])
