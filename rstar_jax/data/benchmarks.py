"""The evaluation benchmarks as TFDS builders (array_record, no TensorFlow) and `load_benchmark`.

Each builder takes its source file from a local copy when there is one, else downloads its public
copy. Local copy: `<manual_dir>/<benchmark>/test.jsonl` (the layout of Qwen2.5-Math's
`evaluation/data`, so `manual_dir` may point at that folder) or `<manual_dir>/<benchmark>.jsonl`.

Checksums: this repository pins none (they could not be verified here). TFDS computes each
download's checksum; run once with `tfds.download.DownloadConfig(register_checksums=True)` to record
them in `rstar_jax/data/checksums.tsv`, after which TFDS verifies every later download against it.
"""
from __future__ import annotations

import os
from typing import ClassVar

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from rstar_jax.data import source_schemas
from rstar_jax.data.problem_files import Mapper, iter_problems
from rstar_jax.data.tfds_problems import (
    ARRAY_RECORD,
    ProblemSetBuilder,
    example_to_problem,
    problem_to_example,
)

_QWEN_DATA = "https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data"


def local_copy_candidates(manual_dir: epath.PathLike, benchmark: str) -> list[epath.Path]:
    """Where a local copy of a benchmark's source file may be, in the order they are tried."""
    root = epath.Path(manual_dir)
    return [root / benchmark / "test.jsonl", root / f"{benchmark}.jsonl"]


def find_local_copy(manual_dir: epath.PathLike, benchmark: str) -> epath.Path | None:
    for path in local_copy_candidates(manual_dir, benchmark):
        if path.is_file():
            return path
    return None


class BenchmarkBuilder(ProblemSetBuilder, skip_registration=True):
    """One benchmark: a single "test" split read from one JSONL source file."""

    BENCHMARK: ClassVar[str]  # registry name, also the prefix of its problem ids
    SOURCE_URL: ClassVar[str]  # the commonly used public copy
    PUBLIC_SIZE: ClassVar[int]  # problems in that copy; a different count is logged
    SCHEMA: ClassVar[Mapper]  # source record -> problem (`source_schemas`)
    DESCRIPTION: ClassVar[str]
    HOMEPAGE: ClassVar[str]
    CITATION: ClassVar[str]

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional. Put the benchmark's source JSONL at <manual_dir>/<benchmark>/test.jsonl (the "
        "layout of Qwen2.5-Math's evaluation/data) or <manual_dir>/<benchmark>.jsonl; without a "
        "local copy the public one is downloaded.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self._problem_info(description=self.DESCRIPTION, homepage=self.HOMEPAGE,
                                  citation=self.CITATION)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        path = self._local_copy(dl_manager)
        if path is None:
            logging.info("%s: no local copy, downloading %s", self.BENCHMARK, self.SOURCE_URL)
            path = dl_manager.download(self.SOURCE_URL)
        return {"test": self._generate_examples(path)}

    def _local_copy(self, dl_manager: tfds.download.DownloadManager) -> epath.Path | None:
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError:  # TFDS's way of saying: no manual dir, or an empty one
            return None
        return find_local_copy(manual_dir, self.BENCHMARK)

    def _generate_examples(self, path: epath.PathLike):
        count = 0
        for index, problem in enumerate(iter_problems(os.fspath(path), mapper=self.SCHEMA, name=self.BENCHMARK)):
            count += 1
            yield index, problem_to_example(problem)
        if count != self.PUBLIC_SIZE:
            logging.warning("%s: %d problems in %s; the public copy has %d", self.BENCHMARK, count,
                            path, self.PUBLIC_SIZE)


class RstarMath500(BenchmarkBuilder):
    BENCHMARK = "math500"
    SOURCE_URL = "https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl"
    PUBLIC_SIZE = 500
    SCHEMA = staticmethod(source_schemas.math500_problem)
    DESCRIPTION = "MATH-500: the 500 MATH test problems of 'Let's Verify Step by Step'."
    HOMEPAGE = "https://huggingface.co/datasets/HuggingFaceH4/MATH-500"
    CITATION = """@article{lightman2023verify,
  title={Let's Verify Step by Step}, author={Lightman, Hunter and others},
  journal={arXiv preprint arXiv:2305.20050}, year={2023}}"""


class RstarGsm8k(BenchmarkBuilder):
    BENCHMARK = "gsm8k"
    SOURCE_URL = ("https://raw.githubusercontent.com/openai/grade-school-math/master/"
                  "grade_school_math/data/test.jsonl")
    PUBLIC_SIZE = 1319
    SCHEMA = staticmethod(source_schemas.gsm8k_problem)
    DESCRIPTION = "GSM8K test split: grade-school word problems; answer from the '#### N' line."
    HOMEPAGE = "https://github.com/openai/grade-school-math"
    CITATION = """@article{cobbe2021gsm8k,
  title={Training Verifiers to Solve Math Word Problems}, author={Cobbe, Karl and others},
  journal={arXiv preprint arXiv:2110.14168}, year={2021}}"""


class RstarAime24(BenchmarkBuilder):
    BENCHMARK = "aime24"
    SOURCE_URL = f"{_QWEN_DATA}/aime24/test.jsonl"
    PUBLIC_SIZE = 30
    SCHEMA = staticmethod(source_schemas.aime24_problem)
    DESCRIPTION = "AIME 2024 (I and II): 30 problems with integer answers."
    HOMEPAGE = "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I"
    CITATION = ""


class RstarAmc23(BenchmarkBuilder):
    BENCHMARK = "amc23"
    SOURCE_URL = f"{_QWEN_DATA}/amc23/test.jsonl"
    PUBLIC_SIZE = 40
    SCHEMA = staticmethod(source_schemas.amc23_problem)
    DESCRIPTION = "AMC 2023 (12A and 12B): 40 problems, answers stored as floats in the source."
    HOMEPAGE = "https://huggingface.co/datasets/AI-MO/aimo-validation-amc"
    CITATION = ""


class RstarOlympiadbench(BenchmarkBuilder):
    BENCHMARK = "olympiadbench"
    SOURCE_URL = f"{_QWEN_DATA}/olympiadbench/test.jsonl"
    PUBLIC_SIZE = 675
    SCHEMA = staticmethod(source_schemas.olympiadbench_problem)
    DESCRIPTION = "OlympiadBench, text-only English open-ended math (OE_TO_maths_en_COMP)."
    HOMEPAGE = "https://github.com/OpenBMB/OlympiadBench"
    CITATION = """@article{he2024olympiadbench,
  title={OlympiadBench: A Challenging Benchmark for Promoting AGI with Olympiad-Level Bilingual
  Multimodal Scientific Problems}, author={He, Chaoqun and others},
  journal={arXiv preprint arXiv:2402.14008}, year={2024}}"""


class RstarCollegeMath(BenchmarkBuilder):
    BENCHMARK = "college_math"
    SOURCE_URL = f"{_QWEN_DATA}/college_math/test.jsonl"
    PUBLIC_SIZE = 2818
    SCHEMA = staticmethod(source_schemas.college_math_problem)
    DESCRIPTION = "College Math (MathScale): college-level problems from textbooks."
    HOMEPAGE = "https://github.com/microsoft/unilm/tree/master/mathscale"
    CITATION = """@article{tang2024mathscale,
  title={MathScale: Scaling Instruction Tuning for Mathematical Reasoning},
  author={Tang, Zhengyang and others}, journal={arXiv preprint arXiv:2403.02884}, year={2024}}"""


class RstarGaokao2023en(BenchmarkBuilder):
    BENCHMARK = "gaokao2023en"
    SOURCE_URL = f"{_QWEN_DATA}/gaokao2023en/test.jsonl"
    PUBLIC_SIZE = 385
    SCHEMA = staticmethod(source_schemas.gaokao2023en_problem)
    DESCRIPTION = "Gaokao 2023 En: the 2023 Chinese college entrance exam math, in English (MARIO)."
    HOMEPAGE = "https://github.com/MARIO-Math-Reasoning/MARIO_EVAL"
    CITATION = """@article{liao2024mario,
  title={MARIO: MAth Reasoning with code Interpreter Output -- A Reproducible Pipeline},
  author={Liao, Minpeng and others}, journal={arXiv preprint arXiv:2401.08190}, year={2024}}"""


class RstarOmniMath(BenchmarkBuilder):
    BENCHMARK = "omni_math"
    SOURCE_URL = "https://huggingface.co/datasets/KbsdJames/Omni-MATH/resolve/main/test.jsonl"
    PUBLIC_SIZE = 4428
    SCHEMA = staticmethod(source_schemas.omni_math_problem)
    DESCRIPTION = "Omni-MATH: olympiad-level problems with domain and difficulty labels."
    HOMEPAGE = "https://omni-math.github.io/"
    CITATION = """@article{gao2024omnimath,
  title={Omni-MATH: A Universal Olympiad Level Mathematic Benchmark for Large Language Models},
  author={Gao, Bofei and others}, journal={arXiv preprint arXiv:2410.07985}, year={2024}}"""


BENCHMARKS: dict[str, type[BenchmarkBuilder]] = {
    cls.BENCHMARK: cls
    for cls in (RstarMath500, RstarGsm8k, RstarAime24, RstarAmc23, RstarOlympiadbench,
                RstarCollegeMath, RstarGaokao2023en, RstarOmniMath)
}


def benchmark_builder(name: str) -> type[BenchmarkBuilder]:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_benchmark(
    name: str,
    *,
    data_dir: epath.PathLike | None = None,
    manual_dir: epath.PathLike | None = None,
    rebuild: bool = False,
) -> list[dict]:
    """A benchmark's problems, built into `data_dir` on first use and read with `tfds.data_source`.

    `data_dir`: where TFDS keeps built datasets (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    `manual_dir`: a folder with a local copy of the source (see the module doc); required to hold
    one when given, so that a typo never falls back to downloading. A dataset already built is
    reused as is; `rebuild=True` builds it again from the source.
    """
    builder_cls = benchmark_builder(name)
    if manual_dir is not None and find_local_copy(manual_dir, name) is None:
        tried = ", ".join(os.fspath(p) for p in local_copy_candidates(manual_dir, name))
        raise FileNotFoundError(f"{name}: no local copy in manual_dir (tried {tried})")
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if rebuild
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    download_config = tfds.download.DownloadConfig(
        manual_dir=manual_dir, download_mode=mode,
        try_download_gcs=False)  # no prepared copies of these on GCS; don't ask
    source = tfds.data_source(
        builder_cls.name, split="test", data_dir=data_dir, download=True,
        builder_kwargs={"file_format": ARRAY_RECORD},
        download_and_prepare_kwargs={"download_config": download_config})
    return [example_to_problem(record) for record in source]
