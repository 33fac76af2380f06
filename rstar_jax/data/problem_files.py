"""Problems from JSONL / JSON files, with every bad record reported by file, line and field.

A bad record (malformed JSON, a non-UTF-8 byte, a missing or unusable field, a duplicate id) raises
`ProblemFormatError`. With `skip_bad=True` it is skipped instead, counted in `LoadStats` and logged;
it is never dropped silently. JSON files (one array of objects) are parsed element by element so
that errors still carry a line; a JSON syntax error there cannot be skipped (there is no next line
to resume at).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterator

from absl import logging

from rstar_jax.errors import InputError
from rstar_jax.jsonl import json_objects
from rstar_jax.data.problem import FieldError, problem_from_record

# mapper(source_record, index, name) -> problem; raises FieldError for a bad record.
Mapper = Callable[[dict, int, str], dict]

_MAX_KEPT_SKIPS = 100  # enough to diagnose a bad file without holding a whole bad pool in memory


class ProblemFormatError(InputError):
    """A bad record in a problem file: where it is and what is wrong with it."""

    def __init__(self, path: str, line: int, field: str | None, reason: str):
        where = f"{path}:{line}"
        super().__init__(f"{where}: field {field!r}: {reason}" if field else f"{where}: {reason}")
        self.path, self.line, self.field, self.reason = path, line, field, reason


@dataclasses.dataclass
class LoadStats:
    """What a read did: records seen, problems kept, records skipped (first 100 kept as errors)."""

    records: int = 0
    kept: int = 0
    skipped: int = 0
    skipped_errors: list[ProblemFormatError] = dataclasses.field(default_factory=list)

    def add_skip(self, error: ProblemFormatError) -> None:
        self.skipped += 1
        if len(self.skipped_errors) < _MAX_KEPT_SKIPS:
            self.skipped_errors.append(error)


def default_name(path: str | os.PathLike) -> str:
    """The set name used in automatic ids: the file name without extension."""
    base = os.path.basename(os.fspath(path))
    for suffix in (".jsonl", ".json"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _jsonl_records(path: str) -> Iterator[tuple[int, dict | ProblemFormatError]]:
    """(line, record or error) for each non-blank line; errors are yielded so callers may skip."""
    for line_no, item in json_objects(path):
        yield line_no, item if isinstance(item, dict) else ProblemFormatError(path, line_no, None, item)


def _json_array_records(path: str) -> Iterator[tuple[int, dict | ProblemFormatError]]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ProblemFormatError(path, line, None, f"not UTF-8: byte 0x{data[e.start]:02x}") from None

    def fail(pos: int, reason: str) -> ProblemFormatError:
        return ProblemFormatError(path, text.count("\n", 0, pos) + 1, None, reason)

    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise fail(pos, "malformed JSON: a .json problem file must hold one array of objects")
    pos = _skip_space(text, pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, f"malformed JSON: {e.msg}") from None
        line = text.count("\n", 0, pos) + 1
        if isinstance(record, dict):
            yield line, record
        else:
            yield line, ProblemFormatError(path, line, None, f"expected a JSON object, got {type(record).__name__}")
        pos = _skip_space(text, end)
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            raise fail(pos, "malformed JSON: expected ',' or ']' after an array element")
        pos = _skip_space(text, pos + 1)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def iter_problems(
    path: str | os.PathLike,
    *,
    mapper: Mapper = problem_from_record,
    name: str | None = None,
    skip_bad: bool = False,
    stats: LoadStats | None = None,
    seen_ids: dict[str, str] | None = None,
) -> Iterator[dict]:
    """Stream problems from a `.jsonl` file (or a `.json` array), one record at a time.

    `mapper` turns a source record into a problem (default: the record is already one; the
    benchmark schemas in `source_schemas` also fit). `name` prefixes automatic ids (default: the
    file's stem). Pass a `LoadStats` to get counts back, and one `seen_ids` dict (id -> "path:line")
    to several calls to reject ids duplicated across files.
    """
    path = os.fspath(path)
    name = name or default_name(path)
    stats = stats if stats is not None else LoadStats()
    records = _json_array_records(path) if path.endswith(".json") else _jsonl_records(path)
    seen_ids = seen_ids if seen_ids is not None else {}
    for index, (line, item) in enumerate(records):
        stats.records += 1
        problem, error = None, item if isinstance(item, ProblemFormatError) else None
        if error is None:
            try:
                problem = mapper(item, index, name)
            except FieldError as e:
                error = ProblemFormatError(path, line, e.field, e.reason)
        if problem is not None and problem["id"] in seen_ids:
            error = ProblemFormatError(
                path, line, "id", f"duplicate id {problem['id']!r} (first at {seen_ids[problem['id']]})")
        if error is not None:
            if not skip_bad:
                raise error
            stats.add_skip(error)
            continue
        seen_ids[problem["id"]] = f"{path}:{line}"
        stats.kept += 1
        yield problem
    if stats.skipped:
        logging.warning("%s: skipped %d bad record(s) of %d; first: %s",
                        path, stats.skipped, stats.records, stats.skipped_errors[0])


def load_problems(
    path: str | os.PathLike,
    *,
    mapper: Mapper = problem_from_record,
    name: str | None = None,
    skip_bad: bool = False,
    stats: LoadStats | None = None,
) -> list[dict]:
    """All problems of a `.jsonl` / `.json` file as a list (see `iter_problems`)."""
    return list(iter_problems(path, mapper=mapper, name=name, skip_bad=skip_bad, stats=stats))
