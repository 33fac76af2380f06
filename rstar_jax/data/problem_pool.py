"""A training problem pool (NuminaMath-style JSONL) as a TFDS builder, and `open_problem_pool`.

The pool is one "train" split built from every file matching `ProblemPoolConfig.files` (a file, a
folder, or a glob; relative to the TFDS `manual_dir` unless absolute). Presets: "jsonl" (files in the
problem format, strict) and "numinamath" (question under "problem", answer under "answer" or else the
last `\\boxed{}` of "solution", the chat copy "messages" dropped, bad records skipped and counted).
Automatic ids are `"{pool}/{file stem}/{index}"`. Ids must be unique across all files of a pool.

What a build read is kept in the dataset's metadata: the source files (path, bytes) and the skipped
record count with the first errors. Opening an existing pool checks that its files are still the
ones it was built from, so a stale build is never read by mistake.
"""
from __future__ import annotations

import dataclasses
import glob
import os

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from rstar_jax.data.problem import FieldError, auto_id, canonical_answer, first_present, problem_id, require_text
from rstar_jax.data.problem_files import LoadStats, Mapper, default_name, iter_problems
from rstar_jax.data.tfds_problems import ProblemSetBuilder, ProblemSource, problem_to_example
from rstar_jax.errors import InputError

_KEPT_SKIP_MESSAGES = 20


@dataclasses.dataclass(eq=False)
class ProblemPoolConfig(tfds.core.BuilderConfig):
    """Where a pool's files are and how their records map to problems."""

    files: str = "*.jsonl"  # a file, folder or glob; relative paths are under manual_dir
    question_fields: tuple[str, ...] = ("question",)  # the first one present is the question
    answer_field: str = "answer"
    solution_field: str | None = None  # if set: a record without answer takes its last \boxed{}
    id_field: str | None = "id"  # None: every problem gets an automatic id
    drop_fields: tuple[str, ...] = ()  # large fields not worth storing
    skip_bad: bool = False  # skip (and count) bad records instead of failing the build


POOL_PRESETS = {
    "jsonl": ProblemPoolConfig(
        name="jsonl", description="Files already in the problem format; any bad record fails."),
    "numinamath": ProblemPoolConfig(
        name="numinamath",
        description="NuminaMath-CoT / 1.5 JSONL: source, problem, solution (+ answer in 1.5).",
        question_fields=("problem",), solution_field="solution", id_field=None,
        drop_fields=("messages",), skip_bad=True),
}


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched; None if none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None  # unbalanced braces: no usable answer


def pool_mapper(config: ProblemPoolConfig) -> Mapper:
    """The record -> problem mapping a pool config describes."""

    def to_problem(record: dict, index: int, name: str) -> dict:
        question_field = first_present(record, config.question_fields)
        answer = record.get(config.answer_field)
        if answer is None and config.solution_field is not None:
            solution = record.get(config.solution_field)
            answer = last_boxed(solution) if isinstance(solution, str) else None
            if answer is None:
                raise FieldError(config.answer_field, f"missing, and no \\boxed{{}} in {config.solution_field!r}")
        elif answer is None:
            raise FieldError(config.answer_field, "missing")
        consumed = {question_field, config.answer_field, *config.drop_fields}
        problem = {k: v for k, v in record.items() if k not in consumed}
        problem["id"] = (problem_id(record, config.id_field, name, index) if config.id_field
                         else auto_id(name, index))
        problem["question"] = require_text(record, question_field)
        problem["answer"] = canonical_answer(answer)
        if isinstance(answer, list):
            problem["answers"] = [canonical_answer(item) for item in answer]
        return problem

    return to_problem


def resolve_pool_files(files: str, manual_dir: epath.PathLike | None) -> list[str]:
    """The sorted source files a `files` spec names: a file, every *.jsonl / *.json of a folder, or
    a glob. Relative specs are under `manual_dir`."""
    if not os.path.isabs(files):
        if manual_dir is None:
            raise ValueError(f"pool files {files!r} are relative but there is no manual_dir")
        files = os.path.join(os.fspath(manual_dir), files)
    if os.path.isfile(files):
        return [files]
    if os.path.isdir(files):
        found = [os.path.join(files, f) for f in os.listdir(files) if f.endswith((".jsonl", ".json"))]
    else:
        found = [f for f in glob.glob(files) if os.path.isfile(f)]
    if not found:
        raise FileNotFoundError(f"no problem pool files at {files}")
    return sorted(found)


def _file_manifest(paths: list[str]) -> list[dict]:
    return [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in paths]


def pool_manifest(files: str | os.PathLike) -> list[dict]:
    """The source files an (absolute or working-directory-relative) `files` spec names, with their sizes."""
    return _file_manifest(resolve_pool_files(os.path.abspath(os.fspath(files)), None))


class RstarProblemPool(ProblemSetBuilder):
    """A training problem pool from local JSONL / JSON files (no public download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = list(POOL_PRESETS.values())
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the pool's JSONL files in manual_dir (the config's `files` glob is relative to it), "
        "or give the config an absolute `files` path.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self._problem_info(
            description="Training problems for search (rStar-Math's pool: NuminaMath, MetaMath, "
                        "synthetic); only final answers are needed.",
            homepage="https://huggingface.co/datasets/AI-MO/NuminaMath-CoT",
            citation="", metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config: ProblemPoolConfig = self.builder_config
        manual_dir = None if os.path.isabs(config.files) else dl_manager.manual_dir
        return {"train": self._generate_examples(resolve_pool_files(config.files, manual_dir))}

    def _generate_examples(self, paths: list[str]):
        config: ProblemPoolConfig = self.builder_config
        mapper, stats, seen_ids, index = pool_mapper(config), LoadStats(), {}, 0
        for path in paths:
            for problem in iter_problems(path, mapper=mapper, name=f"{config.name}/{default_name(path)}",
                                         skip_bad=config.skip_bad, stats=stats, seen_ids=seen_ids):
                yield index, problem_to_example(problem)
                index += 1
        if not index:  # else TFDS fails the build with "No examples were yielded", naming no file
            where = paths[0] if len(paths) == 1 else f"{config.files} ({len(paths)} files)"
            errors = "; ".join(str(e) for e in stats.skipped_errors[:3])
            raise InputError(f"{where}: 0 of {stats.records} records kept" + (f"; first errors: {errors}" if errors
                                                                               else ""))
        # Saved with the dataset: the build's account of what it read and what it left out.
        self.info.metadata.update(
            source_files=_file_manifest(paths), records=stats.records, kept=stats.kept,
            skipped=stats.skipped,
            skipped_errors=[str(e) for e in stats.skipped_errors[:_KEPT_SKIP_MESSAGES]])
        if stats.skipped:
            logging.warning("problem pool %s: skipped %d of %d records", config.name, stats.skipped,
                            stats.records)


def open_problem_pool(
    files: str | os.PathLike,
    *,
    name: str,
    preset: str = "jsonl",
    data_dir: epath.PathLike | None = None,
    skip_bad: bool | None = None,
    rebuild: bool = False,
) -> ProblemSource:
    """A problem pool as a random-access sequence of problems, built into `data_dir` on first use.

    `files`: a JSONL/JSON file, a folder of them, or a glob. `name`: the pool's name (its TFDS config
    name and id prefix); one name, one set of files. `preset`: a key of `POOL_PRESETS` for the field
    mapping; `skip_bad` overrides the preset's. The returned source's `metadata` holds what the build
    recorded: source_files, records, kept, skipped, skipped_errors.
    """
    if preset not in POOL_PRESETS:
        raise ValueError(f"unknown pool preset {preset!r}; known: {', '.join(POOL_PRESETS)}")
    manifest = pool_manifest(files)
    preset_config = POOL_PRESETS[preset]
    config = dataclasses.replace(
        preset_config, name=name, files=os.path.abspath(os.fspath(files)),
        skip_bad=preset_config.skip_bad if skip_bad is None else skip_bad)
    builder = RstarProblemPool(config=config, data_dir=data_dir)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if rebuild
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=mode, try_download_gcs=False))
    built_from = builder.info.metadata.get("source_files")
    if built_from != manifest:
        raise ValueError(
            f"problem pool {name!r} in {builder.data_dir} was built from {built_from}, not from the "
            f"files now at {files}; pass rebuild=True or use another name")
    return ProblemSource(builder.as_data_source(split="train"), metadata=dict(builder.info.metadata))
