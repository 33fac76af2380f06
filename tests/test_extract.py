"""Tree records (typed view, validation, JSONL reading) and the extraction of SFT / pairs / ablation data.

Every expected output below is computed by hand from the small trees built here.
"""
import copy
import json
import logging
import os
import random
import time

import pytest

from rstar_jax.search.extract import (
    ExtractConfig, bounded_levenshtein, difficulty, extract, extract_files, final_answer_pairs, step_pairs,
    subtree_outcomes, write_extracted)
from rstar_jax.search.tree_record import TreeRecord, TreeRecordError, q, read_tree_records

PROMPT = "<|user|>:\nWhat is 1+1?\n<|assistant|>: Let's think step by step and solve the problem with code."


def make_record(pid, nodes, *, mode="terminal", prompt=PROMPT):
    """A record dict from ``(parent, text, visits, value_sum, terminal_reason, correct)`` tuples (node 1 on);
    the root is added, depths are derived, answer nodes get ``final_answer``."""
    out = [dict(id=0, parent=-1, depth=0, text="", visits=sum(n[2] for n in nodes if n[0] == 0),
                value_sum=0.0, init_value=None, terminal_reason=None, final_answer=None, correct=None)]
    for i, (parent, text, visits, value_sum, reason, correct) in enumerate(nodes, start=1):
        out.append(dict(id=i, parent=parent, depth=out[parent]["depth"] + 1, text=text, visits=visits,
                        value_sum=float(value_sum), init_value=None, terminal_reason=reason,
                        final_answer=("2" if correct else "3") if reason == "answer" else None, correct=correct))
    return {"problem_id": pid, "prompt": prompt, "answer": "2", "mode": mode, "config_digest": "abc123",
            "seed": 7, "nodes": out, "stats": {"rollouts": 4}}


def step(name):
    """A step text; different names give texts far apart in edit distance."""
    return f"<code>\n# Step 1: {name} {name.upper()} {name[::-1]} {name * 3}\nx = {len(name)}\n<end_of_step>"


def answer(name):
    return f"<answer>The answer is {name} \\boxed{{{name}}}<end_of_answer>"


# Tree "top": SFT top-2 with both tie-breaks and the exec-error exclusion.
#   traj leaf 2: Q [0.5, 1.0]  mean .75 min .5
#   traj leaf 4: Q [1.0, 0.5]  mean .75 min .5  (ties leaf 2 on mean and min: lower id, leaf 2, wins)
#   traj leaf 6: Q [.75, .75]  mean .75 min .75 (ties on mean, wins on min)
#   traj leaf 8: Q [1.0, 1.0]  mean 1, but node 7 failed to execute -> skipped
#   traj leaf 9: wrong answer
TOP = make_record("top", [
    (0, step("alpha"), 2, 1, None, None),         # 1  Q .5
    (1, answer("a"), 1, 1, "answer", True),       # 2  Q 1
    (0, step("bravo"), 1, 1, None, None),         # 3  Q 1
    (3, answer("b"), 2, 1, "answer", True),       # 4  Q .5
    (0, step("charlie"), 4, 3, None, None),       # 5  Q .75
    (5, answer("c"), 4, 3, "answer", True),       # 6  Q .75
    (0, step("delta"), 1, 1, "exec_error", None),  # 7  Q 1
    (7, answer("d"), 1, 1, "answer", True),       # 8  Q 1
    (0, answer("wrong"), 1, -1, "answer", False),  # 9  Q -1
])

# Tree "pairs": step-level pair selection at the root, and the final-answer trajectory pairs.
NEAR = "<code>\n# Step 1: compute the value of x carefully\nx = 2\n<end_of_step>"
PAIRS = make_record("pairs", [
    (0, step("poshigh"), 10, 9, None, None),      # 1  Q .9   leads correct (10)
    (0, NEAR, 5, 1, None, None),                  # 2  Q .2   leads correct (11)
    (0, step("poslow"), 2, 0, None, None),        # 3  Q 0    leads correct (12): third, not selected
    (0, step("neglow"), 5, -1, None, None),       # 4  Q -.2  leads wrong (13)
    (0, step("negmid"), 10, 1, None, None),       # 5  Q .1   leads wrong (14): third, not selected
    (0, step("mixed"), 10, -9, None, None),       # 6  Q -.9  leads correct (15) and wrong (16): a positive
    (0, step("deadend"), 1, -1, "max_depth", None),  # 7  Q -1 leads nowhere: neither side
    (0, NEAR.replace("x = 2", "x = 3"), 1, -1, "exec_error", None),  # 8  Q -1 wrong: lowest negative
    (1, answer("10"), 1, 1, "answer", True),      # 9  Q 1
    (2, answer("11"), 1, 1, "answer", True),      # 10 Q 1
    (3, answer("12"), 1, 1, "answer", True),      # 11 Q 1
    (4, answer("13"), 1, -1, "answer", False),    # 12 Q -1
    (5, answer("14"), 1, -1, "answer", False),    # 13 Q -1
    (6, answer("15"), 1, 1, "answer", True),      # 14 Q 1
    (6, answer("16"), 1, -1, "answer", False),    # 15 Q -1
])


def rec(d):
    return TreeRecord.from_dict(copy.deepcopy(d))


# --- tree record ---------------------------------------------------------------------------------------------

def test_record_round_trip_is_exact_and_keeps_unknown_fields():
    d = copy.deepcopy(PAIRS)
    d["host"] = 3
    d["nodes"][4]["tokens"] = 17
    d["nodes"][4]["init_value"] = 0.25
    d["nodes"][8]["error"] = "ValueError: x"  # optional, on exec_error nodes only
    r = TreeRecord.from_dict(d)
    assert r.to_dict() == d
    assert json.loads(r.to_json()) == d
    assert r.nodes[4].extra == {"tokens": 17} and r.extra == {"host": 3}
    assert r.nodes[8].error == "ValueError: x" and r.nodes[8].extra == {} and r.nodes[7].error is None
    assert TreeRecord.from_dict(json.loads(r.to_json())) == r


def test_record_helpers():
    r = rec(PAIRS)
    assert [n.id for n in r.children(0)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [n.id for n in r.children(6)] == [14, 15]
    assert r.children(9) == []
    assert [n.id for n in r.path(14)] == [6, 14]
    assert [n.id for n in r.path(14, include_root=True)] == [0, 6, 14]
    assert r.path_text(14) == step("mixed") + answer("15")
    assert q(r.nodes[1]) == pytest.approx(0.9) and r.q(6) == pytest.approx(-0.9)
    unvisited = rec(make_record("u", [(0, step("x"), 0, 0, None, None)]))
    assert unvisited.q(1) == 0.0
    trajectories = r.trajectories()
    assert [t.leaf.id for t in trajectories] == [9, 10, 11, 12, 13, 14, 15]
    t = trajectories[0]
    assert t.response == step("poshigh") + answer("10")
    assert t.mean_q == pytest.approx(0.95) and t.min_q == pytest.approx(0.9) and t.correct is True


def _set(path, value):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return mutate


@pytest.mark.parametrize("mutate, node_id, field", [
    (_set(["problem_id"], ""), None, "problem_id"),
    (_set(["mode"], "mcts"), None, "mode"),
    (_set(["seed"], True), None, "seed"),
    (_set(["stats"], KeyError), None, "stats"),
    (_set(["nodes"], []), None, "nodes"),
    (_set(["nodes", 3, "visits"], KeyError), 3, "visits"),
    (_set(["nodes", 3, "visits"], -1), 3, "visits"),
    (_set(["nodes", 3, "visits"], 1.5), 3, "visits"),
    (_set(["nodes", 3, "id"], 4), 3, "id"),
    (_set(["nodes", 3, "parent"], 3), 3, "parent"),
    (_set(["nodes", 3, "depth"], 2), 3, "depth"),
    (_set(["nodes", 0, "parent"], 0), 0, "parent"),
    (_set(["nodes", 0, "text"], "x"), 0, "text"),
    (_set(["nodes", 3, "value_sum"], float("nan")), 3, "value_sum"),
    (_set(["nodes", 3, "value_sum"], "1"), 3, "value_sum"),
    (_set(["nodes", 3, "init_value"], float("inf")), 3, "init_value"),
    (_set(["nodes", 3, "terminal_reason"], "timeout"), 3, "terminal_reason"),
    (_set(["nodes", 3, "correct"], True), 3, "correct"),  # not an answer node
    (_set(["nodes", 3, "error"], "ValueError: x"), 3, "error"),  # not an exec_error node
    (_set(["nodes", 8, "error"], 7), 8, "error"),
    (_set(["nodes", 9, "correct"], 1), 9, "correct"),
    (_set(["nodes", 9, "final_answer"], 2), 9, "final_answer"),
    (_set(["nodes", 3, "text"], None), 3, "text"),
    (_set(["nodes", 12, "parent"], 9), 12, "parent"),  # 9 is an answer node: a leaf
])
def test_validation_errors_name_problem_node_and_field(mutate, node_id, field):
    d = copy.deepcopy(PAIRS)
    mutate(d)
    with pytest.raises(TreeRecordError) as e:
        TreeRecord.from_dict(d)
    assert e.value.field == field and e.value.node_id == node_id
    if field != "problem_id":
        assert e.value.problem_id == "pairs" and "problem 'pairs'" in str(e.value)
    if node_id is not None:
        assert f"node {node_id}" in str(e.value)
    assert repr(field) in str(e.value)


def _write(path, lines, *, final_newline=True):
    with open(path, "wb") as f:
        f.write(b"\n".join(line.encode() if isinstance(line, str) else line for line in lines))
        if final_newline:
            f.write(b"\n")
    return path


def test_read_skips_a_truncated_last_line_with_a_warning(tmp_path, caplog):
    lines = [json.dumps(TOP), json.dumps(PAIRS)]
    path = _write(tmp_path / "trees.jsonl", lines + [json.dumps(TOP)[:57]], final_newline=False)
    with caplog.at_level(logging.WARNING):
        records = list(read_tree_records(path))
    assert [r.problem_id for r in records] == ["top", "pairs"]
    assert "trees.jsonl:3: skipping a truncated last line" in caplog.text
    # A complete last line without its newline is a record.
    path = _write(tmp_path / "whole.jsonl", lines, final_newline=False)
    assert [r.problem_id for r in read_tree_records(path)] == ["top", "pairs"]


@pytest.mark.parametrize("lines, final_newline, where", [
    ([json.dumps(TOP), json.dumps(TOP)[:57], json.dumps(PAIRS)], True, ":2: malformed JSON"),  # middle
    ([json.dumps(TOP), json.dumps(TOP)[:57]], True, ":2: malformed JSON"),  # cut, yet a newline follows
    ([json.dumps(TOP), b"\xff{}"], True, ":2: not UTF-8"),
    ([json.dumps(TOP), json.dumps({**PAIRS, "mode": "x"})], False, ":2: problem 'pairs': field 'mode'"),
])
def test_read_errors_carry_file_and_line(tmp_path, lines, final_newline, where):
    path = _write(tmp_path / "trees.jsonl", lines, final_newline=final_newline)
    with pytest.raises(TreeRecordError) as e:
        list(read_tree_records(path))
    assert f"trees.jsonl{where}" in str(e.value)


def test_read_reports_the_node_of_a_bad_record(tmp_path):
    bad = copy.deepcopy(PAIRS)
    bad["nodes"][5]["visits"] = -3
    path = _write(tmp_path / "trees.jsonl", ["", json.dumps(TOP), json.dumps(bad)])
    with pytest.raises(TreeRecordError) as e:
        list(read_tree_records(path))
    assert e.value.line == 3 and e.value.node_id == 5 and e.value.field == "visits"
    assert str(e.value).startswith(f"{path}:3: problem 'pairs': node 5: field 'visits': ")


# --- bounded edit distance ------------------------------------------------------------------------------------

def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_bounded_levenshtein_matches_the_full_dp():
    rng = random.Random(1234)
    for _ in range(1500):
        alphabet = rng.choice(["ab", "abc", "abcdefgh"])
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        if rng.random() < 0.5:  # near-copies: the band and the prefix / suffix stripping matter
            b = list(a)
            for _ in range(rng.randint(0, 6)):
                pos = rng.randint(0, len(b))
                op = rng.choice("ids")
                if op == "i":
                    b.insert(pos, rng.choice(alphabet))
                elif b and pos < len(b):
                    if op == "d":
                        del b[pos]
                    else:
                        b[pos] = rng.choice(alphabet)
            b = "".join(b)
        else:
            b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        d = levenshtein(a, b)
        for bound in (0, 1, 2, 3, 5, 8, 13, 20, 40):
            assert bounded_levenshtein(a, b, bound) == min(d, bound), (a, b, bound)


def test_bounded_levenshtein_is_fast_on_long_texts():
    rng = random.Random(0)
    a = "".join(rng.choice("abcdefghij \n") for _ in range(20000))
    b = "".join(rng.choice("abcdefghij \n") for _ in range(20000))
    near = a[:9000] + "xyz" + a[9003:15000] + a[15001:]
    start = time.perf_counter()
    assert bounded_levenshtein(a, b, 20) == 20
    assert bounded_levenshtein(near, a, 20) == 4
    assert bounded_levenshtein(a, a + "q" * 30, 20) == 20
    assert time.perf_counter() - start < 1.0


# --- SFT and buckets ------------------------------------------------------------------------------------------

def test_sft_top2_with_tie_breaks_and_exec_error_exclusion():
    out = extract([TOP])
    assert out.sft == [
        {"id": "top/sft0", "prompt": PROMPT, "response": step("charlie") + answer("c")},  # wins on min Q
        {"id": "top/sft1", "prompt": PROMPT, "response": step("alpha") + answer("a")},  # lower id than leaf 4
    ]
    assert out.stats["sft"] == {"examples": 2, "problems": 1, "correct_trajectories": 3, "skipped_exec_error": 1}
    # Make leaf 4's trajectory win on min Q over leaf 2's: Q [.5, 1] -> [.75, .75] keeps mean .75.
    d = copy.deepcopy(TOP)
    d["nodes"][3].update(visits=4, value_sum=3.0)
    d["nodes"][4].update(visits=4, value_sum=3.0)
    d["nodes"][5].update(visits=1, value_sum=0.0)  # charlie now mean .5
    responses = [row["response"] for row in extract([d]).sft]
    assert responses == [step("bravo") + answer("b"), step("alpha") + answer("a")]
    assert [row["id"] for row in extract([TOP], ExtractConfig(sft_per_problem=1)).sft] == ["top/sft0"]


def test_sft_skips_duplicate_responses():
    d = make_record("dup", [
        (0, "A", 2, 2, None, None), (1, "B", 1, 1, "answer", True),
        (0, "AB", 1, 1, "answer", True),  # the same response as 1 -> 2 (a later id): a duplicate
        (0, "C", 2, 1, None, None), (4, "D", 1, 1, "answer", True),
    ])
    out = extract([d])
    assert [row["response"] for row in out.sft] == ["AB", "CD"]
    assert [row["response"] for row in out.sft_rejection] == ["AB", "CD"]


def test_buckets_and_coverage():
    easy = make_record("easy", [(0, answer("2"), 1, 1, "answer", True), (0, answer("2 "), 1, 1, "answer", True)])
    medium = copy.deepcopy(TOP)
    medium["problem_id"] = "medium"
    hard = make_record("hard", [(0, step("x"), 1, -1, None, None), (1, answer("3"), 1, -1, "answer", False)])
    none = make_record("none", [(0, step("y"), 1, -1, "exec_error", None), (0, step("z"), 1, 0, "max_depth", None)])
    assert difficulty(rec(easy)) == ("easy", 2, 2)
    assert difficulty(rec(medium)) == ("medium", 5, 4)
    assert difficulty(rec(hard)) == ("hard", 1, 0)
    assert difficulty(rec(none)) == ("hard", 0, 0)
    out = extract([easy, medium, hard, none])
    assert out.buckets == [{"id": "easy", "bucket": "easy", "answers": 2, "correct": 2},
                           {"id": "medium", "bucket": "medium", "answers": 5, "correct": 4},
                           {"id": "hard", "bucket": "hard", "answers": 1, "correct": 0},
                           {"id": "none", "bucket": "hard", "answers": 0, "correct": 0}]
    s = out.stats
    assert s["problems"] == 4 and s["solved"] == 2 and s["solved_fraction"] == 0.5
    assert s["buckets"] == {"easy": 1, "medium": 1, "hard": 2}
    assert s["avg_answers_per_tree"] == 2.0 and s["avg_correct_answers_per_tree"] == 1.5


def test_duplicate_problem_ids_are_rejected():
    with pytest.raises(ValueError, match="problem 'top': duplicate"):
        extract([TOP, TOP])


# --- preference pairs -----------------------------------------------------------------------------------------

def test_subtree_outcomes():
    r = rec(PAIRS)
    has_correct, has_wrong = subtree_outcomes(r)
    assert [i for i, c in enumerate(has_correct) if c] == [0, 1, 2, 3, 6, 9, 10, 11, 14]
    assert [i for i, w in enumerate(has_wrong) if w] == [0, 4, 5, 6, 8, 12, 13, 15]
    _, has_wrong = subtree_outcomes(r, exec_error_is_negative=False)
    assert 8 not in [i for i, w in enumerate(has_wrong) if w]


def test_step_pairs_selection_counts_and_filters():
    # Positives (highest Q leading to a correct answer): 1 (.9), 2 (.2); not 3 (0) nor 6 (-.9, mixed subtree).
    # Negatives (lowest Q leading to a wrong answer only): 4 (-.2), 5 (.1): the exec error 8 (Q -1) only fills a
    # slot that steps leading to a wrong answer leave (below). Not 7 (leads nowhere).
    # (1,4) 1.1 kept; (1,5) .8 kept; (2,4) .4 and (2,5) .1 fail the margin.
    config = ExtractConfig()
    steps = step_pairs(rec(PAIRS), config)
    assert [(p["id"], round(p["margin"], 6)) for p in steps] == [("pairs/step0/1-4", 1.1), ("pairs/step0/1-5", 0.8)]
    assert step_pairs(rec(PAIRS), ExtractConfig(exec_error_is_negative=False)) == steps

    # Node 5's answer ungraded: 5 leads nowhere, and the exec error 8 takes the second negative slot.
    # (1,4) 1.1 kept; (1,8) 1.9 kept; (2,4) .4: dropped; (2,8) 1.2 but NEAR vs NEAR' is 1 edit apart: dropped.
    d = copy.deepcopy(PAIRS)
    d["nodes"][13]["correct"] = None
    out = extract([d], config)
    steps = [p for p in out.pairs if "/step" in p["id"]]
    assert [p["id"] for p in steps] == ["pairs/step0/1-4", "pairs/step0/1-8"]
    assert steps[1] == {"id": "pairs/step0/1-8", "prompt": PROMPT, "pos": step("poshigh"),
                        "neg": NEAR.replace("x = 2", "x = 3"), "pos_count": 2, "neg_count": 2,
                        "margin": pytest.approx(1.9)}
    assert steps[0]["margin"] == pytest.approx(1.1) and steps[0]["neg"] == step("neglow")
    assert out.stats["pairs"]["step"] == {"candidates": 4, "dropped_margin": 1, "dropped_edit_distance": 1,
                                          "kept": 2, "sites": 1}
    # Node 6's children are answer steps: compared as whole trajectories, never as a step pair.
    assert not any(p["id"].startswith("pairs/step6/") for p in out.pairs)
    # Exec errors not negative: 4 is the only negative; (2,4) fails the margin.
    assert [p["id"] for p in step_pairs(rec(d), ExtractConfig(exec_error_is_negative=False))] == ["pairs/step0/1-4"]
    # No filters: all four combinations.
    steps = step_pairs(rec(d), ExtractConfig(min_margin=-10, min_edit_distance=0))
    assert [p["id"] for p in steps] == ["pairs/step0/1-4", "pairs/step0/1-8", "pairs/step0/2-4", "pairs/step0/2-8"]
    # One per side.
    steps = step_pairs(rec(d), ExtractConfig(pairs_per_side=1))
    assert [(p["id"], p["pos_count"], p["neg_count"]) for p in steps] == [("pairs/step0/1-4", 1, 1)]


def test_step_pair_prompt_is_the_prefix_and_counts_are_before_filtering():
    # root -> 1 -> {2 (Q .5, correct below), 3 (Q -.5, wrong below)}: one positive, one negative.
    d = make_record("deep", [
        (0, step("first"), 4, 0, None, None),
        (1, step("rightway"), 2, 1, None, None), (1, step("wrongturn"), 2, -1, None, None),
        (2, answer("2"), 1, 1, "answer", True), (3, answer("3"), 1, -1, "answer", False),
    ])
    (pair,) = [p for p in extract([d]).pairs if "/step" in p["id"]]
    assert pair == {"id": "deep/step1/2-3", "prompt": PROMPT + step("first"), "pos": step("rightway"),
                    "neg": step("wrongturn"), "pos_count": 1, "neg_count": 1, "margin": 1.0}
    # Margin exactly at the threshold in floating point (0.7 - 0.2 < 0.5 in binary) is kept.
    d["nodes"][2].update(visits=10, value_sum=7.0)
    d["nodes"][3].update(visits=10, value_sum=2.0)
    (pair,) = step_pairs(rec(d), ExtractConfig())
    assert pair["margin"] < 0.5 and pair["margin"] == pytest.approx(0.5)
    d["nodes"][3].update(value_sum=2.5)
    out = extract([d])
    assert not [p for p in out.pairs if "/step" in p["id"]]
    assert out.stats["pairs"]["step"]["dropped_margin"] == 1


def test_final_answer_pairs_compare_whole_trajectories():
    # Correct trajectories (mean Q): leaf 9 (.95), 10 (.6), 11 (.5), 14 (.05) -> positives 9, 10.
    # Incorrect: leaf 12 (-.6), 13 (-.45), 15 (-.95) -> negatives 15, 12.
    pairs = final_answer_pairs(rec(PAIRS), ExtractConfig())
    r = rec(PAIRS)
    assert [(p["id"], round(p["margin"], 6)) for p in pairs] == [
        ("pairs/final/9-15", 1.9), ("pairs/final/9-12", 1.55), ("pairs/final/10-15", 1.55),
        ("pairs/final/10-12", 1.2)]
    assert pairs[0]["prompt"] == PROMPT
    assert pairs[0]["pos"] == r.path_text(9) and pairs[0]["neg"] == r.path_text(15)
    assert all(p["pos_count"] == 2 and p["neg_count"] == 2 for p in pairs)
    # Exec-error trajectories are never positives (TOP: leaf 8); the lone wrong answer is the negative.
    pairs = final_answer_pairs(rec(TOP), ExtractConfig(min_margin=0))
    assert [p["id"] for p in pairs] == ["top/final/6-9", "top/final/2-9"]
    assert [p["neg_count"] for p in pairs] == [1, 1]
    # Disabled by config; no pairs without both sides.
    assert not [p for p in extract([PAIRS], ExtractConfig(final_step_pairs=False)).pairs if "/final/" in p["id"]]
    easy = make_record("easy", [(0, answer("x"), 1, 1, "answer", True)])
    assert final_answer_pairs(rec(easy), ExtractConfig()) == []


def test_final_answer_pairs_edit_distance_filter():
    # Two trajectories one character apart: margin 2 passes, edit distance 1 does not.
    d = make_record("close", [(0, answer("2") + "x" * 30, 1, 1, "answer", True),
                              (0, answer("3") + "x" * 30, 1, -1, "answer", False)])
    out = extract([d])
    assert out.pairs == []
    assert out.stats["pairs"]["final"] == {"candidates": 1, "dropped_margin": 0, "dropped_edit_distance": 1,
                                           "kept": 0, "sites": 1}
    assert len(extract([d], ExtractConfig(min_edit_distance=1)).pairs) == 1


# --- ablation data ----------------------------------------------------------------------------------------------

def test_pqm_and_orm_rows():
    d = copy.deepcopy(TOP)
    d["nodes"].append(dict(id=10, parent=5, depth=2, text="unvisited", visits=0, value_sum=0.0, init_value=0.3,
                           terminal_reason=None, final_answer=None, correct=None))
    d["nodes"].append(dict(id=11, parent=1, depth=2, text=answer("u"), visits=1, value_sum=0.5, init_value=0.5,
                           terminal_reason="answer", final_answer="u", correct=None))  # ungraded
    out = extract([d])
    assert [row["id"] for row in out.pqm] == [f"top/n{i}" for i in range(1, 10)] + ["top/n11"]
    assert out.pqm[5] == {"id": "top/n6", "prompt": PROMPT, "response": step("charlie") + answer("c"), "q": 0.75}
    assert out.orm == [
        {"id": f"top/t{leaf}", "prompt": PROMPT, "response": rec(d).path_text(leaf), "correct": leaf != 9}
        for leaf in (2, 4, 6, 8, 9)]


def test_random_and_rejection_sft():
    nodes = []
    for i in range(6):  # six correct trajectories, one wrong, one with an exec error
        nodes += [(0, step(f"s{i}x"), 1, 1, None, None), (2 * i + 1, answer("2"), 1, 1, "answer", True)]
    nodes += [(0, answer("3"), 1, -1, "answer", False), (0, step("err"), 1, -1, "exec_error", None)]
    nodes += [(14, answer("2"), 1, 1, "answer", True)]
    d = make_record("many", nodes)
    correct = {step(f"s{i}x") + answer("2") for i in range(6)}
    out = extract([d], ExtractConfig(seed=3))
    assert [row["id"] for row in out.sft_random] == ["many/rand0", "many/rand1"]
    picked = [row["response"] for row in out.sft_random]
    assert len(set(picked)) == 2 and set(picked) <= correct
    # Deterministic, independent of record order, and the seed matters.
    other = make_record("other", [(0, answer("2"), 1, 1, "answer", True)])
    again = extract([other, d], ExtractConfig(seed=3))
    assert [row for row in again.sft_random if row["id"].startswith("many/")] == out.sft_random
    seeds = {tuple(row["response"] for row in extract([d], ExtractConfig(seed=s)).sft_random) for s in range(8)}
    assert len(seeds) > 1
    assert [row["response"] for row in out.sft_rejection] == [step(f"s{i}x") + answer("2") for i in range(6)]
    assert len(extract([d], ExtractConfig(rejection_per_problem=4)).sft_rejection) == 4
    assert len(extract([d], ExtractConfig(rejection_per_problem=None)).sft_rejection) == 6
    # One candidate: taken.
    assert [row["response"] for row in extract([other]).sft_random] == [answer("2")]


def test_config_validation():
    with pytest.raises(ValueError, match="pairs_per_side"):
        ExtractConfig(pairs_per_side=-1)
    with pytest.raises(ValueError, match="min_margin"):
        ExtractConfig(min_margin=float("nan"))
    with pytest.raises(ValueError, match="rejection_per_problem"):
        ExtractConfig(rejection_per_problem=1.5)


def test_write_extracted_and_extract_files(tmp_path):
    trees = _write(tmp_path / "trees.jsonl", [json.dumps(TOP), json.dumps(PAIRS)])
    out = extract_files([trees])
    assert out.sft == extract([TOP, PAIRS]).sft
    written = write_extracted(out, tmp_path / "out")
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == sorted(["sft.jsonl", "pairs.jsonl", "pqm.jsonl", "orm.jsonl", "sft_random.jsonl",
                            "sft_rejection.jsonl", "buckets.jsonl", "stats.json"])
    for name in ("sft", "pairs", "pqm", "orm", "sft_random", "sft_rejection", "buckets"):
        with open(written[name], encoding="utf-8") as f:
            assert [json.loads(line) for line in f] == getattr(out, name)
    with open(written["stats"], encoding="utf-8") as f:
        stats = json.load(f)
    assert stats["pairs"]["kept"] == len(out.pairs) and stats["config"]["min_margin"] == 0.5
    write_extracted(out, tmp_path / "out")  # overwriting is fine
    assert sorted(os.listdir(tmp_path / "out")) == names
