"""Training data from finished search trees: policy SFT, PPM preference pairs, and the ablations' data sets.

Input: tree records (``rstar_jax.search.tree_record``). Definitions used throughout:

- A *trajectory* is the path root -> answer node (``terminal_reason == "answer"``); its response is the
  concatenation of the path's step texts (root excluded), its prompt the record's prompt. Its *mean Q* / *min Q*
  are over the path's nodes, root excluded, answer node included.
- A node *leads to a correct answer* when its subtree (itself included) holds an answer node with
  ``correct is True``; it *leads to a wrong answer* when it does not, and its subtree holds an answer node with
  ``correct is False`` or (``exec_error_is_negative``, the default) an ``exec_error`` node: a step that fails to
  execute is a wrong step. Ungraded answers (``correct is None``) count as neither. Negatives that lead to a
  wrong *answer* come first: a failed step (Q = -1, the lowest there is) only fills a slot they leave.

Outputs (RSTAR.md section 5; DESIGN.md "Formats between stages"):

- ``sft``: per problem the top ``sft_per_problem`` correct trajectories by mean Q, tie-break higher min Q, then
  lower answer-node id; trajectories with an ``exec_error`` node are skipped, and so is a response identical to
  one already chosen. ``{"id": f"{problem_id}/sft{k}", "prompt", "response"}``.
- ``pairs``: at every node, among its *non-answer* children, the ``pairs_per_side`` highest-Q children leading
  to a correct answer (positives) vs the ``pairs_per_side`` lowest-Q children leading to a wrong one (negatives);
  prompt = record prompt + the path's texts, pos / neg = the two child step texts. The final answer step (the
  answer-node children) is compared through whole trajectories instead, once per problem: the top correct
  trajectories (SFT order, exec errors skipped) vs the incorrect ones with the lowest mean Q (tie-break lower min
  Q, then lower id); prompt = record prompt, pos / neg = full responses. Every pos x neg combination is a
  candidate; ``pos_count`` / ``neg_count`` are the numbers selected on each side before filtering,
  ``margin = Q(pos) - Q(neg)`` (mean Q for trajectories). Kept when ``margin >= min_margin`` and the character
  edit distance is ``>= min_edit_distance``. Ids: ``{pid}/step{node}/{pos}-{neg}`` (child node ids) and
  ``{pid}/final/{pos}-{neg}`` (answer-node ids).
- ``pqm``: ``{"id": f"{pid}/n{node}", "prompt", "response" (path text to the node), "q"}`` for every visited
  non-root node (Q-value regression targets).
- ``orm``: ``{"id": f"{pid}/t{answer node}", "prompt", "response", "correct"}`` for every graded trajectory.
- ``sft_random``: per problem ``sft_per_problem`` correct trajectories drawn uniformly without replacement
  (ignoring Q) with an RNG seeded by ``(seed, problem_id)``, so the choice does not depend on record order.
- ``sft_rejection``: every distinct correct trajectory response, in answer-node id order, at most
  ``rejection_per_problem`` per problem (``None``: no cap).
- ``buckets``: per problem ``{"id", "bucket", "answers", "correct"}``: easy (>= 1 answer, all correct),
  medium (some correct), hard (none correct, including no answer at all).

Pure Python + numpy; no jax.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Iterable, Sequence

import numpy as np

from rstar_jax.search.tree_record import Trajectory, TreeRecord, read_tree_records

# Q values are float sums of +-1 and PPM scores: 0.7 - 0.2 == 0.49999999999999994 must pass a 0.5 margin.
MARGIN_TOLERANCE = 1e-9

BUCKETS = ("easy", "medium", "hard")
OUTPUT_FILES = ("sft", "pairs", "pqm", "orm", "sft_random", "sft_rejection", "buckets")


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """What to extract; defaults are the reference's."""

    sft_per_problem: int = 2  # top-k correct trajectories per problem (also the random-SFT ablation's k)
    pairs_per_side: int = 2  # positives / negatives per step -> up to pairs_per_side**2 pairs
    min_margin: float = 0.5  # keep a pair when Q(pos) - Q(neg) >= this
    min_edit_distance: int = 20  # ... and the character edit distance of pos and neg is >= this (0: no filter)
    exec_error_is_negative: bool = True  # a failed-execution terminal makes its ancestors' branch "wrong"
    final_step_pairs: bool = True  # the trajectory-level pairs for the final answer step
    rejection_per_problem: int | None = 16  # cap of the rejection-sampled SFT set per problem (None: all)
    seed: int = 0  # random-SFT ablation

    def __post_init__(self):  # messages start with the field's name, which is also the flag's
        for name, least in (("sft_per_problem", 1), ("pairs_per_side", 1), ("min_edit_distance", 0), ("seed", 0),
                            ("rejection_per_problem", 0)):
            value = getattr(self, name)
            if value is None and name == "rejection_per_problem":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if not isinstance(self.min_margin, (int, float)) or not math.isfinite(self.min_margin):
            raise ValueError(f"min_margin must be a finite number (below -2: no filter), got {self.min_margin!r}")


@dataclasses.dataclass
class Extracted:
    """Everything extracted from a set of trees, as JSON-ready rows, plus statistics."""

    sft: list[dict] = dataclasses.field(default_factory=list)
    pairs: list[dict] = dataclasses.field(default_factory=list)
    pqm: list[dict] = dataclasses.field(default_factory=list)
    orm: list[dict] = dataclasses.field(default_factory=list)
    sft_random: list[dict] = dataclasses.field(default_factory=list)
    sft_rejection: list[dict] = dataclasses.field(default_factory=list)
    buckets: list[dict] = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict)


# --- edit distance -----------------------------------------------------------------------------------------

def bounded_levenshtein(a: str, b: str, bound: int) -> int:
    """``min(levenshtein(a, b), bound)`` in O(min(len) * bound) time.

    Only the diagonal band ``|i - j| < bound`` of the DP matrix is computed (cells outside it are >= bound),
    every cell is capped at ``bound``, and the scan stops as soon as a whole row reaches ``bound`` (no later
    cell can be smaller). Common prefixes and suffixes are stripped first.
    """
    if bound <= 0:
        return 0
    if a == b:
        return 0
    start = 0
    limit = min(len(a), len(b))
    while start < limit and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    a, b = a[start:end_a], b[start:end_b]
    if len(a) > len(b):
        a, b = b, a
    n, m = len(a), len(b)
    if m - n >= bound:
        return bound
    if n == 0:
        return min(m, bound)
    k = bound
    prev = [min(j, k) for j in range(m + 1)]  # row 0
    cur = [k] * (m + 1)
    for i in range(1, n + 1):
        lo = max(1, i - k + 1)
        hi = min(m, i + k - 1)
        # Column lo - 1 of this row: the true D[i][0] = i inside the band, else (out of band) >= bound.
        cur[lo - 1] = min(i, k) if lo == 1 else k
        row_min = cur[lo - 1]
        ai = a[i - 1]
        left = cur[lo - 1]
        for j in range(lo, hi + 1):
            # prev[j] for j = hi may lie one past the previous row's band: it was set to k below.
            v = prev[j - 1] + (ai != b[j - 1])
            up = prev[j] + 1
            if up < v:
                v = up
            if left + 1 < v:
                v = left + 1
            if v > k:
                v = k
            cur[j] = v
            left = v
            if v < row_min:
                row_min = v
        if hi < m:
            cur[hi + 1] = k  # the next row reads it as "up" at its last band column
        if row_min >= k:
            return k
        prev, cur = cur, prev
    return min(prev[m], k)


# --- per-tree analysis ---------------------------------------------------------------------------------------

def subtree_outcomes(record: TreeRecord, exec_error_is_negative: bool = True) -> tuple[list[bool], list[bool]]:
    """(has_correct, has_wrong) per node id: whether its subtree (itself included) holds a correct answer node /
    a wrong terminal (an answer with ``correct is False``, or an ``exec_error`` node when that counts)."""
    n = len(record.nodes)
    has_correct = [False] * n
    has_wrong = [False] * n
    for node in reversed(record.nodes):  # parents have smaller ids: children are done before their parent
        if node.terminal_reason == "answer":
            if node.correct is True:
                has_correct[node.id] = True
            elif node.correct is False:
                has_wrong[node.id] = True
        elif node.terminal_reason == "exec_error" and exec_error_is_negative:
            has_wrong[node.id] = True
        if node.parent >= 0:
            has_correct[node.parent] |= has_correct[node.id]
            has_wrong[node.parent] |= has_wrong[node.id]
    return has_correct, has_wrong


def difficulty(record: TreeRecord) -> tuple[str, int, int]:
    """(bucket, answer nodes, correct answer nodes): easy when >= 1 answer and all correct, medium when some are
    correct, hard when none is (including a tree without any answer)."""
    answers = record.answer_nodes()
    correct = sum(1 for node in answers if node.correct is True)
    if answers and correct == len(answers):
        bucket = "easy"
    elif correct:
        bucket = "medium"
    else:
        bucket = "hard"
    return bucket, len(answers), correct


def _best_first(trajectory: Trajectory) -> tuple:
    return (-trajectory.mean_q, -trajectory.min_q, trajectory.leaf.id)


def _worst_first(trajectory: Trajectory) -> tuple:
    return (trajectory.mean_q, trajectory.min_q, trajectory.leaf.id)


def sft_candidates(record: TreeRecord) -> tuple[list[Trajectory], int]:
    """(correct trajectories without exec errors, distinct responses, in answer-node id order; how many correct
    ones were skipped for an exec error)."""
    out, seen, skipped = [], set(), 0
    for trajectory in record.trajectories():
        if trajectory.correct is not True:
            continue
        if trajectory.has_exec_error:
            skipped += 1
            continue
        response = trajectory.response
        if response in seen:
            continue
        seen.add(response)
        out.append(trajectory)
    return out, skipped


def top_trajectories(candidates: Sequence[Trajectory], k: int) -> list[Trajectory]:
    """The k best by mean Q, then min Q (higher first), then answer-node id (lower first)."""
    return sorted(candidates, key=_best_first)[:k]


def _problem_rng(seed: int, problem_id: str) -> np.random.Generator:
    digest = hashlib.sha256(problem_id.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


class _PairFilter:
    """Applies the margin and edit-distance filters and counts what each dropped."""

    def __init__(self, config: ExtractConfig):
        self.config = config
        self.counts = {kind: {"candidates": 0, "dropped_margin": 0, "dropped_edit_distance": 0, "kept": 0,
                              "sites": 0}
                       for kind in ("step", "final")}

    def __call__(self, kind: str, pair: dict) -> dict | None:
        counts = self.counts[kind]
        counts["candidates"] += 1
        if pair["margin"] < self.config.min_margin - MARGIN_TOLERANCE:
            counts["dropped_margin"] += 1
            return None
        k = self.config.min_edit_distance
        if k and bounded_levenshtein(pair["pos"], pair["neg"], k) < k:
            counts["dropped_edit_distance"] += 1
            return None
        counts["kept"] += 1
        return pair


def step_pairs(record: TreeRecord, config: ExtractConfig, pair_filter: _PairFilter | None = None) -> list[dict]:
    """The step-level preference pairs of one tree (filtered), in node id order."""
    pair_filter = pair_filter or _PairFilter(config)
    has_correct, has_wrong = subtree_outcomes(record, config.exec_error_is_negative)
    _, has_wrong_answer = subtree_outcomes(record, exec_error_is_negative=False)
    k = config.pairs_per_side
    pairs = []
    prefix: dict[int, str] = {}  # path text of the nodes that have pairs (computed on demand)
    for node in record.nodes:
        kids = [c for c in record.children(node.id) if c.terminal_reason != "answer"]
        if len(kids) < 2:
            continue
        pos = sorted((c for c in kids if has_correct[c.id]), key=lambda c: (-c.q, c.id))[:k]
        neg = sorted((c for c in kids if not has_correct[c.id] and has_wrong[c.id]),
                     key=lambda c: (not has_wrong_answer[c.id], c.q, c.id))[:k]
        if not pos or not neg:
            continue
        pair_filter.counts["step"]["sites"] += 1
        if node.id not in prefix:
            prefix[node.id] = record.prompt + record.path_text(node.id)
        for p in pos:
            for n in neg:
                pair = pair_filter("step", {
                    "id": f"{record.problem_id}/step{node.id}/{p.id}-{n.id}", "prompt": prefix[node.id],
                    "pos": p.text, "neg": n.text, "pos_count": len(pos), "neg_count": len(neg),
                    "margin": p.q - n.q})
                if pair is not None:
                    pairs.append(pair)
    return pairs


def final_answer_pairs(record: TreeRecord, config: ExtractConfig,
                       pair_filter: _PairFilter | None = None) -> list[dict]:
    """The trajectory-level pairs for the final answer step of one tree (filtered)."""
    pair_filter = pair_filter or _PairFilter(config)
    k = config.pairs_per_side
    candidates, _ = sft_candidates(record)
    pos = top_trajectories(candidates, k)
    neg = sorted((t for t in record.trajectories() if t.correct is False), key=_worst_first)[:k]
    if not pos or not neg:
        return []
    pair_filter.counts["final"]["sites"] += 1
    pairs = []
    for p in pos:
        for n in neg:
            pair = pair_filter("final", {
                "id": f"{record.problem_id}/final/{p.leaf.id}-{n.leaf.id}", "prompt": record.prompt,
                "pos": p.response, "neg": n.response, "pos_count": len(pos), "neg_count": len(neg),
                "margin": p.mean_q - n.mean_q})
            if pair is not None:
                pairs.append(pair)
    return pairs


def pqm_rows(record: TreeRecord) -> list[dict]:
    """Q-value regression targets: every visited non-root node with its path text."""
    texts = [""] * len(record.nodes)
    rows = []
    for node in record.nodes[1:]:
        texts[node.id] = texts[node.parent] + node.text
        if node.visits > 0:
            rows.append({"id": f"{record.problem_id}/n{node.id}", "prompt": record.prompt,
                         "response": texts[node.id], "q": node.q})
    return rows


def orm_rows(record: TreeRecord) -> list[dict]:
    """Outcome labels: every graded trajectory."""
    return [{"id": f"{record.problem_id}/t{t.leaf.id}", "prompt": record.prompt, "response": t.response,
             "correct": t.correct}
            for t in record.trajectories() if t.correct is not None]


# --- top level -----------------------------------------------------------------------------------------------

def extract(records: Iterable[TreeRecord | dict], config: ExtractConfig = ExtractConfig()) -> Extracted:
    """All training and ablation data of a set of trees (records or their dicts), plus statistics."""
    return _extract(((None, record) for record in records), config)


def _extract(located: Iterable[tuple[str | None, TreeRecord | dict]], config: ExtractConfig) -> Extracted:
    """``extract`` of (file the record was read from or None, record) pairs: a duplicate is named with its files."""
    out = Extracted()
    pair_filter = _PairFilter(config)
    seen: dict[str, str | None] = {}  # problem id -> its record's file
    buckets = dict.fromkeys(BUCKETS, 0)
    totals = {"nodes": 0, "answers": 0, "correct_answers": 0, "solved": 0, "sft_problems": 0,
              "correct_trajectories": 0, "skipped_exec_error": 0}
    for path, record in located:
        if isinstance(record, dict):
            record = TreeRecord.from_dict(record)
        pid = record.problem_id
        if pid in seen:
            files = " and ".join(dict.fromkeys(p for p in (seen[pid], path) if p is not None))
            raise ValueError(f"problem {pid!r}: duplicate tree record{f' in {files}' if files else ''} "
                             f"(extracted ids would collide)")
        seen[pid] = path

        bucket, n_answers, n_correct = difficulty(record)
        buckets[bucket] += 1
        out.buckets.append({"id": pid, "bucket": bucket, "answers": n_answers, "correct": n_correct})
        totals["nodes"] += len(record.nodes)
        totals["answers"] += n_answers
        totals["correct_answers"] += n_correct
        totals["solved"] += n_correct > 0

        candidates, skipped = sft_candidates(record)
        totals["correct_trajectories"] += len(candidates)
        totals["skipped_exec_error"] += skipped
        top = top_trajectories(candidates, config.sft_per_problem)
        totals["sft_problems"] += bool(top)
        out.sft.extend({"id": f"{pid}/sft{i}", "prompt": record.prompt, "response": t.response}
                       for i, t in enumerate(top))

        out.pairs.extend(step_pairs(record, config, pair_filter))
        if config.final_step_pairs:
            out.pairs.extend(final_answer_pairs(record, config, pair_filter))

        out.pqm.extend(pqm_rows(record))
        out.orm.extend(orm_rows(record))

        if candidates and config.sft_per_problem:
            rng = _problem_rng(config.seed, pid)
            chosen = rng.choice(len(candidates), size=min(config.sft_per_problem, len(candidates)), replace=False)
            out.sft_random.extend({"id": f"{pid}/rand{i}", "prompt": record.prompt,
                                   "response": candidates[int(c)].response} for i, c in enumerate(chosen))
        cap = len(candidates) if config.rejection_per_problem is None else config.rejection_per_problem
        out.sft_rejection.extend({"id": f"{pid}/rej{i}", "prompt": record.prompt, "response": t.response}
                                 for i, t in enumerate(candidates[:cap]))

    problems = len(seen)
    per_tree = (lambda x: x / problems) if problems else (lambda x: 0.0)
    out.stats = {
        "problems": problems,
        "solved": totals["solved"],
        "solved_fraction": per_tree(totals["solved"]),
        "buckets": buckets,
        "avg_nodes_per_tree": per_tree(totals["nodes"]),
        "avg_answers_per_tree": per_tree(totals["answers"]),
        "avg_correct_answers_per_tree": per_tree(totals["correct_answers"]),
        "sft": {"examples": len(out.sft), "problems": totals["sft_problems"],
                "correct_trajectories": totals["correct_trajectories"],
                "skipped_exec_error": totals["skipped_exec_error"]},
        "pairs": {"kept": len(out.pairs), **pair_filter.counts},
        "pqm": len(out.pqm),
        "orm": {"rows": len(out.orm), "correct": sum(1 for row in out.orm if row["correct"])},
        "sft_random": len(out.sft_random),
        "sft_rejection": len(out.sft_rejection),
        "config": dataclasses.asdict(config),
    }
    return out


def extract_files(paths: Sequence[str | os.PathLike], config: ExtractConfig = ExtractConfig()) -> Extracted:
    """``extract`` over the records of several JSONL tree files (e.g. one per host)."""
    return _extract(((os.fspath(path), record) for path in paths for record in read_tree_records(path)), config)


def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_extracted(extracted: Extracted, out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes ``{sft,pairs,pqm,orm,sft_random,sft_rejection,buckets}.jsonl`` and ``stats.json`` into
    ``out_dir``, each atomically (a temporary file, then ``os.replace``). Returns name -> path."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name in OUTPUT_FILES:
        rows = getattr(extracted, name)
        path = os.path.join(out_dir, f"{name}.jsonl")

        def write_rows(f, rows=rows):
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False))
                f.write("\n")

        _write_atomic(path, write_rows)
        written[name] = path
    path = os.path.join(out_dir, "stats.json")
    _write_atomic(path, lambda f: f.write(json.dumps(extracted.stats, indent=2, sort_keys=True) + "\n"))
    written["stats"] = path
    return written
