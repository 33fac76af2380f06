"""Problem format, JSONL / JSON loading with located errors, and the benchmark source schemas."""
import json
import logging
import math
import pathlib

import pytest

from rstar_jax.data import source_schemas
from rstar_jax.data.problem import FieldError, canonical_answer
from rstar_jax.data.problem_files import LoadStats, ProblemFormatError, iter_problems, load_problems
from rstar_jax.data.problem_pool import last_boxed

FIXTURES = pathlib.Path(__file__).parent / "data" / "problems"


def write_lines(path, lines):
    """Lines as given (str are UTF-8 encoded, dicts JSON-encoded, bytes written raw)."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return path


# --- canonical answers -------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    (27.0, "27"),
    (0.75, "0.75"),
    (1e-05, "0.00001"),
    (-0.0, "0"),
    (12, "12"),
    ("  204 ", "204"),
    ("$\\frac{1}{2}$", "\\frac{1}{2}"),
    ("$$x^2$$", "x^2"),
    ("$x=1$ or $x=2$", "x=1 or x=2"),
    ("\\$25", "\\$25"),  # an escaped dollar is a dollar sign, not math mode
    (["$3$", 4.0], "3, 4"),
])
def test_canonical_answer(raw, expected):
    assert canonical_answer(raw) == expected


@pytest.mark.parametrize("raw", [True, math.nan, math.inf, "", "  $ $ ", [], None, {"a": 1}])
def test_canonical_answer_rejects_unusable_values(raw):
    with pytest.raises(FieldError) as e:
        canonical_answer(raw)
    assert e.value.field == "answer"


# --- JSONL loading -----------------------------------------------------------------------------

def test_load_problems_keeps_extras_and_fills_ids(tmp_path):
    path = write_lines(tmp_path / "mine.jsonl", [
        {"id": "p1", "question": "1+1?", "answer": "2", "source": "hand"},
        {"question": "2+2?", "answer": 4},
        "",  # blank lines are not records
        {"id": 7, "question": "Roots?", "answer": ["$1$", "$-2$"]},
    ])
    problems = load_problems(path)
    assert problems == [
        {"id": "p1", "question": "1+1?", "answer": "2", "source": "hand"},
        {"id": "mine/1", "question": "2+2?", "answer": "4"},
        {"id": "7", "question": "Roots?", "answer": "1, -2", "answers": ["1", "-2"]},
    ]
    assert load_problems(path, name="set")[1]["id"] == "set/1"


def test_iter_problems_streams_records_before_a_later_bad_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"question": "q", "answer": "a"}, "{broken"])
    stream = iter_problems(path)
    assert next(stream)["id"] == "p/0"
    with pytest.raises(ProblemFormatError):
        next(stream)


@pytest.mark.parametrize("bad_line, field, reason", [
    ('{"question": "q", "answer": ', None, "malformed JSON"),
    (b'{"question": "caf\xff", "answer": "1"}', None, "not UTF-8: byte 0xff at column 18"),
    ('["a", "list"]', None, "expected a JSON object"),
    ({"answer": "1"}, "question", "missing"),
    ({"question": "q"}, "answer", "missing"),
    ({"question": "q", "answer": None}, "answer", "missing"),
    ({"question": 3, "answer": "1"}, "question", "expected a string"),
    ({"question": "q", "answer": " "}, "answer", "empty answer"),
    ({"id": "a", "question": "q", "answer": "1"}, "id", "duplicate id 'a'"),
    ({"id": 1.5, "question": "q", "answer": "1"}, "id", "expected a string or integer id"),
])
def test_bad_record_error_names_file_line_and_field(tmp_path, bad_line, field, reason):
    path = write_lines(tmp_path / "bad.jsonl", [{"id": "a", "question": "q", "answer": "1"}, bad_line])
    with pytest.raises(ProblemFormatError) as e:
        load_problems(path)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 2, field)
    assert reason in e.value.reason
    assert str(e.value).startswith(f"{path}:2: ")


def test_duplicate_id_error_points_at_the_first_occurrence(tmp_path):
    path = write_lines(tmp_path / "dup.jsonl", [
        {"id": "x", "question": "q", "answer": "1"},
        {"id": "y", "question": "q", "answer": "1"},
        {"id": "x", "question": "q", "answer": "2"},
    ])
    expected = r"dup.jsonl:3: field 'id': duplicate id 'x' \(first at .*dup.jsonl:1\)"
    with pytest.raises(ProblemFormatError, match=expected):
        load_problems(path)


def test_skip_bad_skips_counts_and_logs_every_bad_record(tmp_path, caplog):
    path = write_lines(tmp_path / "mixed.jsonl", [
        {"question": "good 0", "answer": "1"},
        "not json",
        b'{"question": "\xc3\x28", "answer": "1"}',
        {"question": "no answer"},
        {"id": "mixed/0", "question": "same id as the first", "answer": "1"},
        {"question": "good 5", "answer": "2"},
    ])
    stats = LoadStats()
    with caplog.at_level(logging.WARNING):
        problems = load_problems(path, skip_bad=True, stats=stats)
    # Skipped records keep their place in the numbering: the last good one is still index 5.
    assert [p["id"] for p in problems] == ["mixed/0", "mixed/5"]
    assert (stats.records, stats.kept, stats.skipped) == (6, 2, 4)
    assert [(e.line, e.field) for e in stats.skipped_errors] == [(2, None), (3, None), (4, "answer"), (5, "id")]
    assert "skipped 4 bad record(s) of 6" in caplog.text


# --- JSON array files --------------------------------------------------------------------------

def test_json_array_file_loads_with_line_numbers_in_errors(tmp_path):
    good = tmp_path / "set.json"
    good.write_text(json.dumps([{"question": "a", "answer": 1}, {"question": "b", "answer": "2"}], indent=2))
    assert [p["id"] for p in load_problems(good)] == ["set/0", "set/1"]

    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"question": "a", "answer": "1"},\n  {"question": "b"}\n]\n')
    with pytest.raises(ProblemFormatError) as e:
        load_problems(bad)
    assert (e.value.line, e.value.field) == (3, "answer")
    stats = LoadStats()
    assert len(load_problems(bad, skip_bad=True, stats=stats)) == 1 and stats.skipped == 1


@pytest.mark.parametrize("content, line", [
    ('[\n  {"question": "a", "answer": "1"},\n  {"question": \n]', 4),  # value expected at ']'
    ('{"question": "a", "answer": "1"}', 1),  # not an array
    ('[\n {"question": "a", "answer": "1"}\n {"question": "b", "answer": "2"}]', 3),  # missing comma
])
def test_json_syntax_errors_fail_even_when_skipping(tmp_path, content, line):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ProblemFormatError, match="malformed JSON") as e:
        load_problems(path, skip_bad=True)
    assert e.value.line == line


def test_json_file_with_a_non_utf8_byte_names_its_line(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n{"question": "a", "answer": "1"},\n{"question": "caf\xe9", "answer": "1"}\n]')
    with pytest.raises(ProblemFormatError, match=r"latin1.json:3: not UTF-8: byte 0xe9"):
        load_problems(path)


# --- benchmark source schemas (on the dummy source files) --------------------------------------

SCHEMAS = {
    "math500": source_schemas.math500_problem,
    "gsm8k": source_schemas.gsm8k_problem,
    "aime24": source_schemas.aime24_problem,
    "amc23": source_schemas.amc23_problem,
    "olympiadbench": source_schemas.olympiadbench_problem,
    "college_math": source_schemas.college_math_problem,
    "gaokao2023en": source_schemas.gaokao2023en_problem,
    "omni_math": source_schemas.omni_math_problem,
}

EXPECTED_IDS_AND_ANSWERS = {
    "math500": [("math500/test/prealgebra/1001.json", "12"),
                ("math500/test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)"),
                ("math500/test/prealgebra/2002.json", "\\$25")],
    "gsm8k": [("gsm8k/0", "31"), ("gsm8k/1", "1600"), ("gsm8k/2", "-3")],
    "aime24": [("aime24/60", "204"), ("aime24/61", "321")],
    "amc23": [("amc23/0", "27"), ("amc23/1", "0.75"), ("amc23/2", "8")],
    "olympiadbench": [("olympiadbench/1606", "3"), ("olympiadbench/1709", "(1,8,19), (2,7,13), (4,5,7)"),
                      ("olympiadbench/2001", "-1, 2")],
    "college_math": [("college_math/0", "1"), ("college_math/1", "-2")],
    "gaokao2023en": [("gaokao2023en/0", "\\{2,3\\}"), ("gaokao2023en/1", "x=1 or x=2")],
    "omni_math": [("omni_math/0", "3"), ("omni_math/1", "\\frac{1}{2}")],
}


def load_fixture(name):
    return load_problems(FIXTURES / name / "test.jsonl", mapper=SCHEMAS[name], name=name)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_source_schema_maps_ids_and_answers(name):
    problems = load_fixture(name)
    assert [(p["id"], p["answer"]) for p in problems] == EXPECTED_IDS_AND_ANSWERS[name]
    assert all(p["question"].strip() for p in problems)


def test_math500_keeps_its_metadata_fields():
    first = load_fixture("math500")[0]
    assert first["question"].startswith("What is the value of")
    assert (first["subject"], first["level"], first["unique_id"]) == ("Prealgebra", 2, "test/prealgebra/1001.json")
    assert "problem" not in first and "\\boxed{12}" in first["solution"]


def test_gsm8k_keeps_the_rationale_without_the_final_line():
    problem = load_fixture("gsm8k")[1]
    assert problem["answer"] == "1600"
    assert problem["rationale"] == "It sells 800*2=<<800*2=1600>>1600 eggs.\nSo it makes 1600*1=$<<1600*1=1600>>1,600."


def test_gsm8k_without_a_final_answer_line_is_an_error(tmp_path):
    path = write_lines(tmp_path / "gsm8k.jsonl", [{"question": "q", "answer": "no final line"}])
    with pytest.raises(ProblemFormatError, match=r"gsm8k.jsonl:1: field 'answer': no final '#### <answer>'"):
        load_problems(path, mapper=source_schemas.gsm8k_problem)


def test_numeric_source_ids_are_kept_as_source_id():
    aime = load_fixture("aime24")[1]
    assert (aime["id"], aime["source_id"], aime["answer"]) == ("aime24/61", 61, "321")
    assert load_fixture("amc23")[0]["url"].endswith("2023_AMC_12A_Problems/Problem_1")


def test_olympiadbench_answer_lists_and_context():
    single, tuples, multi = load_fixture("olympiadbench")
    assert single["answers"] == ["3"] and single["is_multiple_answer"] is False
    assert tuples["answers"] == ["(1,8,19), (2,7,13), (4,5,7)"]
    assert multi["answers"] == ["-1", "2"] and multi["answer"] == "-1, 2"
    assert multi["question"] == "Let $f(x)=x^2-2$ for all real $x$.\n\nFind all real solutions of $f(x)=x$."
    assert "final_answer" not in multi and multi["answer_type"] == "Numerical"


def test_olympiadbench_empty_answer_list_is_an_error(tmp_path):
    path = write_lines(tmp_path / "ob.jsonl", [{"id": 1, "question": "q", "final_answer": []}])
    with pytest.raises(ProblemFormatError, match="field 'final_answer'"):
        load_problems(path, mapper=source_schemas.olympiadbench_problem)


def test_question_may_be_named_problem_or_question_but_must_exist(tmp_path):
    path = write_lines(tmp_path / "amc.jsonl", [{"id": 0, "problem": "q?", "answer": 2.0}, {"id": 1, "answer": 3.0}])
    with pytest.raises(ProblemFormatError) as e:
        load_problems(path, mapper=source_schemas.amc23_problem)
    assert (e.value.line, e.value.field) == (2, "problem/question")


def test_omni_math_keeps_domain_list_and_difficulty():
    problem = load_fixture("omni_math")[1]
    assert problem["domain"] == ["Mathematics -> Algebra -> Inequalities", "Mathematics -> Algebra -> Other"]
    assert problem["difficulty"] == 7.5 and problem["source"] == "china_national_olympiad"


# --- \boxed{} for pools without an answer field ------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\{2, 3\\}}", "\\{2, 3\\}"),
    ("\\fbox{7}", "7"),
    ("no box here", None),
    ("\\boxed{unbalanced", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected
