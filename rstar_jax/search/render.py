"""One tree record drawn for people: a self-contained HTML page (nested, collapsible nodes) or an SVG picture.

Everything in a record was written by the model, so every string goes through `_text` (control characters
and lone surrogates replaced, then XML-escaped): the page can neither run the model's markup nor fail to
parse. The page needs nothing from outside (inline CSS, a few lines of optional JS; `<details>` collapses
without it).

"The chosen path" is the root -> answer path that inference-mode answer selection takes from this tree (the
reference's "best answer of each run by PPM value", `rstar_jax.eval.report.best_answer`);
in a tree without PPM scores, the trajectory extraction ranks first (`extract.top_trajectories`: mean Q,
then min Q); in a tree without any answer, the most-visited path from the root.
"""
from __future__ import annotations

import html
import json
import math
import re

from rstar_jax.eval import selection
from rstar_jax.eval.report import best_answer
from rstar_jax.search.extract import subtree_outcomes, top_trajectories
from rstar_jax.search.tree_record import ROOT, Node, TreeRecord
from rstar_jax.tokenizer import PROMPT_TEMPLATE
from rstar_jax.verify.program import OUTPUT, OUTPUT_END

SORT_KEYS = ("q", "visits", "id")
SVG_MAX_NODES = 300
_TOOLTIP_CHARS = 1500  # browsers show long tooltips badly; the HTML page has the full text

# Characters XML 1.0 forbids (and lone surrogates, which cannot be written as UTF-8).
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_OUTPUT_BLOCK = re.compile(re.escape(OUTPUT) + ".*?" + re.escape(OUTPUT_END), re.DOTALL)


def clean(s: str) -> str:
    """`s` with the characters XML cannot hold replaced by U+FFFD (what the page shows of a step)."""
    return _BAD_CHARS.sub("\ufffd", s)


def _text(s: object) -> str:
    """Any value as text safe inside HTML/SVG element content and quoted attributes."""
    return html.escape(clean(str(s)), quote=True)


# --- what to show ------------------------------------------------------------------------------------------

def question_of(record: TreeRecord) -> str:
    """The question inside the policy prompt (the whole prompt when it is not in the standard template)."""
    head, tail = PROMPT_TEMPLATE.split("{question}")
    p = record.prompt
    if p.startswith(head) and p.endswith(tail) and len(p) >= len(head) + len(tail):
        return p[len(head):len(p) - len(tail)]
    return p


def terminal_reward(record: TreeRecord, node: Node) -> float | None:
    """The value a terminal node contributed when created (the record does not store it; the driver's rule):
    an answer's graded +-1 (its PPM score at inference), -1 for a failure, none for a dead end."""
    if node.terminal_reason == "answer":
        if record.mode == "inference":
            return node.init_value
        return None if node.correct is None else (1.0 if node.correct else -1.0)
    if node.terminal_reason in ("exec_error", "no_stop", "max_depth"):
        return -1.0
    return None


def most_visited_path(record: TreeRecord) -> list[int]:
    """Root first; at each node the child with the most visits (ties: higher Q, then lower id)."""
    path = [ROOT]
    while kids := record.children(path[-1]):
        path.append(min(kids, key=lambda c: (-c.visits, -c.q, c.id)).id)
    return path


def chosen_path(record: TreeRecord) -> tuple[list[int], str]:
    """(node ids from the root to the chosen leaf, how it was chosen); see the module docstring."""
    answered = [t for t in record.trajectories() if selection.answer_key(t.leaf.final_answer) is not None]
    if answered and all(t.leaf.init_value is not None for t in answered):
        path = record.path(best_answer(record).id, include_root=True)
        return [n.id for n in path], "the answer with the highest PPM score (inference rule)"
    if answered:
        best = top_trajectories(answered, 1)[0]
        return [ROOT] + [n.id for n in best.nodes], "no PPM scores: the answer path with the highest mean Q"
    return most_visited_path(record), "no answer in the tree: the most-visited path"


def sorted_children(record: TreeRecord, node_id: int, sort: str = "q") -> list[Node]:
    keys = {"q": lambda c: (-c.q, -c.visits, c.id), "visits": lambda c: (-c.visits, -c.q, c.id),
            "id": lambda c: c.id}
    if sort not in keys:
        raise ValueError(f"sort must be one of {SORT_KEYS}, got {sort!r}")
    return sorted(record.children(node_id), key=keys[sort])


def _status(node: Node) -> str:
    """CSS class of a node's outcome: correct / wrong answer, failure, or nothing."""
    if node.terminal_reason == "answer":
        return {True: "correct", False: "wrong"}.get(node.correct, "ungraded")
    return "failed" if node.terminal_reason in ("exec_error", "no_stop", "max_depth") else ""


def _q_colour(q: float) -> str:
    """Grey at Q = 0, towards green at +1 and red at -1."""
    q = max(-1.0, min(1.0, q)) if math.isfinite(q) else 0.0
    grey, end = (200, 200, 200), ((60, 170, 80) if q > 0 else (215, 60, 60))
    return "#" + "".join(f"{round(g + abs(q) * (e - g)):02x}" for g, e in zip(grey, end))


def _num(x: float | None, sign: bool = True) -> str:
    return "-" if x is None else (f"{x:+.3f}" if sign else f"{x:.3f}")


def _preview(text: str, limit: int = 90) -> str:
    """The step's first meaningful line, for collapsed nodes."""
    for line in text.splitlines():
        line = line.strip()
        if line and line != "<code>":
            return line if len(line) <= limit else line[:limit - 1] + "\u2026"
    return ""


# --- HTML --------------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.3em} pre{white-space:pre-wrap;word-break:break-word;margin:.3em 0}
.meta td{padding:0 1em 0 0;vertical-align:top} .meta td:first-child{color:#666}
.question{background:#f6f6f6;padding:.6em;border-radius:4px}
details.node{margin:.15em 0 .15em 1.2em;border-left:3px solid #ddd;padding-left:.5em}
details.node>summary{cursor:pointer;font-family:ui-monospace,monospace;font-size:12.5px}
.kids{margin-left:.3em}
.badge{display:inline-block;padding:0 .35em;border-radius:3px;margin-right:.3em}
.q{color:#111} .prev{color:#555}
.correct>summary .tag{background:#2e9e4a;color:#fff} .wrong>summary .tag{background:#d33;color:#fff}
.failed>summary .tag{background:#e9a33c;color:#fff} .ungraded>summary .tag{background:#999;color:#fff}
details.correct{border-left-color:#2e9e4a} details.wrong{border-left-color:#d33}
details.below-correct{border-left-color:#9fd8ad}
details.chosen{border-left:4px solid #2f6fdf} details.chosen>summary{background:#e6efff;font-weight:600}
.step{background:#fafafa;border:1px solid #eee;padding:.4em;max-height:30em;overflow:auto}
.out{background:#eef6ee;display:block} .answer{font-weight:700}
.path a{margin-right:.2em} button{margin-right:.5em}
"""

_JS = """
function setAll(open){document.querySelectorAll('details.node').forEach(d=>d.open=open);}
function showChosen(){document.querySelectorAll('details.node').forEach(
  d=>d.open=d.classList.contains('chosen'));}
"""


def _step_html(text: str) -> str:
    """The step text verbatim, with executed-output blocks set apart."""
    parts, last = [], 0
    for m in _OUTPUT_BLOCK.finditer(text):
        parts.append(_text(text[last:m.start()]))
        parts.append(f'<span class="out">{_text(m.group())}</span>')
        last = m.end()
    parts.append(_text(text[last:]))
    return "".join(parts)


def _summary_html(record: TreeRecord, node: Node, n_kids: int, chosen: bool) -> str:
    bits = [f"<b>#{node.id}</b>",
            f'<span class="badge q" style="background:{_q_colour(node.q)}">Q {_num(node.q)}</span>',
            f"N {node.visits}"]
    if node.init_value is not None:
        bits.append(f"PPM {_num(node.init_value)}")
    if node.terminal_reason is not None:
        label = _text(node.terminal_reason)
        if node.terminal_reason == "answer":
            mark = {True: " \u2713", False: " \u2717"}.get(node.correct, "")
            label = f"answer {_text(node.final_answer) if node.final_answer is not None else '(none)'}{mark}"
        bits.append(f'<span class="badge tag">{label}</span>')
        reward = terminal_reward(record, node)
        if reward is not None:
            bits.append(f"reward {_num(reward)}")
    if n_kids:
        bits.append(f"{n_kids} child{'ren' if n_kids != 1 else ''}")
    if chosen:
        bits.append("\u2605 chosen")
    bits.append(f'<span class="prev">{_text(_preview(node.text)) if node.id != ROOT else "root"}</span>')
    return " \u00b7 ".join(bits)


def render_html(record: TreeRecord, sort: str = "q") -> str:
    """The whole page for one tree record."""
    path, rule = chosen_path(record)
    on_path = set(path)
    has_correct, _ = subtree_outcomes(record)
    leaf = record.node(path[-1])

    def node_html(node: Node) -> list[str]:
        kids = sorted_children(record, node.id, sort)
        classes = ["node", _status(node)]
        if node.id in on_path:
            classes.append("chosen")
        if has_correct[node.id] and node.terminal_reason != "answer":
            classes.append("below-correct")  # a correct answer lies in this subtree
        attrs = (f'class="{" ".join(c for c in classes if c)}" id="n{node.id}" data-node="{node.id}" '
                 f'data-q="{node.q:.6f}" data-visits="{node.visits}" data-value-sum="{node.value_sum:.6f}"')
        out = [f"<details {attrs}{' open' if node.id in on_path else ''}>",
               f"<summary>{_summary_html(record, node, len(kids), node.id in on_path)}</summary>"]
        if node.id != ROOT:
            error = f'<span class="out">{_text(node.error)}</span>' if node.error else ""  # what the program raised
            out.append(f'<pre class="step" data-node="{node.id}">{_step_html(node.text)}{error}</pre>')
        if kids:
            out.append('<div class="kids">')
            for kid in kids:
                out.extend(node_html(kid))
            out.append("</div>")
        out.append("</details>")
        return out

    settings = {"mode": record.mode, "seed": record.seed, "config digest": record.config_digest,
                **{f"stats.{k}": v for k, v in record.stats.items()},
                **{k: v for k, v in record.extra.items()}}
    meta = "".join(f"<tr><td>{_text(k)}</td><td>{_text(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
                   for k, v in settings.items())
    answers = record.answer_nodes()
    n_correct = sum(1 for n in answers if n.correct is True)
    path_links = " \u2192 ".join(f'<a href="#n{i}">#{i}</a>' for i in path)
    outcome = ""
    if leaf.terminal_reason == "answer":
        verdict = {True: "correct", False: "wrong"}.get(leaf.correct, "not graded")
        outcome = f" \u2014 answer <span class='answer'>{_text(leaf.final_answer)}</span> ({verdict})"
    # Deep recursion is bounded by the search's max depth (16 by default), far below Python's limit.
    tree_html = "\n".join(node_html(record.node(ROOT)))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>tree {_text(record.problem_id)} (seed {record.seed})</title>
<style>{_CSS}</style><script>{_JS}</script></head><body>
<h1>Search tree of problem <code>{_text(record.problem_id)}</code></h1>
<h2>Question</h2><pre class="question">{_text(question_of(record))}</pre>
<p><b>Reference answer:</b> <span class="answer">{_text(record.answer)}</span></p>
<table class="meta">{meta}
<tr><td>nodes</td><td>{len(record.nodes)} ({len(answers)} answers, {n_correct} correct)</td></tr></table>
<p class="path"><b>Chosen path</b> ({_text(rule)}): {path_links}{outcome}</p>
<p><button onclick="setAll(true)">expand all</button><button onclick="setAll(false)">collapse all</button>
<button onclick="showChosen()">chosen path only</button> children sorted by {_text(sort)};
Q = value_sum / visits, N = visits, PPM = the reward model's score at creation.</p>
{tree_html}
</body></html>
"""


# --- SVG ---------------------------------------------------------------------------------------------------

def _kept_nodes(record: TreeRecord, path: list[int], max_nodes: int) -> set[int]:
    """At most max_nodes ids closed under parents: the chosen path first, then the most visited."""
    kept: set[int] = set()
    ranked = path + [n.id for n in sorted(record.nodes, key=lambda n: (-n.visits, -n.q, n.id))]
    for node_id in ranked:
        chain = []
        while node_id >= 0 and node_id not in kept:
            chain.append(node_id)
            node_id = record.node(node_id).parent
        if len(kept) + len(chain) > max_nodes:
            continue
        kept.update(chain)
        if len(kept) >= max_nodes:
            break
    return kept


def render_svg(record: TreeRecord, sort: str = "q", max_nodes: int = SVG_MAX_NODES) -> str:
    """A layered drawing: depth downwards, leaves in DFS order across, parents centred over their children;
    nodes coloured by Q (outlined green/red for correct/wrong answers), edges as thick as their visits."""
    path, rule = chosen_path(record)
    on_path = set(path)
    kept = _kept_nodes(record, path, max(1, max_nodes))
    dx, dy, r, margin = 26, 70, 9, 30
    x: dict[int, float] = {}
    next_slot = 0

    def place(node_id: int) -> None:  # recursion depth = tree depth
        nonlocal next_slot
        kids = [c.id for c in sorted_children(record, node_id, sort) if c.id in kept]
        for kid in kids:
            place(kid)
        if kids:
            x[node_id] = (x[kids[0]] + x[kids[-1]]) / 2
        else:
            x[node_id], next_slot = next_slot, next_slot + 1

    place(ROOT)
    depth = max(record.node(i).depth for i in kept)
    width = max(margin * 2 + max(next_slot - 1, 1) * dx, 600)  # room for the note at the bottom
    height = margin * 2 + depth * dy + 30
    pos = {i: (margin + x[i] * dx, margin + record.node(i).depth * dy) for i in kept}
    max_visits = max(1, max(record.node(i).visits for i in kept))

    edges, circles = [], []
    for i in sorted(kept):
        node = record.node(i)
        cx, cy = pos[i]
        if node.parent >= 0:
            px, py = pos[node.parent]
            w = 0.8 + 5.0 * math.sqrt(node.visits / max_visits)
            colour = "#2f6fdf" if i in on_path else "#999"
            edges.append(f'<line x1="{px:.1f}" y1="{py:.1f}" x2="{cx:.1f}" y2="{cy:.1f}" stroke="{colour}" '
                         f'stroke-width="{w:.2f}"/>')
        status = _status(node)
        stroke = {"correct": "#1b7f35", "wrong": "#c11", "failed": "#e9a33c"}.get(status, "#555")
        text = node.text if len(node.text) <= _TOOLTIP_CHARS else node.text[:_TOOLTIP_CHARS] + "\n[...]"
        tip = (f"#{i} Q {_num(node.q)} N {node.visits} PPM {_num(node.init_value)}"
               f"{' ' + node.terminal_reason if node.terminal_reason else ''}"
               f"{' answer ' + node.final_answer if node.final_answer is not None else ''}\n{text}")
        circles.append(f'<g data-node="{i}"><title>{_text(tip)}</title><circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r}" '
                       f'fill="{_q_colour(node.q)}" stroke="{stroke}" '
                       f'stroke-width="{3 if status in ("correct", "wrong") or i in on_path else 1}"/>'
                       f'<text x="{cx:.1f}" y="{cy + 3:.1f}" text-anchor="middle" font-size="8">{i}</text></g>')
    note = f"{len(record.nodes)} nodes; chosen path (blue): {rule}"
    if len(kept) < len(record.nodes):
        note = f"showing {len(kept)} of {len(record.nodes)} nodes (chosen path, then the most visited); " + note
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="12">\n'
            f"<title>tree {_text(record.problem_id)} (seed {record.seed})</title>\n"
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(edges) + "\n" + "\n".join(circles)
            + f'\n<text x="{margin}" y="{height - 10:.0f}">{_text(note)}</text>\n</svg>\n')
