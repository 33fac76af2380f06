"""The search driver: one lock-step loop over a batch of trees, expanding every live tree's leaf at once.

Each iteration: select a leaf in every live tree (jit) -> build each leaf's prompt from its path -> one
sampler call for all leaves (prefill once, fan out n, stop at the step tags) -> candidate filtering ->
one sandbox call for every code candidate -> `<output>` appended after `<end_of_code>` -> one grader call
for every answer -> one PPM call for every new child (when the mode uses one) -> insert + backup (jit).
A finished tree is written as one JSON line and its slot takes the next problem (continuous batching).

Resume: the output file is append-only and flushed per tree; a restart skips the (problem, seed) pairs
already written (there, or in the other processes' files: `read_all_finished`). A tree's randomness depends
only on (seed, problem id, node id), so a resumed run writes the same trees as an uninterrupted one.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rstar_jax import tokenizer as tk
from rstar_jax.errors import InputError
from rstar_jax.sampling import Sampler, SamplingConfig
from rstar_jax.search import backup, select, steps, tree as tr
from rstar_jax.search.config import SearchConfig
from rstar_jax.search.scoring import Scorer
from rstar_jax.verify.grader import Grader
from rstar_jax.verify.program import assemble_program
from rstar_jax.verify.sandbox import Sandbox

_log = logging.getLogger(__name__)
PHASES = ("tree", "generate", "execute", "grade", "score")


class ResumeError(InputError):
    pass


@dataclasses.dataclass
class _Slot:
    """Host-side state of the tree in one batch slot."""

    problem: dict
    seed: int
    prompt: str
    texts: list[str]  # [text_index] step texts, appended in node order ("" for the root)
    parents: list[int]  # [node] a host copy of the tree's parents, for building prompts without a device read
    answers: dict[int, tuple[str | None, bool]] = dataclasses.field(default_factory=dict)  # node -> (answer, ok)
    errors: dict[int, str] = dataclasses.field(default_factory=dict)  # node -> what its failed program raised
    generated_tokens: int = 0  # every sampled token of this search, kept or not (the compute it cost)

    @property
    def solved(self) -> bool:
        return any(ok for _, ok in self.answers.values())

    def path_text(self, node: int) -> str:
        return "".join(self.path_steps(node))

    def context(self, node: int, parent: bool = False) -> str | None:
        """The text a node's children extend: prompt + path (of its parent with `parent`; the root's: None)."""
        if parent:
            return None if node == 0 else self.context(self.parents[node])
        return self.prompt + self.path_text(node)

    def path_steps(self, node: int) -> list[str]:
        out = []
        while node > 0:
            out.append(self.texts[node])
            node = self.parents[node]
        return out[::-1]


def stream_id(problem_id: str, seed: int, node: int) -> int:
    """The sampler stream of one expansion: a function of the tree's identity and the node alone."""
    return zlib.crc32(f"{problem_id}\x00{seed}\x00{node}".encode()) % (2**32 - 1)


def step_budgets(prompt_lengths: dict[int, int], max_step_tokens: int, max_context_tokens: int) -> dict[int, list]:
    """Rows (keyed by slot) grouped by their token budget: max_step_tokens, or near the context limit the
    room left rounded down to a power of two (bounded recompilation). A row's budget depends on its own
    prompt alone, so its samples do not depend on which other trees share the call."""
    groups = collections.defaultdict(list)
    for i, length in prompt_lengths.items():
        room = max_context_tokens - length
        groups[max_step_tokens if room >= max_step_tokens else 1 << (room.bit_length() - 1)].append(i)
    return dict(groups)


def pin_settings(out_path: str, config: SearchConfig, save: bool = True) -> None:
    """Save the search settings next to the trees (`<trees>.config.json`), or refuse settings that differ
    from the saved ones while a tree is there, naming each field (batch_size may differ: it does not change
    the trees). A run that stopped before its first tree leaves nothing to keep: its settings are replaced.
    `save=False`: only check (another process's trees)."""
    path = os.path.splitext(out_path)[0] + ".config.json"
    ours = config.tree_settings()
    if not os.path.exists(path) or not _holds_a_tree(out_path):
        if save:
            with open(path + ".tmp", "w") as f:
                json.dump(ours, f, indent=1)
            os.replace(path + ".tmp", path)
        return
    with open(path) as f:
        saved = json.load(f)
    diffs = [f"{k}: saved {saved.get(k)!r}, now {ours.get(k)!r}" for k in dict.fromkeys([*ours, *saved])
             if saved.get(k) != ours.get(k)]
    if diffs:
        raise ResumeError(f"{out_path} holds trees searched with other settings ({path}); use another output "
                          f"directory or the same settings:\n  " + "\n  ".join(diffs))


def _holds_a_tree(path: str) -> bool:
    """Whether `path` has a complete line (a record, or a torn line's remains `read_finished` reports)."""
    try:
        with open(path, "rb") as f:
            return any(line.endswith(b"\n") and line.strip() for line in f)
    except FileNotFoundError:
        return False


def read_finished(path: str, digest: str) -> set[tuple[str, int]]:
    """(problem_id, seed) of the trees already in `path`, after cutting a line left half-written by a kill.

    A tree written under other search settings is an error: mixing them would corrupt the stage's output.
    """
    if not os.path.exists(path):
        return set()
    finished, good = set(), 0
    with open(path, "rb+") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):  # a write cut short by a kill: only ever the last line
                break
            good += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ResumeError(f"{path}:{number}: not a JSON tree record ({exc})") from None
            if record.get("config_digest") != digest:
                raise ResumeError(f"{path}:{number}: written with search settings {record.get('config_digest')}, "
                                  f"these are {digest}; use another output directory or the same settings")
            finished.add((record["problem_id"], int(record["seed"])))
        size = f.seek(0, os.SEEK_END)
        if good < size:
            _log.warning("%s: dropping %d bytes of an unfinished record at the end", path, size - good)
            f.truncate(good)
    return finished


def read_all_finished(out_path: str, config: SearchConfig, others: Sequence[str] = ()) -> set[tuple[str, int]]:
    """(problem_id, seed) of the trees already in `out_path`, this process's output (settings saved), and in
    `others`: the other processes' files, of this run or of an earlier one at another process count (settings
    checked). Cuts every file's torn last line, so no process may be writing to them meanwhile."""
    finished = set()
    for path in others:  # before saving ours: a run refused here must not pin its settings for the next
        if os.path.abspath(path) != os.path.abspath(out_path):
            pin_settings(path, config, save=False)
            finished |= read_finished(path, config.digest())
    pin_settings(out_path, config)
    return finished | read_finished(out_path, config.digest())


class SearchDriver:
    """Runs MCTS over problems with a policy (and a reward model), writing one tree record per search."""

    def __init__(self, config: SearchConfig, model, tokenizer, *, sandbox: Sandbox, grader: Grader,
                 scorer: Scorer | None = None, mesh=None, progress: Callable[[str], None] = print,
                 progress_every_s: float = 10.0, profile_dir: str | None = None, profile_start: int = -1,
                 profile_iterations: int = 3, policy_cache_mib: float = 0):
        if config.uses_ppm and scorer is None:
            raise ValueError(f"mode {config.mode!r} needs a reward model to score steps (scorer)")
        self.config, self.tokenizer, self.sandbox, self.grader, self.scorer = config, tokenizer, sandbox, grader, scorer
        # policy_cache_mib: the policy's keys/values of expanded leaves, so a child's expansion prefills its step only.
        self.sampler = Sampler.for_steps(model, tokenizer, mesh=mesh, cache_mib=policy_cache_mib)
        self.sampling = SamplingConfig(max_new_tokens=config.max_step_tokens, temperature=config.temperature,
                                       top_p=config.top_p, top_k=config.top_k)
        self.progress, self.progress_every_s = progress, progress_every_s
        # A jax.profiler trace of iterations profile_start .. + profile_iterations - 1 (phases annotated).
        self.profile_dir, self.profile_start, self.profile_iterations = profile_dir, profile_start, profile_iterations
        self.times = collections.Counter()
        n = config.num_candidates
        self._select = jax.jit(functools.partial(select.select, score_fn=select.uct(config.c, config.unvisited),
                                                 max_children=n), donate_argnums=(0,))
        self._expand = jax.jit(functools.partial(_insert_and_backup, max_depth=config.max_depth,
                                                 ppm_leaf_values=config.uses_ppm,
                                                 propagate_failures=config.propagate_failures), donate_argnums=(0,))
        self._reset = jax.jit(_reset_rows, donate_argnums=(0,))

    # ---- the loop ------------------------------------------------------------------------------

    def run(self, problems: Sequence[dict], out_path: str, finished: set[tuple[str, int]] | None = None) -> dict:
        """Search every (problem, seed) not yet written (`finished`: what `read_all_finished` returned for
        `out_path`, read here when not given); append their records to `out_path`. Returns run statistics."""
        cfg = self.config
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        if finished is None:
            finished = read_all_finished(out_path, cfg)
        todo = collections.deque((p, cfg.seed + r) for p in problems for r in range(cfg.runs)
                                 if (p["id"], cfg.seed + r) not in finished)
        total, skipped = len(problems) * cfg.runs, len(problems) * cfg.runs - len(todo)
        if skipped:
            self.progress(f"resuming: {skipped}/{total} searches already written")
        b = cfg.batch_size
        tree = self._compile(tr.empty(b, cfg.tree_capacity, jnp.zeros((b,), jnp.int32)))
        slots: list[_Slot | None] = [None] * b
        cursor, rollouts, limit = np.full(b, -1, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32)
        start, last_report, done, expansions, finished_rollouts = time.perf_counter(), time.perf_counter(), 0, 0, 0
        iteration = 0
        with open(out_path, "a") as out, contextlib.ExitStack() as self._profiling:
            while True:
                fresh = np.zeros(b, bool)
                for i in range(b):
                    if slots[i] is None and todo:
                        problem, seed = todo.popleft()
                        slots[i] = _Slot(problem, seed, tk.format_prompt(problem["question"]), [""], [-1])
                        cursor[i], rollouts[i], fresh[i] = 0, 0, True
                if not any(s is not None for s in slots):
                    break
                self._profile_window(iteration)
                for i, slot in enumerate(slots):
                    limit[i] = cfg.rollouts if slot is None or slot.solved or cfg.mode == "inference" \
                        else cfg.rollout_cap
                with self._phase("tree", "select"):
                    if fresh.any():
                        tree = self._reset(tree, jnp.asarray(fresh))
                    tree, leaf, rollouts_done = self._select(tree, jnp.asarray(cursor), jnp.asarray(rollouts),
                                                             jnp.asarray(limit))
                    leaf, rollouts = np.asarray(leaf), np.array(rollouts_done)
                cursor = leaf.copy()
                for i, slot in enumerate(slots):
                    if slot is not None and leaf[i] < 0:
                        self._write(out, tree, i, slot, int(rollouts[i]))
                        slots[i], done, finished_rollouts = None, done + 1, finished_rollouts + int(rollouts[i])
                if (leaf >= 0).any():
                    tree = self._expand_leaves(tree, leaf, slots)
                    expansions += int((leaf >= 0).sum())
                iteration += 1
                now = time.perf_counter()
                if now - last_report >= self.progress_every_s:
                    last_report = now
                    live = sum(int(rollouts[i]) for i, s in enumerate(slots) if s is not None)
                    self.progress(self._status(done + skipped, total, finished_rollouts + live, now - start))
        self.progress(self._status(done + skipped, total, finished_rollouts, time.perf_counter() - start))
        stores = {"policy": self.sampler.store, "score": self.scorer.store if self.scorer is not None else None}
        return {"searched": done, "skipped": skipped, "expansions": expansions, "rollouts": finished_rollouts,
                "seconds": dict(self.times), "wall_s": time.perf_counter() - start,
                # Lookups of stored keys/values (cumulative over this driver's runs).
                "stores": {k: {"hits": st.hits, "misses": st.misses, "mib": round(st.nbytes / 2 ** 20, 1)}
                           for k, st in stores.items() if st is not None}}

    @contextlib.contextmanager
    def _phase(self, bucket: str, name: str | None = None):
        """Times a phase into `bucket` of the progress line's split; named in profiler traces."""
        t = time.perf_counter()
        with jax.profiler.TraceAnnotation(f"search/{name or bucket}"):
            yield
        self.times[bucket] += time.perf_counter() - t

    def _profile_window(self, iteration: int) -> None:
        """Starts the profiler trace at `profile_start` and stops it `profile_iterations` later (or at the end)."""
        start = self.profile_start
        if start < 0 or self.profile_dir is None:
            return
        if iteration == start:
            jax.profiler.start_trace(self.profile_dir)
            self._profiling.callback(jax.profiler.stop_trace)
        elif iteration == start + self.profile_iterations:
            self._profiling.close()

    def _compile(self, tree: tr.Tree) -> tr.Tree:
        """Compile the tree kernels up front with no-op calls, so the time split shows steady-state costs."""
        t = time.perf_counter()
        b, n = tree.batch_size, self.config.num_candidates
        none = jnp.full((b,), -1, jnp.int32)
        tree = self._reset(tree, jnp.zeros((b,), bool))
        tree, _, _ = self._select(tree, none, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32))
        tree, _ = self._expand(tree, none, jnp.zeros((b,), jnp.int32), jnp.zeros((b, n), jnp.int32),
                               jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.float32),
                               jnp.zeros((b, n), jnp.int32))
        jax.block_until_ready(tree)
        self.times["compile"] += time.perf_counter() - t
        return tree

    def _status(self, done: int, total: int, rollouts: int, elapsed: float) -> str:
        busy = sum(self.times[k] for k in PHASES) or 1.0
        split = ", ".join(f"{k} {100 * self.times[k] / busy:.1f}%" for k in PHASES)
        eta = f", ETA {elapsed / done * (total - done):.0f}s" if 0 < done < total else ""  # at this pace
        return (f"search: {done}/{total} problems, {rollouts / max(elapsed, 1e-9):.2f} rollouts/s, {elapsed:.0f}s"
                f"{eta}; time split: {split} (+ tree compile {self.times['compile']:.1f}s)")

    # ---- one expansion of every live tree ------------------------------------------------------

    def _with_prefix(self, context: str | None) -> str | None:
        return None if context is None else self.config.prompt_prefix + context

    def _expand_leaves(self, tree: tr.Tree, leaf: np.ndarray, slots: list[_Slot | None]) -> tr.Tree:
        cfg, n = self.config, self.config.num_candidates
        live = [i for i in range(len(slots)) if leaf[i] >= 0]
        prompts = {i: slots[i].context(int(leaf[i])) for i in live}  # what the tree and the PPM see
        policy = {i: cfg.prompt_prefix + prompts[i] for i in live}  # what the policy sees
        ids = {i: self.tokenizer.encode(policy[i], add_special_tokens=False) for i in live}
        # A leaf whose context is used up gets no children and becomes a dead end.
        expandable = [i for i in live if len(ids[i]) < cfg.max_context_tokens]

        samples = {}
        with self._phase("generate"):
            for budget, rows in step_budgets({i: len(ids[i]) for i in expandable}, cfg.max_step_tokens,
                                             cfg.max_context_tokens).items():
                out = self.sampler.generate(
                    [ids[i] for i in rows], n=n, config=dataclasses.replace(self.sampling, max_new_tokens=budget),
                    seed=0, prompt_ids=[stream_id(slots[i].problem["id"], slots[i].seed, int(leaf[i])) for i in rows],
                    texts=[policy[i] for i in rows],
                    parents=[self._with_prefix(slots[i].context(int(leaf[i]), parent=True)) for i in rows])
                samples.update(zip(rows, out))
        for i in expandable:
            slots[i].generated_tokens += sum(len(s.token_ids) for s in samples[i])
        cands = {i: steps.candidate_steps([(s.text, s.finish_reason) for s in samples[i]], dedupe=cfg.dedupe,
                                          answer_first=cfg.answer_first) for i in expandable}

        code = [(i, c) for i in cands for c in cands[i] if c.kind == steps.CODE]
        programs = [assemble_program(slots[i].path_steps(int(leaf[i])) + [c.text]) for i, c in code]
        with self._phase("execute"):
            results = self.sandbox.run(programs, timeout_s=cfg.exec_timeout_s) if programs else []
        executed = {id(c): r for (_, c), r in zip(code, results)}
        for (_, c), r in zip(code, results):
            c.text = steps.with_output(c.text, r) if not r.failed else c.text

        answer = [(i, c) for i in cands for c in cands[i] if c.kind == steps.ANSWER_STEP]
        with self._phase("grade"):
            verdicts = self.grader.grade_batch([(c.text, slots[i].problem["answer"]) for i, c in answer])
        graded = {id(c): v for (_, c), v in zip(answer, verdicts)}

        scored = {}
        if self.scorer is not None and cfg.uses_ppm:
            # A child that can be expanded keeps its keys/values: its own children's scores run only their step.
            can_expand = [[c.kind == steps.CODE and not executed[id(c)].failed for c in cands[i]] for i in cands]
            with self._phase("score"):
                values = self.scorer.score_children([prompts[i] for i in cands],
                                                    [[c.text for c in cands[i]] for i in cands], keep=can_expand)
            scored = {id(c): float(v) for i, vs in zip(cands, values) for c, v in zip(cands[i], vs)}

        with self._phase("tree", "backup"):
            tree, new_ids = self._insert(tree, leaf, cands, slots, graded, executed, scored)
        for i in cands:
            slot = slots[i]
            for j, c in enumerate(cands[i]):
                if new_ids[i, j] < 0:
                    continue
                slot.texts.append(c.text)
                slot.parents.append(int(leaf[i]))
                if c.kind == steps.ANSWER_STEP:
                    v = graded[id(c)]
                    slot.answers[int(new_ids[i, j])] = (v.extracted, bool(v.equal))
                elif c.kind == steps.CODE and executed[id(c)].failed:
                    slot.errors[int(new_ids[i, j])] = executed[id(c)].observation
        return tree

    def _insert(self, tree, leaf, cands, slots, graded, executed, scored):
        """The candidates as new children of their leaves (insert + backup); returns (tree, new ids [B, n])."""
        cfg, n = self.config, self.config.num_candidates
        b = len(slots)
        num_new = np.zeros(b, np.int32)
        reason = np.zeros((b, n), np.int32)
        reward = np.zeros((b, n), np.float32)
        init_value = np.full((b, n), np.nan, np.float32)
        text_index = np.full((b, n), -1, np.int32)  # into the slot's host-side list of step texts
        for i in cands:
            num_new[i] = len(cands[i])
            for j, c in enumerate(cands[i]):
                init_value[i, j] = scored.get(id(c), math.nan)
                text_index[i, j] = len(slots[i].texts) + j
                if c.kind == steps.ANSWER_STEP:
                    v = graded[id(c)]
                    reason[i, j] = tr.ANSWER
                    # Inference backs up the PPM's opinion of the answer; data generation the graded truth.
                    reward[i, j] = init_value[i, j] if cfg.mode == "inference" else (1.0 if v.equal else -1.0)
                elif c.kind == steps.NO_STOP or executed[id(c)].failed:
                    reason[i, j] = tr.NO_STOP if c.kind == steps.NO_STOP else tr.EXEC_ERROR
                    reward[i, j] = -1.0
        tree, new_ids = self._expand(tree, jnp.asarray(leaf), jnp.asarray(num_new), jnp.asarray(reason),
                                     jnp.asarray(reward), jnp.asarray(init_value), jnp.asarray(text_index))
        return tree, np.asarray(new_ids)

    # ---- output --------------------------------------------------------------------------------

    def _write(self, out, tree: tr.Tree, i: int, slot: _Slot, rollouts: int) -> None:
        row = jax.device_get(jax.tree.map(lambda x: x[i], tree))
        nodes = []
        for k in range(int(row.num_nodes)):
            answer, correct = slot.answers.get(k, (None, None))
            init = float(row.init_value[k])
            nodes.append({"id": k, "parent": int(row.parent[k]), "depth": int(row.depth[k]),
                          "text": slot.texts[int(row.text_index[k])],
                          "visits": int(row.visits[k]), "value_sum": float(row.value_sum[k]),
                          "init_value": None if math.isnan(init) else init,
                          "terminal_reason": tr.TERMINAL_REASONS[int(row.terminal_reason[k])],
                          "final_answer": answer, "correct": correct})
            if k in slot.errors:
                nodes[-1]["error"] = slot.errors[k]
        answers = [ok for _, ok in slot.answers.values()]
        record = {"problem_id": slot.problem["id"], "prompt": slot.prompt, "answer": slot.problem["answer"],
                  "mode": self.config.mode, "config_digest": self.config.digest(), "seed": slot.seed,
                  "nodes": nodes, "stats": {"rollouts": rollouts, "answers": len(answers),
                                            "correct_answers": sum(answers),
                                            "generated_tokens": slot.generated_tokens}}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())


def _insert_and_backup(tree, leaf, num_new, reason, reward, init_value, text_index, *, max_depth, ppm_leaf_values,
                       propagate_failures):
    tree, ids = tr.insert(tree, leaf, num_new, reason, reward, init_value, text_index, max_depth=max_depth)
    tree = backup.backup_children(tree, ids, ppm_leaf_values=ppm_leaf_values, propagate_failures=propagate_failures)
    return tree, ids


def _reset_rows(tree: tr.Tree, rows: jax.Array) -> tr.Tree:
    """Rows marked in `rows` [B] become fresh single-root trees."""
    fresh = tr.empty(tree.batch_size, tree.capacity, jnp.zeros((tree.batch_size,), jnp.int32))  # root text: ""
    pick = lambda new, old: jnp.where(rows.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
    return jax.tree.map(pick, fresh, tree)
