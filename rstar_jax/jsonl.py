"""Reading JSONL files one object per line, with the reason when a line is not one (for file:line errors)."""
from __future__ import annotations

import json
import os
from typing import Iterator


def json_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict | str]]:
    """(line number, object) for each non-blank line, or (line number, reason) for a line that is not
    a JSON object. Read as bytes, so a bad byte fails its own line, not the whole file."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, f"not UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}"
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, f"malformed JSON: {e.msg} at column {e.colno}"
                continue
            if not isinstance(record, dict):
                yield line_no, f"expected a JSON object, got {type(record).__name__}"
                continue
            yield line_no, record
