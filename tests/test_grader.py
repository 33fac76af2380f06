"""Answer grader: extraction, canonical form, equivalence and the time-bounded worker pool.

The regression cases live in tests/data/grader_cases.jsonl (one case per line: pred, ref, expected
`equal`, optionally the expected `extracted` answer, a category and a note).
"""
import io
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from experiments.grade import PairsFileError, grade_pairs, load_pairs
from rstar_jax.verify.answer_equiv import compare_answers, parse_number
from rstar_jax.verify.answer_extract import canonical_answer, extract_answer, last_boxed, reference_answers
from rstar_jax.verify.grader import Grader, GraderError, Verdict

CASES_FILE = Path(__file__).parent / "data" / "grader_cases.jsonl"
CASES = [json.loads(line) for line in CASES_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
BENCHMARK_STYLES = ("math500", "gsm8k", "aime", "amc", "olympiadbench", "collegemath", "gaokao", "omnimath")
TOWER = r"\boxed{2^{2^{2^{2^{2^{2}}}}}}"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=2, timeout_s=10.0) as grader:
        yield grader


# -- the regression suite ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_regression_case(grader, case):
    verdict = grader.grade(case["pred"], case["ref"])
    assert verdict.equal is case["equal"], f"{case.get('note', '')}: {verdict}"
    assert not verdict.timed_out, verdict
    if "extracted" in case:
        assert verdict.extracted == case["extracted"]


def test_regression_suite_covers_the_issue():
    assert len(CASES) >= 150
    assert len({case["id"] for case in CASES}) == len(CASES)
    categories = {case["category"] for case in CASES}
    for required in BENCHMARK_STYLES + (
        "extraction", "canonical", "numbers", "symbolic", "tuples", "intervals", "sets", "multiple",
        "matrices", "text", "references", "known-bug",
    ):
        assert required in categories, required
    for category in BENCHMARK_STYLES + ("numbers", "symbolic", "tuples", "sets", "multiple", "matrices"):
        outcomes = {case["equal"] for case in CASES if case["category"] == category}
        assert outcomes == {True, False}, f"{category} needs both equal and not-equal cases"


def test_regression_batch_matches_single_grades(grader):
    verdicts = grader.grade_batch([(case["pred"], case["ref"]) for case in CASES])
    assert [v.equal for v in verdicts] == [case["equal"] for case in CASES]


# -- extraction ---------------------------------------------------------------------------------------


def test_last_boxed_matches_braces_and_skips_escaped_ones():
    assert last_boxed(r"\boxed{1} and \boxed{\frac{a}{b}}") == r"\frac{a}{b}"
    assert last_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert last_boxed(r"\fbox{x}") == "x"
    assert last_boxed(r"\boxed{1} then \boxed{2") is None  # the last box never closes
    assert last_boxed("no box here") is None
    assert last_boxed(r"\boxedfoo{1}") is None  # another command, not a box


def test_extract_answer_forms():
    assert extract_answer(r"so \boxed{\text{Monday}}.") == "Monday"
    assert extract_answer("Work...\n#### 1,234") == "1,234"
    assert extract_answer(r" $\frac{1}{2}$ ") == r"\frac{1}{2}"
    assert extract_answer("<code>\nprint(3)\n<end_of_code>") is None
    assert extract_answer("line one\nline two") is None
    assert extract_answer(r"\boxed{}") == ""
    assert extract_answer(None) is None


def test_reference_answers_forms():
    assert reference_answers("Because...\n#### 72") == ["72"]
    assert reference_answers(27.0) == ["27.0"]
    assert reference_answers(1e-05) == ["1e-05"]
    assert reference_answers(5) == ["5"]
    assert reference_answers([r"$\frac12$", "0.5"]) == [r"\frac12", "0.5"]
    assert reference_answers(r"Thus \boxed{4}.") == ["4"]
    for bad in (None, True, [], {"a": 1}, float("nan")):
        with pytest.raises((TypeError, ValueError)):
            reference_answers(bad)


def test_canonical_answer_rewrites():
    assert canonical_answer(r"\left( 3, \dfrac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert canonical_answer(r"\$ 1{,}000.") == "1000"  # thousands separators go; list commas stay
    assert canonical_answer(r"1,234,567") == "1234567" and canonical_answer(r"2,\!500") == "2500"
    assert canonical_answer("2, 500") == "2,500"  # a comma and a space separate list items
    assert canonical_answer(r"2,\ 500") == canonical_answer(r"2,\,500") == canonical_answer("2,~500") == "2,500"
    assert canonical_answer("[0,100]") == "[0,100]" and canonical_answer("x = 1,000") == "x=1000"
    assert canonical_answer("4 square feet") == "4" and canonical_answer(r"5\text{ sec}") == "5"
    assert canonical_answer("3 pi") == "3pi" and canonical_answer(r"2\mathrm{e}") == "2e"
    assert canonical_answer("5 xy") == "5xy"  # two letters: a product, not a unit
    assert canonical_answer(r"45^{\circ}") == "45"
    assert canonical_answer(r"7\text{ cm}^2") == "7"
    assert canonical_answer(r"\pi r^2") == r"\pi r^2"  # command + letter keep their space
    assert canonical_answer(r"1 \text{ or } 2") == "1,2"
    assert canonical_answer(r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}") == r"\begin{pmatrix}1\\2\end{pmatrix}"


def test_parse_number_is_exact_and_bounded():
    assert parse_number("1234.5").value == 2469 / 2
    assert parse_number("1,234") is None  # canonical_answer removes thousands separators first
    assert parse_number(r"-\frac{3}{4}").value == -0.75
    assert parse_number("50%").percent
    assert parse_number("1.5e3").inexact and parse_number("15").inexact is False
    assert parse_number("1e999999999") is None  # would take forever to build exactly
    assert parse_number(r"\frac{1}{0}") is None
    assert parse_number("1,2") is None  # a list, not a thousands separator


# -- fast tier ----------------------------------------------------------------------------------------


def test_fast_tier_decides_plain_cases_without_sympy():
    assert compare_answers(canonical_answer("1,000.0"), "1000") == (True, "numeric")
    assert compare_answers(canonical_answer("2, 500"), "2500") == (False, "2 elements vs one number")
    assert compare_answers("1,-2", "1,-3")[0] is False
    assert compare_answers("Evelyn", "Evenly") == (False, "text")
    assert compare_answers(r"\frac{\pi}{2}", r"\pi/2")[0] is None  # needs sympy: undecided here


def test_fast_paths_need_no_worker():
    grader = Grader(num_workers=1, timeout_s=1.0)  # never started: a worker round trip would start it
    try:
        started = time.monotonic()
        verdicts = [grader.grade(r"\boxed{1,000}", "1000"), grader.grade(r"\boxed{0.5}", r"\frac12"),
                    grader.grade(r"\boxed{(1,2)}", "(2,1)"), grader.grade(r"\boxed{}", "1")]
        assert [v.equal for v in verdicts] == [True, True, False, False]
        assert time.monotonic() - started < 0.5
        assert "worker" not in grader.stats and grader._pool is None  # noqa: SLF001 - the point of the test
    finally:
        grader.close()


# -- time bound, threads and worker failures ----------------------------------------------------------


def test_tower_of_exponents_times_out_within_the_bound():
    with Grader(num_workers=1, timeout_s=1.0) as grader:
        grader.grade(r"\boxed{x}", "x+0")  # wait for the worker to be warm
        started = time.monotonic()
        verdict = grader.grade(TOWER, "5")
        elapsed = time.monotonic() - started
        assert verdict == Verdict(False, verdict.reason, r"2^{2^{2^{2^{2^{2}}}}}", verdict.time_s, True)
        assert "timed out" in verdict.reason
        assert elapsed < 1.0 + 1.0
        # The pool replaced the killed worker and keeps serving.
        assert grader.grade(r"\boxed{(x+1)^2}", "x^2+2x+1").equal
        # A timeout may be the machine's fault: the comparison runs once more; when it times out again, the
        # adversarial answer is answered from the cache, not by another timeout.
        assert grader.grade(TOWER, "5").timed_out and grader.stats["timed_out"] == 2
        started = time.monotonic()
        assert grader.grade(TOWER, "5").timed_out
        assert time.monotonic() - started < 0.1 and grader.stats["timed_out"] == 2


def test_time_bound_holds_off_the_main_thread():
    results = {}
    with Grader(num_workers=2, timeout_s=1.0) as grader:

        def grade_in_thread(name, pred, ref):
            results[name] = grader.grade(pred, ref)

        threads = [
            threading.Thread(target=grade_in_thread, args=("tower", r"\boxed{10^{10^{10^{10}}}}", "1")),
            threading.Thread(target=grade_in_thread, args=("symbolic", r"\boxed{\frac{1}{\sqrt3}}", r"\frac{\sqrt3}{3}")),
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert time.monotonic() - started < 15  # includes the workers' start
    assert results["tower"].timed_out and not results["tower"].equal
    assert results["symbolic"].equal and not results["symbolic"].timed_out


def _grade_in_a_pool_worker(pairs):
    with Grader(num_workers=1, timeout_s=1.0) as grader:
        started = time.monotonic()
        return [grader.grade(pred, ref) for pred, ref in pairs], time.monotonic() - started


def test_grader_works_inside_a_daemonic_pool_worker():
    """Users grade from multiprocessing pools, whose workers are daemonic (they may not start
    multiprocessing children): the grader's own worker still starts there, and the bound still holds."""
    pairs = [(r"\boxed{\frac{1}{2}}", "0.5"), (TOWER, "5"), (r"\boxed{x+1}", "1+x")]
    with multiprocessing.get_context("forkserver").Pool(1) as pool:  # no fork of a threaded test process
        verdicts, elapsed = pool.apply(_grade_in_a_pool_worker, (pairs,))
    assert [(v.equal, v.timed_out) for v in verdicts] == [(True, False), (False, True), (True, False)]
    assert elapsed < 15  # the worker's start, the 1 s bound twice (the timeout is retried once), the rest


def test_concurrent_grades_from_many_threads(grader):
    jobs = [(r"\boxed{\sqrt{8}}", r"2\sqrt2", True), (r"\boxed{1,-2}", "1,-3", False),
            (r"\boxed{x^2-1}", "(x-1)(x+1)", True), (r"\boxed{\frac{\pi}{3}}", r"\frac{\pi}{4}", False)] * 6
    results = [None] * len(jobs)

    def work(index):
        pred, ref, _ = jobs[index]
        results[index] = grader.grade(pred, ref).equal

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [expected for _, _, expected in jobs]


def test_a_dead_idle_worker_is_replaced():
    with Grader(num_workers=1, timeout_s=5.0) as grader:
        assert grader.grade(r"\boxed{2\sqrt2}", r"\sqrt8").equal
        worker = grader._pool._idle[0]  # noqa: SLF001 - simulate the OOM killer taking an idle worker
        os.kill(worker.pid, 9)
        worker._process.wait()  # noqa: SLF001
        assert grader.grade(r"\boxed{3\sqrt2}", r"\sqrt{18}").equal


def test_a_worker_killed_mid_comparison_gives_a_crash_verdict_and_is_replaced():
    with Grader(num_workers=1, timeout_s=30.0) as grader:
        assert grader.grade(r"\boxed{2\sqrt2}", r"\sqrt8").equal
        pid = grader._pool._idle[0].pid  # noqa: SLF001 - the one worker, about to get the tower
        result = {}
        thread = threading.Thread(target=lambda: result.update(verdict=grader.grade(TOWER, "5")))
        thread.start()
        time.sleep(0.5)
        os.kill(pid, 9)
        thread.join(timeout=20)
        verdict = result["verdict"]
        assert not verdict.equal and not verdict.timed_out
        assert "crashed" in verdict.reason
        assert grader.stats["crashed"] == 1
        assert grader.grade(r"\boxed{3\sqrt2}", r"\sqrt{18}").equal


def test_closed_grader_refuses_worker_comparisons():
    grader = Grader(num_workers=1)
    grader.close()
    with pytest.raises(GraderError):
        grader.grade(r"\boxed{\sqrt2}", r"2^{1/2}")


def test_grader_rejects_bad_arguments():
    with pytest.raises(ValueError):
        Grader(num_workers=0)
    with pytest.raises(ValueError):
        Grader(timeout_s=0)
    with pytest.raises(TypeError):
        Grader().grade(5, "5")


def test_batch_keeps_order_and_shares_duplicate_work(grader):
    pairs = [(r"\boxed{\sqrt{12}}", r"2\sqrt3"), ("7", "7"), (r"\boxed{\sqrt{12}}", r"2\sqrt3"), ("x", "")]
    verdicts = grader.grade_batch(pairs)
    assert [v.equal for v in verdicts] == [True, True, True, False]
    assert verdicts[3].reason == "empty reference"
    json.dumps([v.to_dict() for v in verdicts])


# -- the command line ----------------------------------------------------------------------------------


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


def test_grade_pairs_writes_verdicts_and_summary(grader, tmp_path):
    path = _write(tmp_path, "pairs.jsonl", "\n".join([
        json.dumps({"pred": r"The answer is \boxed{\left(3,\frac{\pi}{2}\right)}", "ref": r"(3, \pi/2)"}),
        "",
        json.dumps({"pred": "1,-2", "ref": ["1,-3", "4"]}),
        json.dumps({"pred": r"\boxed{18}", "ref": "Janet...\n#### 18"}),
    ]) + "\n")
    out = io.StringIO()
    summary = grade_pairs(load_pairs(path), grader, out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line.get("line") for line in lines[:3]] == [1, 3, 4]
    assert [line["equal"] for line in lines[:3]] == [True, False, True]
    assert set(lines[0]) == {"line", "equal", "reason", "extracted", "time_s", "timed_out"}
    assert lines[3] == {"summary": summary}
    assert summary["pairs"] == 3 and summary["equal"] == 2


@pytest.mark.parametrize("content, message", [
    ('{"pred": "1", "ref": "1"}\n{"pred": "2", "ref":\n', "pairs.jsonl:2: malformed JSON"),
    ('{"pred": "1"}\n', "pairs.jsonl:1: missing field 'ref'"),
    ('{"ref": "1"}\n', "pairs.jsonl:1: missing field 'pred'"),
    ('[1, 2]\n', "pairs.jsonl:1: expected a JSON object"),
    ('{"pred": 1, "ref": "1"}\n', "pairs.jsonl:1: field 'pred' must be a string"),
    ('\n{"pred": "1", "ref": null}\n', "pairs.jsonl:2: field 'ref'"),
    (b'{"pred": "\xff", "ref": "1"}\n', "pairs.jsonl:1: not UTF-8"),
])
def test_bad_pairs_file_names_file_and_line(tmp_path, content, message):
    path = _write(tmp_path, "pairs.jsonl", content)
    with pytest.raises(PairsFileError, match=message.replace("[", r"\[")):
        load_pairs(path)


def test_command_line_end_to_end(tmp_path):
    good = _write(tmp_path, "good.jsonl", json.dumps({"pred": r"\boxed{0.5+\frac{\pi}{8}}", "ref": r"\pi\div8+1\div2"}) + "\n")
    bad = _write(tmp_path, "bad.jsonl", '{"pred": "1"}\n')
    command = [sys.executable, "-m", "experiments.grade", "--timeout_s=5"]
    result = subprocess.run(command + [f"--pairs={good}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    verdict, summary = [json.loads(line) for line in result.stdout.splitlines()]
    assert verdict["equal"] is True and summary["summary"]["accuracy"] == 1.0
    result = subprocess.run(command + [f"--pairs={bad}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"{bad}:1: missing field 'ref'" in result.stderr


@pytest.mark.parametrize("flag, message", [
    ("--num_workers=0", "flag --num_workers=0"),
    ("--timeout_s=0", "--timeout_s must be positive"),
    ("--rel_tol=-1", "--rel_tol must be in [0, 1)"),
])
def test_command_line_refuses_bad_settings_by_flag(tmp_path, flag, message):
    good = _write(tmp_path, "good.jsonl", json.dumps({"pred": "1", "ref": "1"}) + "\n")
    result = subprocess.run([sys.executable, "-m", "experiments.grade", f"--pairs={good}", flag], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not result.stdout


# -- long ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pool_stays_healthy_under_mixed_adversarial_load():
    adversarial = [TOWER, r"\boxed{10^{10^{10^{10}}}}", r"\boxed{9^{9^{9^{9}}}}"]
    jobs = []
    for i in range(120):
        if i % 20 == 0:
            jobs.append((adversarial[(i // 20) % 3], str(i), False))
        else:
            jobs.append((rf"\boxed{{\sqrt{{{4 * i * i}}}}}", f"{2 * i}", True))
    with Grader(num_workers=2, timeout_s=1.0, cache_size=0) as grader:
        results = [None] * len(jobs)

        def work(offset):
            for index in range(offset, len(jobs), 4):
                results[index] = grader.grade(jobs[index][0], jobs[index][1])

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert [v.equal for v in results] == [expected for _, _, expected in jobs]
        assert sum(v.timed_out for v in results) == 6
        assert grader.stats["timed_out"] == 6
