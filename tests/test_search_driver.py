"""The search stage end to end: a real tiny policy (and PPM), the real sampler, sandbox and grader."""
import dataclasses
import glob
import json
import os
import random
import re
import signal
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from experiments.expand import example_problem
from experiments.search import load_scorer, run_search, still_to_search
from rstar_jax.search import steps
from rstar_jax.search.config import SearchConfig
from rstar_jax.search.driver import ResumeError, pin_settings, read_finished, step_budgets, stream_id
from rstar_jax.search.extract import ExtractConfig, extract_files
from rstar_jax.search.tree_record import TreeRecord
from rstar_jax.verify.grader import Grader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(rollouts=3, num_candidates=4, max_depth=5, max_step_tokens=40, batch_size=2, exec_timeout_s=10.0)


@pytest.fixture(scope="module")
def models(miniature, tmp_path_factory):
    rng = random.Random(7)
    problems = [example_problem(rng, i)[0] for i in range(4)]
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return {"policy": miniature["policy"], "ppm": miniature["ppm"], "problems": problems, "problems_file": str(path)}


def _records(path):
    with open(path) as f:
        return [TreeRecord.from_dict(json.loads(line)) for line in f]


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _check_extracted(out, problems, records):
    """The training data holds only verified trajectories, and pairs whose sides are a correct and a wrong one."""
    from rstar_jax.tokenizer import format_prompt
    answer_of = {format_prompt(p["question"]): p["answer"] for p in problems}
    solved = {r.prompt for r in records if any(n.correct for n in r.nodes)}
    sft, pairs = _jsonl(out / "extracted" / "sft.jsonl"), _jsonl(out / "extracted" / "pairs.jsonl")
    with Grader() as grader:
        for row in sft:
            assert grader.grade(row["response"], answer_of[row["prompt"]]).equal, row
        for pair in pairs:
            assert pair["prompt"] in answer_of and pair["pos"] != pair["neg"]
            if "/final/" in pair["id"]:  # whole trajectories: the chosen one right, the rejected one wrong
                assert grader.grade(pair["pos"], answer_of[pair["prompt"]]).equal, pair
                assert not grader.grade(pair["neg"], answer_of[pair["prompt"]]).equal, pair
    assert {row["prompt"] for row in sft} == solved  # every solved problem, and only those
    assert {pair["prompt"] for pair in pairs} <= solved
    buckets = _jsonl(out / "extracted" / "buckets.jsonl")
    assert sorted(b["id"] for b in buckets) == sorted(r.problem_id for r in records)


@pytest.fixture(scope="module")
def terminal_run(models, tmp_path_factory):
    """An uninterrupted terminal-guided run of the search stage, in this process: (out dir, stats, the progress
    lines it printed, one per iteration)."""
    out = tmp_path_factory.mktemp("terminal")
    lines = []
    stats = run_search(SearchConfig(mode="terminal", **SMALL), models["problems"], models["policy"], None, str(out),
                       extract_config=ExtractConfig(), progress=lines.append, progress_every_s=0)
    return out, stats, lines


def test_terminal_guided_search_and_extraction(models, terminal_run):
    out, stats, _ = terminal_run
    config = SearchConfig(mode="terminal", **SMALL)
    assert stats["searched"] == 4 and set(stats["seconds"]) >= {"tree", "generate", "execute", "grade"}
    records = _records(out / "trees.jsonl")
    assert sorted(r.problem_id for r in records) == sorted(p["id"] for p in models["problems"])
    answers = [n for r in records for n in r.nodes if n.terminal_reason == "answer"]
    assert answers, "the warmed-up policy should reach answer steps"
    with Grader() as grader:
        for r in records:
            root = r.nodes[0]
            graded = [n for n in r.nodes if n.terminal_reason == "answer"]
            # Terminal-guided: only graded answers reach the root, each as +1 or -1; failures stay local.
            assert root.visits == len(graded)
            assert root.value_sum == sum(1 if n.correct else -1 for n in graded)
            for n in graded:
                assert n.correct == grader.grade(n.text, r.answer).equal
            for n in r.nodes[1:]:
                if n.terminal_reason in ("exec_error", "no_stop", "max_depth"):
                    assert (n.visits, n.value_sum) == (1, -1.0)
                if n.depth > SMALL["max_depth"] and n.terminal_reason not in ("max_depth", "answer"):
                    pytest.fail("a step beyond the depth limit must be terminal")
            assert r.stats["rollouts"] <= config.rollouts
    code_closers = [n for r in records for n in r.nodes if "<end_of_code>" in n.text and n.terminal_reason is None]
    assert all("<output>" in n.text and n.text.endswith("<end_of_output>\n") for n in code_closers)
    for name in ("sft", "pairs", "pqm", "orm", "buckets"):
        assert os.path.exists(out / "extracted" / f"{name}.jsonl")
    _check_extracted(out, models["problems"], records)


def _check_scores_are_whole_text_scores(ppm_dir, records):
    """Every node's PPM value is the score of its whole context (prompt + path), as if scored alone: the
    search scored children on their parents' stored keys/values."""
    whole = load_scorer(ppm_dir, SearchConfig().max_context_tokens, cache_mib=0)
    for r in records:
        context = {0: r.prompt}
        for n in r.nodes[1:]:
            context[n.id] = context[n.parent] + n.text
        nodes = r.nodes[1:]
        np.testing.assert_allclose([n.init_value for n in nodes], whole.score([context[n.id] for n in nodes]),
                                   atol=1e-5)
    assert max(n.depth for r in records for n in r.nodes) >= 2  # children of stored (not root) contexts


@pytest.fixture(scope="module")
def ppm_run(models, tmp_path_factory):
    """A PPM-augmented run of the search stage, with its collaborators' calls recorded: (out dir, stats,
    calls), calls one list per expansion (`_expand_leaves`) of (what, detail) in call order."""
    from rstar_jax.sampling import Sampler
    from rstar_jax.search.driver import SearchDriver
    from rstar_jax.search.scoring import Scorer
    from rstar_jax.verify.sandbox import Sandbox
    calls, inside = [], []

    def record(mp, owner, name, what, detail):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if inside:  # only calls made by an expansion (not, e.g., the extraction's grading)
                calls[-1].append((what, detail(*args, **kwargs)))
            return original(*args, **kwargs)
        mp.setattr(owner, name, wrapper)

    def expand_leaves(self, tree, leaf, slots):
        calls.append([("leaves", int((leaf >= 0).sum()))])
        inside.append(True)
        try:
            return expand(self, tree, leaf, slots)
        finally:
            inside.pop()

    out = tmp_path_factory.mktemp("ppm")
    expand = SearchDriver._expand_leaves
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SearchDriver, "_expand_leaves", expand_leaves)
        # detail: prompts | - | programs | answers | [[step texts]] per leaf | {slot: [(kind, final text)]}
        record(mp, Sampler, "generate", "generate", lambda self, prompts, *a, **k: len(prompts))
        record(mp, steps, "candidate_steps", "candidates", lambda samples, **k: None)
        record(mp, Sandbox, "run", "execute", lambda self, programs, *a, **k: len(programs))
        record(mp, Grader, "grade_batch", "grade", lambda self, pairs: len(pairs))
        record(mp, Scorer, "score_children", "score", lambda self, contexts, texts, **k: [list(t) for t in texts])
        record(mp, SearchDriver, "_insert", "insert",
               lambda self, tree, leaf, cands, *a: {i: [(c.kind, c.text) for c in cs] for i, cs in cands.items()})
        stats = run_search(SearchConfig(mode="ppm", **SMALL), models["problems"][:2], models["policy"], models["ppm"],
                           str(out), extract_config=ExtractConfig(), progress=lambda s: None)
    return out, stats, calls


def test_ppm_augmented_and_inference_modes(models, ppm_run, tmp_path):
    out, ppm, _ = ppm_run
    assert ppm["seconds"]["score"] > 0
    _check_extracted(out, models["problems"], _records(out / "trees.jsonl"))
    _check_scores_are_whole_text_scores(models["ppm"], _records(out / "trees.jsonl"))
    for r in _records(out / "trees.jsonl"):
        for n in r.nodes[1:]:
            assert n.init_value is not None and -1 <= n.init_value <= 1
            if n.terminal_reason is None:  # one local update with the PPM score (more if it was expanded)
                assert n.visits >= 1
    run_search(SearchConfig(mode="inference", runs=2, **SMALL), models["problems"][:1], models["policy"],
               models["ppm"], str(tmp_path / "inf"), progress=lambda s: None)
    records = _records(tmp_path / "inf" / "trees.jsonl")
    assert sorted((r.problem_id, r.seed) for r in records) == sorted(
        (p["id"], s) for p in models["problems"][:1] for s in (0, 1))
    for r in records:
        for n in r.nodes:
            if n.terminal_reason == "answer":  # the PPM's score of the answer is what was backed up
                assert n.visits == 1 and n.value_sum == pytest.approx(n.init_value, abs=1e-6)


def test_each_expansion_batches_its_calls_in_the_loop_order(ppm_run):
    """Per lock-step iteration, every live tree's leaf goes through one sampler call, candidate filtering, then
    one sandbox call for all code candidates, one grader call for all answers, one PPM call for all new
    children (which sees the executed outputs), and last one insert + backup: the batching the speed relies on."""
    _, _, calls = ppm_run
    assert len(calls) > 1
    for number, (head, *made) in enumerate(calls):
        assert head[0] == "leaves"
        leaves = head[1]
        for what in ("generate", "execute", "grade", "score", "insert"):
            assert [w for w, _ in made].count(what) <= 1, (number, made)
        detail = dict(made)
        children = detail["insert"]  # {slot: [(kind, final text)]}
        code = sum(kind == steps.CODE for cs in children.values() for kind, _ in cs)
        answers = sum(kind == steps.ANSWER_STEP for cs in children.values() for kind, _ in cs)
        order = [w for w, d in made if not (w in ("execute", "grade") and d == 0)]  # empty batches may be skipped
        assert order == ["generate"] + ["candidates"] * leaves + ["execute"] * (code > 0) + ["grade"] * (answers > 0) \
            + ["score", "insert"], (number, made)
        # All leaves in the one sampler call (none is near the context limit, where `step_budgets` splits).
        assert detail["generate"] == leaves == len(children)
        assert detail.get("execute", 0) == code and detail.get("grade", 0) == answers
        assert detail["score"] == [[text for _, text in cs] for cs in children.values()]  # outputs appended
    assert max(head[1] for head, *_ in calls) == SMALL["batch_size"], "no iteration batched two trees"
    made = [(w, d) for _, *rest in calls for w, d in rest]
    assert any(w == "execute" for w, _ in made) and any(w == "grade" and d for w, d in made)
    assert any("<output>" in text for w, d in made if w == "score" for texts in d for text in texts)


_STATUS = re.compile(r"search: (\d+)/(\d+) problems, ([\d.]+) rollouts/s, (\d+)s(, ETA \d+s)?; time split: "
                     r"tree ([\d.]+)%, generate ([\d.]+)%, execute ([\d.]+)%, grade ([\d.]+)%, score ([\d.]+)% "
                     r"\(\+ tree compile ([\d.]+)s\)")


def test_the_progress_line_reports_problems_rate_and_time_split(terminal_run):
    """The progress line a user watches: problems done / total (with an ETA while some are done), rollouts/s,
    and the time split between tree kernels, generate, execute, grade and score, the run's own numbers."""
    _, stats, lines = terminal_run
    parsed = []
    for line in lines:
        match = _STATUS.fullmatch(line)
        assert match, line
        parsed.append(match.groups())
    done = [int(p[0]) for p in parsed]
    assert {int(p[1]) for p in parsed} == {4} and done == sorted(done) and done[-1] == 4
    assert all(bool(p[4]) == (0 < int(p[0]) < 4) for p in parsed)  # an ETA once a problem is done, until the end
    assert any(p[4] for p in parsed), "no progress line while the search was partly done"
    last = parsed[-1]
    assert float(last[2]) == pytest.approx(stats["rollouts"] / stats["wall_s"], rel=0.02, abs=0.01)
    assert abs(int(last[3]) - stats["wall_s"]) <= 1
    seconds = stats["seconds"]
    busy = sum(seconds.get(k, 0.0) for k in ("tree", "generate", "execute", "grade", "score"))
    split = dict(zip(("tree", "generate", "execute", "grade", "score"), map(float, last[5:10])))
    for phase, percent in split.items():
        assert percent == pytest.approx(100 * seconds.get(phase, 0.0) / busy, abs=0.06), phase
    assert sum(split.values()) == pytest.approx(100, abs=0.3)
    assert split["score"] == 0 and min(split["generate"], split["execute"], split["tree"]) > 0  # terminal: no PPM
    assert float(last[10]) == pytest.approx(seconds["compile"], abs=0.06)


def test_problems_still_unsolved_get_the_extra_rollouts(models, tmp_path):
    config = SearchConfig(mode="terminal", **{**SMALL, "rollouts": 2, "max_rollouts_unsolved": 4})
    impossible = {**models["problems"][0], "id": "impossible", "answer": "-987654321"}
    run_search(config, [impossible, models["problems"][1]], models["policy"], None, str(tmp_path),
               progress=lambda s: None)
    records = {r.problem_id: r for r in _records(tmp_path / "trees.jsonl")}
    never = records["impossible"]
    assert never.nodes[0].terminal_reason is None, "the root should stay expandable for the test to mean anything"
    assert never.stats["rollouts"] == 4  # unsolved: up to max_rollouts_unsolved
    for r in records.values():
        unsolved_and_live = not any(n.correct for n in r.nodes) and r.nodes[0].terminal_reason is None
        assert r.stats["rollouts"] == 4 if unsolved_and_live else r.stats["rollouts"] <= 4


def test_resume_after_sigkill_matches_an_uninterrupted_run(models, terminal_run, tmp_path):
    flags = [f"--{k}={v}" for k, v in SMALL.items()] + [
        f"--policy={models['policy']}", f"--problems={models['problems_file']}", "--progress_every_s=1000"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "experiments.search", *flags]

    def run(out, kill_after_records=None):
        proc = subprocess.Popen(cmd + [f"--out={out}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if kill_after_records is not None:
            trees = os.path.join(out, "trees.jsonl")
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if os.path.exists(trees) and sum(1 for _ in open(trees)) >= kill_after_records:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.05)
        output = proc.communicate(timeout=600)[0]
        return proc.returncode, output

    killed_dir = str(tmp_path / "killed")
    code, output = run(killed_dir, kill_after_records=1)
    assert code == -signal.SIGKILL, f"the run ended before it could be killed:\n{output}"
    with open(os.path.join(killed_dir, "trees.jsonl"), "a") as f:
        f.write('{"problem_id": "mini/0", "prompt": "cut sho')  # a record cut short by the kill
    code, output = run(killed_dir)
    assert code == 0, output
    assert "resuming:" in output

    def load(d):
        with open(os.path.join(d, "trees.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        return {(r["problem_id"], r["seed"]): r for r in lines}, len(lines)

    resumed, n_resumed = load(killed_dir)
    whole, _ = load(str(terminal_run[0]))  # the same command, uninterrupted (in process)
    assert n_resumed == len(resumed) == 4, "a search was lost or written twice"
    assert resumed == whole
    with open(os.path.join(killed_dir, "extracted", "sft.jsonl")) as a, \
            open(os.path.join(str(terminal_run[0]), "extracted", "sft.jsonl")) as b:
        assert sorted(a) == sorted(b)


def _as_processes(monkeypatch, count, work):
    """`work()` on `count` threads, each one of `count` JAX processes to run_search (jax.process_index/count
    patched per thread; its barriers, sync_global_devices, a threading barrier). Returns their results."""
    import jax
    from jax.experimental import multihost_utils
    local, barrier, errors = threading.local(), threading.Barrier(count), []
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(jax, "process_index", lambda: getattr(local, "index", 0))
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: barrier.wait(timeout=600))
    results = [None] * count

    def process(i):
        local.index = i
        try:
            results[i] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_a_rerun_at_another_process_count_searches_only_what_is_missing(models, terminal_run, tmp_path,
                                                                        monkeypatch):
    """1 process (killed) -> 2 processes -> 1 process on one output directory: each rerun searches only the
    problems in no file yet, split among its processes, and extraction over all files sees each problem once."""
    whole = {r["problem_id"]: r for r in _jsonl(terminal_run[0] / "trees.jsonl")}
    problems, config = models["problems"], SearchConfig(mode="terminal", **SMALL)
    ids = [p["id"] for p in problems]
    out = tmp_path / "trees"
    out.mkdir()
    torn = '{"problem_id": "' + ids[3] + '", "prompt": "cut sho'  # a record cut short by a kill
    # A one-process run killed after its first tree.
    shutil.copy(terminal_run[0] / "trees.config.json", out / "trees.config.json")
    (out / "trees.jsonl").write_text(json.dumps(whole[ids[0]]) + "\n" + torn)

    two = _as_processes(monkeypatch, 2, lambda: run_search(config, problems[:3], models["policy"], None, str(out),
                                                           progress=lambda s: None))
    assert sorted(s["searched"] for s in two) == [1, 1]
    per_process = [[r["problem_id"] for r in _jsonl(out / f"trees.process_{i}.jsonl")] for i in range(2)]
    assert sorted(per_process) == [[ids[1]], [ids[2]]]  # the two left, one each; problem 0 not again
    assert (out / "trees.jsonl").read_text() == json.dumps(whole[ids[0]]) + "\n"  # its torn line cut
    monkeypatch.undo()

    with open(out / "trees.process_1.jsonl", "a") as f:  # the two-process run killed mid-record
        f.write(torn)
    stats = run_search(config, problems, models["policy"], None, str(out), extract_config=ExtractConfig(),
                       progress=lambda s: None)
    assert stats["searched"] == 1  # only problem 3: in none of the files
    assert [r["problem_id"] for r in _jsonl(out / "trees.jsonl")] == [ids[0], ids[3]]
    assert [r["problem_id"] for r in _jsonl(out / "trees.process_1.jsonl")] == per_process[1]
    records = [r for path in sorted(out.glob("trees*.jsonl")) for r in _jsonl(path)]
    assert sorted(r["problem_id"] for r in records) == sorted(ids)
    assert all(r == whole[r["problem_id"]] for r in records)  # the trees of an uninterrupted one-process run
    _check_extracted(out, problems, [TreeRecord.from_dict(r) for r in records])
    assert still_to_search(config, problems, str(out), "trees.process_0.jsonl")[0] == []


def test_other_processes_files_with_other_settings_are_refused_by_name(tmp_path):
    config, other = SearchConfig(rollouts=3), SearchConfig(rollouts=4)
    theirs = tmp_path / "trees.process_1.jsonl"
    theirs.write_text(json.dumps({"problem_id": "a", "seed": 0, "config_digest": other.digest()}) + "\n")
    pin_settings(str(theirs), other)
    with pytest.raises(ResumeError, match=r"trees.process_1.jsonl holds trees searched with other settings"):
        still_to_search(config, [{"id": "a"}], str(tmp_path), "trees.jsonl")
    os.remove(tmp_path / "trees.process_1.config.json")
    with pytest.raises(ResumeError, match=r"trees.process_1.jsonl:1: written with search settings"):
        still_to_search(config, [{"id": "a"}], str(tmp_path), "trees.jsonl")
    assert not (tmp_path / "trees.config.json").exists(), "a refused run must not pin its settings"
    assert still_to_search(other, [{"id": "a"}, {"id": "b"}], str(tmp_path), "trees.jsonl") == (
        [{"id": "b"}], {("a", 0)})


def test_a_problem_in_two_tree_files_is_named_with_both(terminal_run, tmp_path):
    line = (terminal_run[0] / "trees.jsonl").read_text().splitlines(keepends=True)[0]
    pid = json.loads(line)["problem_id"]
    (tmp_path / "trees.process_0.jsonl").write_text(line)
    (tmp_path / "trees.process_1.jsonl").write_text(line)
    with pytest.raises(ValueError, match=rf"problem '{pid}': duplicate tree record in \S*trees.process_0.jsonl "
                                         rf"and \S*trees.process_1.jsonl"):
        extract_files(sorted(glob.glob(str(tmp_path / "trees*.jsonl"))))


def test_a_failed_execution_keeps_what_it_raised_on_its_node(models, tmp_path, monkeypatch):
    from rstar_jax.verify import sandbox as sb

    class EveryProgramFails(sb.Sandbox):
        def run(self, programs, timeout_s=None):
            return [dataclasses.replace(r, failed=True, error_type="ZeroDivisionError", error_message="division by zero")
                    for r in super().run(programs, timeout_s)]

    monkeypatch.setattr(sb, "Sandbox", EveryProgramFails)
    run_search(SearchConfig(mode="terminal", **{**SMALL, "rollouts": 2}), models["problems"][:1], models["policy"],
               None, str(tmp_path), extract_config=None, progress=lambda s: None)
    nodes = [n for r in _records(tmp_path / "trees.jsonl") for n in r.nodes]
    failed = [n for n in nodes if n.terminal_reason == "exec_error"]
    assert failed and all(n.error == "ZeroDivisionError: division by zero" for n in failed)
    assert all(n.error is None for n in nodes if n.terminal_reason != "exec_error")
    assert all("<output>" not in n.text for n in failed)


def test_a_prompt_prefix_is_seen_by_the_policy_alone(models, tmp_path, monkeypatch):
    """--prompt_prefix_file (a bootstrap model's instruction and examples): every policy input starts with it;
    the trees, and so the training data, hold the plain prompt; it is one of the settings that shape trees."""
    from rstar_jax.sampling import Sampler
    from rstar_jax.tokenizer import format_prompt
    prefix = "Solve with code, one step at a time.\n\n"
    seen, generate = [], Sampler.generate

    def spy(self, prompts, *args, **kwargs):
        seen.extend(self.decode_fn(list(ids)) for ids in prompts)
        return generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Sampler, "generate", spy)
    config = SearchConfig(mode="terminal", **{**SMALL, "rollouts": 2}, prompt_prefix=prefix)
    stats = run_search(config, models["problems"][:2], models["policy"], None, str(tmp_path),
                       extract_config=ExtractConfig(), progress=lambda s: None)
    assert seen and all(text.startswith(prefix + "<|user|>:") for text in seen), seen[:2]
    records = _records(tmp_path / "trees.jsonl")
    assert [r.prompt for r in records] == [format_prompt(p["question"]) for p in models["problems"][:2]]
    assert all(not row["prompt"].startswith(prefix) for row in _jsonl(tmp_path / "extracted" / "sft.jsonl"))
    assert stats["searched"] == 2 and config.digest() != dataclasses.replace(config, prompt_prefix="").digest()
    with pytest.raises(ResumeError, match="prompt_prefix"):  # resuming without the prefix is refused
        pin_settings(str(tmp_path / "trees.jsonl"), dataclasses.replace(config, prompt_prefix=""))


def test_read_finished_cuts_a_torn_line_and_refuses_other_settings(tmp_path):
    path = tmp_path / "trees.jsonl"
    good = json.dumps({"problem_id": "a", "seed": 3, "config_digest": "d1"}) + "\n"
    path.write_text(good + '{"problem_id": "b", "se')
    assert read_finished(str(path), "d1") == {("a", 3)}
    assert path.read_text() == good
    with pytest.raises(ResumeError, match=r"trees.jsonl:1: written with search settings d1"):
        read_finished(str(path), "d2")
    path.write_text(good + "not json\n" + good)
    with pytest.raises(ResumeError, match=r"trees.jsonl:2: not a JSON tree record"):
        read_finished(str(path), "d1")


def test_search_settings_are_saved_with_the_trees_and_other_settings_refused_by_name(tmp_path):
    trees = str(tmp_path / "trees.process_1.jsonl")
    pin_settings(trees, SearchConfig(rollouts=5))
    pin_settings(trees, SearchConfig(rollouts=3, batch_size=4))  # no tree yet (a failed start): replaced
    saved = json.loads((tmp_path / "trees.process_1.config.json").read_text())
    assert saved["rollouts"] == 3 and "batch_size" not in saved
    (tmp_path / "trees.process_1.jsonl").write_text('{"problem_id": "a", "seed": 0}\n')
    pin_settings(trees, SearchConfig(rollouts=3, batch_size=64))  # lock-step batch: the same trees
    with pytest.raises(ResumeError, match=r"(?s)other settings .*rollouts: saved 3, now 4\n  temperature: saved 1.0, now 0.7"):
        pin_settings(trees, SearchConfig(rollouts=4, temperature=0.7))


def test_candidate_rules():
    samples = [("x = 1\n<end_of_step>", "stop"), (" x = 1\n<end_of_step>", "stop"), ("y = 2", "length"),
               ("# z\n<end_of_code>", "stop")]
    kinds = [(c.text, c.kind) for c in steps.candidate_steps(samples, dedupe=True, answer_first=True)]
    assert kinds == [("x = 1\n<end_of_step>", steps.CODE), ("y = 2", steps.NO_STOP),
                     ("# z\n<end_of_code>", steps.CODE)]
    assert len(steps.candidate_steps(samples, dedupe=False, answer_first=True)) == 4
    answers = samples + [("<answer>\\boxed{3}<end_of_answer>", "stop"), ("<answer>\\boxed{4}<end_of_answer>", "stop")]
    only = steps.candidate_steps(answers, dedupe=True, answer_first=True)
    assert [(c.text, c.kind) for c in only] == [("<answer>\\boxed{3}<end_of_answer>", steps.ANSWER_STEP)]
    assert len(steps.candidate_steps(answers, dedupe=True, answer_first=False)) == 5


def test_stream_ids_depend_on_the_tree_and_node_only():
    assert stream_id("p", 0, 5) == stream_id("p", 0, 5)
    assert len({stream_id("p", 0, 5), stream_id("p", 1, 5), stream_id("q", 0, 5), stream_id("p", 0, 6)}) == 4
    assert 0 <= stream_id("p" * 100, 2**31, 10**6) < 2**32 - 1


def test_step_budgets_shrink_near_the_context_limit_per_row():
    groups = step_budgets({0: 100, 1: 4000, 2: 4090, 3: 3000}, max_step_tokens=2048, max_context_tokens=4096)
    assert groups == {2048: [0], 64: [1], 4: [2], 1024: [3]}


def test_search_on_a_device_mesh_matches_one_device(models, terminal_run, tmp_path):
    """Policy sharded over data x tensor (4 of the 8 fake devices): the same trees as on one device."""
    out, _, _ = terminal_run
    run_search(SearchConfig(mode="terminal", **SMALL), models["problems"][:2], models["policy"], None, str(tmp_path),
               progress=lambda s: None, mesh_shape=(2, 1, 2))
    one = {r.problem_id: r.to_dict() for r in _records(out / "trees.jsonl")}
    for r in _records(tmp_path / "trees.jsonl"):
        assert r.to_dict() == one[r.problem_id]


def test_policy_store_gives_the_trees_of_whole_prefills(models, terminal_run, tmp_path):
    """Expansions prefilling only a leaf's step on its parent's stored policy keys/values (the default) sample
    exactly what prefilling the leaf's whole prompt and path samples."""
    out, stats, _ = terminal_run
    assert stats["stores"]["policy"]["hits"] > stats["stores"]["policy"]["misses"] > 0
    whole = run_search(SearchConfig(mode="terminal", **SMALL), models["problems"][:2], models["policy"], None,
                       str(tmp_path), progress=lambda s: None, policy_cache_mib=0)
    assert "policy" not in whole["stores"]
    stored = {r.problem_id: r.to_dict() for r in _records(out / "trees.jsonl")}
    records = _records(tmp_path / "trees.jsonl")
    assert max(n.depth for r in records for n in r.nodes) >= 3  # expansions of stored (not root) contexts
    for r in records:
        assert r.to_dict() == stored[r.problem_id]


def test_ppm_search_on_a_device_mesh_scores_whole_texts(models, tmp_path):
    """Policy and PPM sharded over data x tensor: the stored keys/values (host arrays) feed the sharded PPM."""
    run_search(SearchConfig(mode="ppm", **SMALL), models["problems"][2:3], models["policy"], models["ppm"],
               str(tmp_path), progress=lambda s: None, mesh_shape=(2, 1, 2))
    _check_scores_are_whole_text_scores(models["ppm"], _records(tmp_path / "trees.jsonl"))


def test_a_profiler_window_traces_the_annotated_phases(models, tmp_path):
    run_search(SearchConfig(mode="terminal", **SMALL), models["problems"][:1], models["policy"], None, str(tmp_path),
               progress=lambda s: None, profile=(1, 2))
    traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
    assert len(traces) == 1
    data = open(traces[0], "rb").read()
    for phase in ("select", "generate", "execute", "backup"):
        assert f"search/{phase}".encode() in data, phase
