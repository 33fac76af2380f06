"""experiments.inspect / rstar_jax.search.render: one tree record as an HTML page and an SVG picture.

The fast tests use a small hand-built record (written and read back through `tree_record`, as the driver's
output is) with hostile step texts; a slow test renders a tree the real search wrote.
"""
import html
import html.parser
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from experiments.inspect import find_record, render
from rstar_jax.search import render as rd
from rstar_jax.search.tree_record import TreeRecord
from rstar_jax.tokenizer import format_prompt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What is 1 + 1? <b>not bold</b> & friends"
SCRIPT = "<script>alert(1)</script>"


ERROR = "ValueError: <b>x</b>"


def _node(i, parent, depth, text, visits, value_sum, reason=None, answer=None, correct=None, init=None, **extra):
    return {"id": i, "parent": parent, "depth": depth, "text": text, "visits": visits, "value_sum": value_sum,
            "init_value": init, "terminal_reason": reason, "final_answer": answer, "correct": correct, **extra}


def tree_dict(mode="terminal", ppm=None):
    """Terminal-guided values: answers back up +-1 along their path, the failure stays local.
    ppm: optional {node id: PPM score} (the search's init_value)."""
    nodes = [
        _node(0, -1, 0, "", 3, 1.0),
        _node(1, 0, 1, "<code>\n# Step 1: set x\nx = 2\n<end_of_step>", 2, 2.0),
        _node(2, 0, 1, "<code>\n# Step 1: guess </pre><b>bold</b>\nx = 3\n<end_of_step>", 1, -1.0),
        _node(3, 1, 2, "print(x)\n<end_of_code>\n<output>2<end_of_output>\n", 2, 2.0),
        _node(4, 1, 2, f"# {SCRIPT}\nraise ValueError('x')\n<end_of_step>", 1, -1.0, "exec_error", error=ERROR),
        _node(5, 3, 3, "<answer>So \\boxed{2}<end_of_answer>", 1, 1.0, "answer", "2", True),
        _node(6, 3, 3, "<answer>Also \\boxed{2.0}<end_of_answer>", 1, 1.0, "answer", "2.0", True),
        _node(7, 2, 2, "print(x)\n<end_of_code>\n<output>3 \x01& <img src=x onerror=alert(2)><end_of_output>\n",
              1, -1.0),
        _node(8, 7, 3, "<answer>\\boxed{3}<end_of_answer>", 1, -1.0, "answer", "3", False),
        _node(9, 0, 1, "<code>\n# Step 1: never visited\n<end_of_step>", 0, 0.0),
    ]
    for i, score in (ppm or {}).items():
        nodes[i]["init_value"] = score
    return {"problem_id": "toy/<1>", "prompt": format_prompt(QUESTION), "answer": "2", "mode": mode,
            "config_digest": "abc123", "seed": 0, "nodes": nodes,
            "stats": {"rollouts": 3, "answers": 3, "correct_answers": 2}}


@pytest.fixture
def trees_file(tmp_path):
    """A trees.jsonl holding the toy tree between two others, written as the driver writes records."""
    other = tree_dict()
    path = tmp_path / "trees.jsonl"
    records = [dict(other, problem_id="other/a"), tree_dict(), dict(other, problem_id="other/b", seed=3)]
    path.write_text("".join(TreeRecord.from_dict(r).to_json() + "\n" for r in records), encoding="utf-8")
    return str(path)


class _PageParser(html.parser.HTMLParser):
    """Collects the tags, each node's <details> attributes in document order, and each step's text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.details, self.steps, self._step = [], [], {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "details":
            self.details.append(attrs)
        if tag == "pre" and "data-node" in attrs:
            self._step = int(attrs["data-node"])
            self.steps[self._step] = ""

    def handle_endtag(self, tag):
        if tag == "pre":
            self._step = None

    def handle_data(self, data):
        if self._step is not None:
            self.steps[self._step] += data


def _parse(page: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(page)
    parser.close()
    return parser


def test_html_page_shows_every_node_escaped_and_the_chosen_path(trees_file, tmp_path):
    record = find_record(trees_file, problem_id="toy/<1>")
    out = str(tmp_path / "page" / "tree.html")
    render(record, out)
    page = open(out, encoding="utf-8").read()
    parsed = _parse(page)

    assert html.escape(QUESTION) in page and ">2</span>" in page  # question and reference answer
    # Every node's step text comes back verbatim (control characters replaced), and no model markup is live.
    # A failed step also shows what its program raised.
    assert parsed.steps == {n.id: rd.clean(n.text) + (n.error or "") for n in record.nodes[1:]}
    assert html.escape(ERROR) in page
    assert "\x01" in record.node(7).text and "\ufffd" in parsed.steps[7]
    assert SCRIPT not in page and html.escape(SCRIPT) in page
    assert "img" not in parsed.tags and parsed.tags.count("script") == 1  # the page's own (collapse buttons)
    assert "http" not in page.replace('xmlns="http://www.w3.org', "")  # nothing to fetch

    nodes = {int(d["data-node"]): d for d in parsed.details}
    assert sorted(nodes) == list(range(10))
    # No PPM scores: the answer path with the highest mean Q (ties: lower answer id) is chosen.
    chosen = [i for i, d in nodes.items() if "chosen" in d["class"].split()]
    assert chosen == [0, 1, 3, 5]
    assert all("open" in nodes[i] for i in chosen) and "open" not in nodes[2]
    assert (nodes[1]["data-q"], nodes[1]["data-visits"]) == ("1.000000", "2")
    assert (nodes[0]["data-q"], nodes[0]["data-visits"]) == ("0.333333", "3")
    assert (nodes[7]["data-q"], nodes[7]["data-visits"]) == ("-1.000000", "1")
    assert "Q +1.000</span> \u00b7 N 2" in page and "Q +0.333</span> \u00b7 N 3" in page
    assert {i for i, d in nodes.items() if "correct" in d["class"].split()} == {5, 6}
    assert {i for i, d in nodes.items() if "wrong" in d["class"].split()} == {8}
    assert "failed" in nodes[4]["class"].split() and "reward -1.000" in page
    # Children sorted by Q: root's children 1 (Q 1), 9 (Q 0), 2 (Q -1).
    order = [int(d["data-node"]) for d in parsed.details]
    assert order.index(1) < order.index(9) < order.index(2)
    assert "mode" in page and "abc123" in page and "correct_answers" in page  # the search settings


def test_children_order_follows_sort(trees_file):
    record = find_record(trees_file, problem_id="toy/<1>")
    for sort, expected in (("q", [1, 9, 2]), ("visits", [1, 2, 9]), ("id", [1, 2, 9])):
        assert [c.id for c in rd.sorted_children(record, 0, sort)] == expected
        order = [int(d["data-node"]) for d in _parse(rd.render_html(record, sort=sort)).details]
        assert sorted(expected, key=order.index) == expected
    with pytest.raises(ValueError, match="sort"):
        rd.sorted_children(record, 0, "nope")


def test_chosen_path_rules():
    # With PPM scores on every answer: inference selection (highest PPM score), even for a wrong answer.
    ppm = TreeRecord.from_dict(tree_dict("inference", ppm={5: 0.1, 6: 0.4, 8: 0.9}))
    path, rule = rd.chosen_path(ppm)
    assert path == [0, 2, 7, 8] and "PPM" in rule
    # Without answers: the most-visited path (ties: higher Q).
    d = tree_dict()
    d["nodes"] = d["nodes"][:5]
    d["nodes"][4]["text"] = "more"
    path, rule = rd.chosen_path(TreeRecord.from_dict(d))
    assert path == [0, 1, 3] and "most-visited" in rule
    assert rd.most_visited_path(TreeRecord.from_dict(tree_dict())) == [0, 1, 3, 5]
    # Inference rewards are the PPM scores of the answers; data generation's are graded +-1.
    assert rd.terminal_reward(ppm, ppm.node(8)) == 0.9
    assert rd.terminal_reward(TreeRecord.from_dict(tree_dict()), ppm.node(8)) == -1.0


def test_svg_is_well_formed_with_tooltips(trees_file, tmp_path):
    record = find_record(trees_file, index=1)
    assert record.problem_id == "toy/<1>"
    out = str(tmp_path / "tree.svg")
    render(record, out)
    root = ET.parse(out).getroot()  # raises on malformed XML
    ns = {"s": "http://www.w3.org/2000/svg"}
    groups = root.findall("s:g", ns)
    assert len(groups) == 10 and len(root.findall("s:line", ns)) == 9
    tips = {int(g.get("data-node")): g.find("s:title", ns).text for g in groups}
    assert SCRIPT in tips[4] and "Q -1.000 N 1" in tips[4]  # the raw text, back from its escaped form
    # A capped drawing keeps the chosen path and says what it left out.
    capped = rd.render_svg(record, max_nodes=5)
    root = ET.fromstring(capped.split("\n", 1)[1])
    kept = {int(g.get("data-node")) for g in root.findall("s:g", ns)}
    assert len(kept) == 5 and {0, 1, 3, 5} <= kept
    assert "showing 5 of 10 nodes" in capped


def test_unknown_id_or_index_names_it(trees_file):
    with pytest.raises(LookupError) as e:
        find_record(trees_file, problem_id="missing/7")
    message = str(e.value)
    assert "missing/7" in message and trees_file in message and "'other/a'" in message and "'toy/<1>'" in message
    with pytest.raises(LookupError, match="index 5.*3 records"):
        find_record(trees_file, index=5)
    with pytest.raises(LookupError, match="seed 9"):
        find_record(trees_file, problem_id="other/b", seed=9)
    assert find_record(trees_file, problem_id="other/b", seed=3).seed == 3


def test_command_line(trees_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "experiments.inspect", f"--trees={trees_file}"]
    out = tmp_path / "t.html"
    ok = subprocess.run(cmd + ["--problem_id=toy/<1>", f"--out={out}", "--sort=visits"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "10 nodes" in ok.stdout and out.exists()
    bad = subprocess.run(cmd + ["--problem_id=nope/1", f"--out={tmp_path / 'x.html'}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "nope/1" in bad.stderr and trees_file in bad.stderr
    assert not (tmp_path / "x.html").exists()


@pytest.mark.parametrize("args, message", [
    (["--problem_id=nope/1"], "no tree record for problem id 'nope/1'"),
    (["--index=0", "--trees={missing}"], "No such file or directory"),
    (["--problem_id=nope/1", "--trees={broken}"], "broken.jsonl:2: malformed JSON"),
    (["--index=0", "--seed=3"], "--seed goes with --problem_id, not with --index"),
    (["--index=0", "--svg_max_nodes=0"], "flag --svg_max_nodes=0"),
    (["--index=0", "--svg_max_nodes=-3"], "flag --svg_max_nodes=-3"),
])
def test_command_line_names_bad_data_and_flags(trees_file, tmp_path, args, message):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(open(trees_file).read().splitlines()[0] + "\n{oops\n" + "\n")
    args = [a.format(missing=tmp_path / "missing.jsonl", broken=broken) for a in args]
    proc = subprocess.run([sys.executable, "-m", "experiments.inspect", f"--trees={trees_file}", *args,
                           f"--out={tmp_path / 'x.svg'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    if "--" not in message:  # bad data is no usage error: one line, without a pointer to the flags' help
        assert proc.stderr.strip() == proc.stderr.strip().splitlines()[0] and "--help" not in proc.stderr
    assert not (tmp_path / "x.svg").exists()


@pytest.mark.slow
def test_renders_a_tree_the_real_search_wrote(miniature, tmp_path):
    """The miniature policy searches one problem; its record renders with every node and a chosen path."""
    import random

    from experiments.expand import example_problem
    from experiments.search import run_search
    from rstar_jax.search.config import SearchConfig
    problem = example_problem(random.Random(7), 0)[0]
    config = SearchConfig(mode="terminal", rollouts=3, num_candidates=4, max_depth=5, max_step_tokens=40,
                          batch_size=1, exec_timeout_s=10.0)
    run_search(config, [problem], miniature["policy"], None, str(tmp_path), progress=lambda s: None)
    record = find_record(str(tmp_path / "trees.jsonl"), problem_id=problem["id"])
    render(record, str(tmp_path / "t.html"))
    render(record, str(tmp_path / "t.svg"))
    parsed = _parse((tmp_path / "t.html").read_text(encoding="utf-8"))
    # The tiny model writes \x15 etc.; a step that failed also shows its error.
    assert parsed.steps == {n.id: rd.clean(n.text) + (n.error or "") for n in record.nodes[1:]}
    path, _ = rd.chosen_path(record)
    assert [int(d["data-node"]) for d in parsed.details if "chosen" in d["class"].split()] == path
    assert len(ET.parse(str(tmp_path / "t.svg")).getroot().findall("{http://www.w3.org/2000/svg}g")) == min(
        len(record.nodes), rd.SVG_MAX_NODES)
    assert json.loads((tmp_path / "trees.jsonl").read_text().splitlines()[0])["problem_id"] == problem["id"]
