"""TFDS builders for the benchmarks and the problem pool, built from the dummy source files.

In the tensorflow-datasets testing style: each builder is built from `tests/data/problems` (its
`manual_dir`) into a temporary data dir, its split sizes are checked, and what reads back must equal
the source mapped directly. Builds are shared per module: a build is the slow part.
"""
import json
import pathlib
import shutil
import tempfile

import pytest
import tensorflow_datasets as tfds

from rstar_jax.data import benchmarks, problem_pool, source_schemas
from rstar_jax.data.benchmarks import BENCHMARKS, load_benchmark
from rstar_jax.data.problem_files import ProblemFormatError, load_problems
from rstar_jax.data.problem_pool import open_problem_pool
from rstar_jax.data.tfds_problems import example_to_problem
from rstar_jax.errors import InputError

FIXTURES = pathlib.Path(__file__).parent / "data" / "problems"
POOL = FIXTURES / "pool" / "numinamath.jsonl"

SPLITS = {  # problems per dummy source file
    "math500": 3, "gsm8k": 3, "aime24": 2, "amc23": 3, "olympiadbench": 3,
    "college_math": 2, "gaokao2023en": 2, "omni_math": 2,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def built(data_dir):
    """Every benchmark built from the dummy files and read back through `load_benchmark`."""
    return {name: load_benchmark(name, data_dir=data_dir, manual_dir=FIXTURES) for name in BENCHMARKS}


@pytest.fixture
def no_download(monkeypatch):
    """Fail any attempt to download: tests must never reach the network."""
    def refuse(self, url_or_urls):
        raise AssertionError(f"tried to download {url_or_urls}")
    monkeypatch.setattr(tfds.download.DownloadManager, "download", refuse)


def test_registry_names_the_eight_benchmarks():
    assert sorted(BENCHMARKS) == sorted(SPLITS)
    for name, cls in BENCHMARKS.items():
        assert cls.name == f"rstar_{name}"  # prefixed: no clash with TFDS's own catalog
        assert cls.SOURCE_URL.startswith("https://") and cls.SOURCE_URL.endswith(".jsonl")
        assert cls.PUBLIC_SIZE > 0
    with pytest.raises(ValueError, match="unknown benchmark 'math'; known: math500, gsm8k"):
        load_benchmark("math")


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_builder_reads_back_the_mapped_source(built, data_dir, name):
    builder = BENCHMARKS[name](data_dir=data_dir)
    assert builder.info.splits["test"].num_examples == SPLITS[name]
    assert builder.info.file_format.value == "array_record"
    expected = load_problems(FIXTURES / name / "test.jsonl", mapper=BENCHMARKS[name].SCHEMA, name=name)
    assert built[name] == expected  # every field, in source order


def test_extra_fields_survive_storage_with_their_types(built):
    olympiad = built["olympiadbench"][2]
    assert olympiad["answers"] == ["-1", "2"] and olympiad["unit"] is None
    assert olympiad["is_multiple_answer"] is True and olympiad["solution"] == ["..."]
    assert built["omni_math"][0]["difficulty"] == 5.0
    assert built["math500"][0]["level"] == 2


def test_built_benchmark_is_reused_without_its_source(built, data_dir, no_download):
    assert load_benchmark("gsm8k", data_dir=data_dir) == built["gsm8k"]
    # Plain TFDS works on it too: the registered name, array_record, random access.
    source = tfds.data_source("rstar_aime24", split="test", data_dir=data_dir, download=False)
    assert [example_to_problem(source[i])["answer"] for i in range(len(source))] == ["204", "321"]


def test_flat_local_copy_and_rebuild(tmp_path, no_download):
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(FIXTURES / "amc23" / "test.jsonl", manual / "amc23.jsonl")  # <manual_dir>/<name>.jsonl
    data = tmp_path / "data"
    assert [p["answer"] for p in load_benchmark("amc23", data_dir=data, manual_dir=manual)] == ["27", "0.75", "8"]

    with open(manual / "amc23.jsonl", "a") as f:
        f.write(json.dumps({"id": 3, "question": "New?", "answer": 9.5}) + "\n")
    assert len(load_benchmark("amc23", data_dir=data, manual_dir=manual)) == 3  # built data reused
    rebuilt = load_benchmark("amc23", data_dir=data, manual_dir=manual, rebuild=True)
    assert [p["answer"] for p in rebuilt] == ["27", "0.75", "8", "9.5"]


def test_building_leaves_no_temporary_folders(tmp_path, monkeypatch, no_download):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert len(load_benchmark("aime24", data_dir=tmp_path / "data", manual_dir=FIXTURES)) == 2
    assert list(scratch.iterdir()) == []


def test_manual_dir_without_the_file_is_an_error_not_a_download(tmp_path, no_download):
    (tmp_path / "other.jsonl").write_text("{}\n")
    expected = r"gaokao2023en: no local copy in manual_dir \(tried .*gaokao2023en/test.jsonl, .*gaokao2023en.jsonl\)"
    with pytest.raises(FileNotFoundError, match=expected):
        load_benchmark("gaokao2023en", data_dir=tmp_path / "data", manual_dir=tmp_path)


def test_bad_source_record_fails_the_build_naming_file_line_and_field(tmp_path, no_download):
    manual = tmp_path / "manual"
    (manual / "gsm8k").mkdir(parents=True)
    rows = [{"question": "q1", "answer": "1+1=2\n#### 2"}, {"question": "q2", "answer": "forgot the final line"}]
    (manual / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ProblemFormatError) as e:
        load_benchmark("gsm8k", data_dir=tmp_path / "data", manual_dir=manual)
    assert (e.value.path.endswith("gsm8k/test.jsonl"), e.value.line, e.value.field) == (True, 2, "answer")


# --- problem pool -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def numina_pool(data_dir):
    return open_problem_pool(POOL, name="numina_test", preset="numinamath", data_dir=data_dir)


def test_numinamath_pool_takes_boxed_answers_and_counts_skips(numina_pool):
    assert len(numina_pool) == 3
    assert [(p["id"], p["answer"]) for p in numina_pool] == [
        ("numina_test/numinamath/0", "4"), ("numina_test/numinamath/2", "\\frac{1}{2}"),
        ("numina_test/numinamath/3", "-3")]
    assert all("messages" not in p and p["source"] for p in numina_pool)
    assert numina_pool[-1]["question"] == "Find $x$ if $x^2=9$ and $x<0$."
    with pytest.raises(IndexError):
        numina_pool[3]
    meta = numina_pool.metadata
    assert (meta["records"], meta["kept"], meta["skipped"]) == (4, 3, 1)
    assert meta["skipped_errors"] == [f"{POOL}:2: field 'answer': missing, and no \\boxed{{}} in 'solution'"]
    assert meta["source_files"] == [{"path": str(POOL), "bytes": POOL.stat().st_size}]


def test_pool_reopened_from_its_folder_reuses_the_build(numina_pool, data_dir):
    again = open_problem_pool(POOL.parent, name="numina_test", preset="numinamath", data_dir=data_dir)
    assert list(again) == list(numina_pool)


def test_pool_without_skipping_fails_on_the_first_bad_record(tmp_path):
    with pytest.raises(ProblemFormatError, match=r"numinamath.jsonl:2: field 'answer'"):
        open_problem_pool(POOL, name="strict", preset="numinamath", skip_bad=False, data_dir=tmp_path)


def test_a_pool_that_keeps_no_record_names_the_file_and_the_first_errors(tmp_path):
    from experiments.search import load_problem_set
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"problem": f"q{i}", "solution": "no box"}) + "\n" for i in range(3)))
    expected = (rf"{bad}: 0 of 3 records kept; first errors: {bad}:1: field 'answer': missing, and no \\boxed{{}} in "
                rf"'solution'; {bad}:2: ")
    with pytest.raises(InputError, match=expected):
        open_problem_pool(bad, name="none_kept", preset="numinamath", data_dir=tmp_path / "data")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match=rf"--problems=pool:numinamath:{empty}: {empty}: 0 of 0 records kept$"):
        load_problem_set(f"pool:numinamath:{empty}", data_dir=str(tmp_path / "data"))


def test_pool_refuses_a_stale_build_until_rebuilt(tmp_path):
    first = tmp_path / "a.jsonl"
    first.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    assert len(open_problem_pool(first, name="mine", data_dir=tmp_path / "data")) == 1
    with open(first, "a") as f:
        f.write(json.dumps({"question": "q2", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="was built from .* pass rebuild=True or use another name"):
        open_problem_pool(first, name="mine", data_dir=tmp_path / "data")
    rebuilt = open_problem_pool(first, name="mine", data_dir=tmp_path / "data", rebuild=True)
    assert [p["id"] for p in rebuilt] == ["mine/a/0", "mine/a/1"]


def test_pool_ids_must_be_unique_across_files(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"id": "same", "question": "q", "answer": "1"}) + "\n")
    expected = r"b.jsonl:1: field 'id': duplicate id 'same' \(first at .*a.jsonl:1\)"
    with pytest.raises(ProblemFormatError, match=expected):
        open_problem_pool(tmp_path, name="dups", data_dir=tmp_path / "data")


def test_pool_preset_through_plain_tfds_with_manual_dir(data_dir):
    source = tfds.data_source(
        "rstar_problem_pool/numinamath", split="train", data_dir=data_dir,
        download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(
            manual_dir=POOL.parent, try_download_gcs=False)})
    assert [example_to_problem(r)["id"] for r in source] == [
        "numinamath/numinamath/0", "numinamath/numinamath/2", "numinamath/numinamath/3"]


def test_pool_mapper_on_our_own_format_keeps_ids_and_lists():
    mapper = problem_pool.pool_mapper(problem_pool.POOL_PRESETS["jsonl"])
    assert mapper({"id": 5, "question": "q", "answer": [1, "$2$"], "tag": "t"}, 0, "p") == {
        "id": "5", "question": "q", "answer": "1, 2", "answers": ["1", "2"], "tag": "t"}
    assert mapper({"question": "q", "answer": 0.5}, 4, "p/f")["id"] == "p/f/4"


def test_every_schema_mapper_is_wired_to_its_builder():
    assert benchmarks.RstarGsm8k.SCHEMA is source_schemas.gsm8k_problem
    assert {cls.SCHEMA.__name__ for cls in BENCHMARKS.values()} == {f"{n}_problem" for n in BENCHMARKS}


def test_a_pool_spec_loads_a_training_pool_for_search_and_rounds(tmp_path):
    """`--problems=pool:<preset>:<files>` (experiments.search, .evaluate, .round): built once under a name that
    digests the files, so a changed file is a new build rather than a refusal."""
    from experiments.search import load_problem_set
    data = tmp_path / "data"
    problems = load_problem_set(f"pool:numinamath:{POOL}", data_dir=str(data))
    assert [p["answer"] for p in problems] == ["4", "\\frac{1}{2}", "-3"]
    assert load_problem_set(f"pool:numinamath:{POOL.parent}", 2, data_dir=str(data)) == problems[:2]
    grown = tmp_path / "numinamath.jsonl"
    shutil.copy(POOL, grown)
    first = load_problem_set(f"pool:numinamath:{grown}", data_dir=str(data))
    with open(grown, "a") as f:
        f.write(json.dumps({"problem": "What is 1+1?", "solution": "It is \\boxed{2}."}) + "\n")
    assert len(load_problem_set(f"pool:numinamath:{grown}", data_dir=str(data))) == len(first) + 1
    with pytest.raises(ValueError, match="expected pool:<preset>:<files> with a preset of jsonl, numinamath"):
        load_problem_set(f"pool:numina:{POOL}", data_dir=str(data))


def test_a_build_another_host_finished_first_is_read(tmp_path, monkeypatch):
    """Hosts sharing a data dir build a set at once: the one that loses the final rename reads the other's."""
    import rstar_jax.data
    from experiments.search import load_problem_set
    calls = []

    def load_benchmark(name, **kwargs):
        calls.append(name)
        if len(calls) == 1:
            raise FileExistsError(f"{tmp_path}/{name}/1.0.0")
        return [{"id": "a", "question": "q", "answer": "1"}]

    monkeypatch.setattr(rstar_jax.data, "load_benchmark", load_benchmark)
    assert load_problem_set("tfds:math500", data_dir=str(tmp_path)) == [{"id": "a", "question": "q", "answer": "1"}]
    assert calls == ["math500", "math500"]
