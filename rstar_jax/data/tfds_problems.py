"""What all problem-set TFDS builders share: the stored record, array_record output, and reading back.

A stored record has the three problem fields as text plus `extra`, the remaining fields as one JSON
object: the fields differ per source (lists, floats, nulls), and JSON keeps them exactly without a
per-benchmark feature schema. Reading needs no TensorFlow: array_record + `tfds.data_source`.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

# TFDS 4.9.10 imports this to locate a builder's code (checksums.tsv beside it) but declares it
# only for Python < 3.9; importing it here makes a missing install fail early and by name.
import importlib_resources  # noqa: F401
import tensorflow_datasets as tfds

ARRAY_RECORD = "array_record"
EXTRA_FIELD = "extra"
_CORE_FIELDS = ("id", "question", "answer")


def problem_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "question": tfds.features.Text(),
        "answer": tfds.features.Text(),
        EXTRA_FIELD: tfds.features.Text(doc="the problem's other fields as a JSON object"),
    })


def problem_to_example(problem: dict) -> dict:
    extra = {k: v for k, v in problem.items() if k not in _CORE_FIELDS}
    example = {k: problem[k] for k in _CORE_FIELDS}
    example[EXTRA_FIELD] = json.dumps(extra, ensure_ascii=False, sort_keys=True)
    return example


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_to_problem(example: dict) -> dict:
    """A record read back from TFDS (text comes back as bytes) as a problem dict."""
    problem = {k: _text(example[k]) for k in _CORE_FIELDS}
    problem.update(json.loads(_text(example[EXTRA_FIELD])))
    return problem


class ProblemSource(Sequence):
    """Random-access problems over a TFDS data source, decoded on access (pools are large).

    `metadata`: what the build recorded about its sources (empty where nothing was recorded).
    """

    def __init__(self, data_source: Sequence, metadata: dict | None = None):
        self._source = data_source
        self.metadata = metadata or {}

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        size = len(self)
        if not -size <= index < size:  # the array_record source raises ValueError, not IndexError
            raise IndexError(f"problem index {index} out of range for {size} problems")
        return example_to_problem(self._source[index % size])


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """TFDS's DatasetInfo for builders whose metadata lives only on local disk."""

    def initialize_from_bucket(self) -> None:
        # TFDS makes a temporary directory before it finds GCS disabled and never removes it: one
        # empty /tmp/tmp*tfds folder leaked per builder made before its data exists.
        pass


class ProblemSetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the problem-set builders: array_record by default, records kept in source order."""

    def __init__(self, *, file_format: str | None = ARRAY_RECORD, **kwargs):
        # TFDS defaults to TFRecord, which needs TensorFlow to write; array_record does not.
        super().__init__(file_format=file_format, **kwargs)

    def _problem_info(self, *, description: str, homepage: str, citation: str,
                      metadata: tfds.core.Metadata | None = None) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(
            builder=self,
            description=description,
            features=problem_features(),
            homepage=homepage,
            citation=citation,
            metadata=metadata,
            # Source order, so that "the 17th problem" means the same thing everywhere.
            disable_shuffling=True,
        )
